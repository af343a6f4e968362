"""`minedraft http`: the OpenAI HTTP API (completions, chat completions, models, health) in front of a router.

Each HTTP request becomes one streaming Generate call; a client that disconnects cancels it, which frees the
sequence on both services within a round. gRPC statuses become OpenAI-style error bodies with the matching
HTTP status. The Authorization header is passed on, so the router's API key guards this door too."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minedraft.app.http import replies
from minedraft.app.http.body_limit import BodyLimit
from minedraft.app.http.schema import ChatRequest, CompletionRequest, Unsupported
from minedraft.protos import generate_pb2, generate_pb2_grpc
from minedraft.serving.security import channel_credentials
from minedraft.serving.telemetry import client_interceptors, setup_tracing

MAX_BODY_BYTES = 8 * 1024 * 1024  # the router's own request limit
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
               grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
               grpc.StatusCode.DEADLINE_EXCEEDED: 504}


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def rpc_error(failure: grpc.aio.AioRpcError) -> JSONResponse:
    return error(HTTP_STATUS.get(failure.code(), 500), failure.details() or failure.code().name,
                 code=failure.code().name.lower())


def create_app(router: str, model_name: str, tls_ca: str | None = None, tls_cert: str | None = None,
               tls_key: str | None = None) -> FastAPI:
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        interceptors = client_interceptors()  # the HTTP request's trace context goes on in the gRPC metadata
        if tls_ca:
            state["channel"] = grpc.aio.secure_channel(router, channel_credentials(tls_ca, tls_cert, tls_key),
                                                       interceptors=interceptors or None)
        else:
            state["channel"] = grpc.aio.insecure_channel(router, interceptors=interceptors or None)
        yield
        await state["channel"].close()

    app = FastAPI(title="minedraft", lifespan=lifespan)
    if setup_tracing("http"):  # a span per HTTP request, child of the caller's traceparent when it sends one
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, excluded_urls="health")

    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)  # chunked bodies too, not only Content-Length

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, failure: RequestValidationError) -> JSONResponse:
        first = failure.errors()[0] if failure.errors() else {}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return error(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param)

    @app.exception_handler(Unsupported)
    async def unsupported(request: Request, failure: Unsupported) -> JSONResponse:
        return error(400, str(failure), failure.param)

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            reply = await health_pb2_grpc.HealthStub(state["channel"]).Check(health_pb2.HealthCheckRequest(),
                                                                            timeout=3)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            serving = False
        return JSONResponse({"status": "ok" if serving else "unavailable"}, status_code=200 if serving else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "minedraft"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await generate(body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await generate(body, request, chat=True)

    async def generate(body: CompletionRequest | ChatRequest, request: Request, chat: bool):
        if body.model != model_name:
            return error(404, f"the model {body.model!r} does not exist here; this server has {model_name!r}",
                         "model", "model_not_found")
        body.check_supported()
        try:
            grpc_request = body.to_grpc()
        except ValueError as failure:  # a value the wire cannot carry
            return error(400, str(failure))
        authorization = request.headers.get("authorization")
        call = generate_pb2_grpc.GenerationStub(state["channel"]).Generate(
            grpc_request, metadata=[("authorization", authorization)] if authorization else None)
        responses = call.__aiter__()
        try:
            first = await responses.__anext__()  # a refusal arrives before any token: answer it as HTTP
        except grpc.aio.AioRpcError as failure:
            return rpc_error(failure)
        reply = replies.Reply(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", model_name,
                              int(time.time()), n=body.n, logprobs=body.top_logprobs_wanted() is not None)
        if not body.stream:
            watch = asyncio.create_task(cancel_when_gone(request, call))
            try:
                reply.absorb(first)
                async for response in responses:
                    reply.absorb(response)
            except grpc.aio.AioRpcError as failure:
                return rpc_error(failure)
            finally:
                watch.cancel()
                call.cancel()  # a no-op once it finished
            return reply.whole()
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(events(call, first, responses, reply, usage), media_type="text/event-stream")

    return app


async def cancel_when_gone(request: Request, call, poll_s: float = 0.5) -> None:
    """A whole (non-streamed) reply: its client may leave before it is ready; then the generation stops."""
    while not await request.is_disconnected():
        await asyncio.sleep(poll_s)
    call.cancel()


async def events(call, first: generate_pb2.GenerateResponse, responses: AsyncIterator, reply: replies.Reply,
                 include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per Generate response, an optional usage chunk, then [DONE]."""
    try:
        yield replies.sse(reply.chunk(first))
        async for response in responses:
            yield replies.sse(reply.chunk(response))
        if include_usage:
            yield replies.sse(reply.usage_chunk())
        yield "data: [DONE]\n\n"
    except grpc.aio.AioRpcError as failure:
        yield replies.sse({"error": {"message": failure.details(), "type": "server_error",
                                     "code": failure.code().name.lower()}})
    finally:
        call.cancel()  # the client went away (or the stream ended): the router frees the sequence
