"""The public Generate API: validates and tokenizes a request, admits it, streams it back."""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import AsyncIterator

import grpc
from transformers import PreTrainedTokenizerBase

from minedraft import metrics
from minedraft.engine.sampling import Sampling
from minedraft.errors import InvalidArgument, ServiceError, Unavailable
from minedraft.protos import generate_pb2
from minedraft.serving.telemetry import tracer
from services.router.admission import Admission
from services.router.prompts import PromptEncoder
from services.router.request import Request
from services.router.scheduler import Scheduler
from services.router.text_stream import TextStream
from services.router.validation import Malformed, check_request, parse_request

log = logging.getLogger(__name__)


class GenerationServicer:
    def __init__(self, scheduler: Scheduler, tokenizer: PreTrainedTokenizerBase, eos_ids: frozenset[int],
                 max_context: int, admission: Admission, default_max_tokens: int = 256,
                 control_tokens: bool = False) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.prompts = PromptEncoder(tokenizer, control_tokens)
        self.eos_ids = eos_ids
        self.max_context = max_context
        self.admission = admission
        self.default_max_tokens = default_max_tokens

    async def Generate(self, request: generate_pb2.GenerateRequest | Malformed,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generate_pb2.GenerateResponse]:
        try:
            job = await self._build(request)
            if not self.scheduler.target_up:
                raise Unavailable("the target service is down; the router is waiting for it to come back")
            await self.admission.admit(self.scheduler.in_flight)
        except ServiceError as error:
            await context.abort(error.code, str(error))
        job.span = tracer().start_span("generate", attributes={
            "minedraft.prompt_tokens": len(job.prompt_ids), "minedraft.max_tokens": job.max_tokens,
            "minedraft.temperature": job.sampling.temperature, "minedraft.speculate": job.speculate})
        await self.scheduler.submit(job)
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, ServiceError):
                    await context.abort(event.code, str(event))
                yield event
                if event.HasField("final"):
                    return
        finally:
            if job.finish_reason is None:  # the client went away or its deadline passed: free it next round
                job.cancelled = True
                self.scheduler.poke()
            job.end_span()
            metrics.REQUESTS.labels(job.finish_reason or "cancelled").inc()
            metrics.GENERATED_TOKENS.inc(len(job.generated))

    async def _build(self, request: generate_pb2.GenerateRequest | Malformed) -> Request:
        checked = check_request(request)  # sizes first: only then is the text worth tokenising
        prompt_ids = await self.prompts.encode(checked.prompt, checked.chat)
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty")
        room = self.max_context - len(prompt_ids)
        if room <= 0:
            raise InvalidArgument(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_context}")
        max_tokens = request.max_tokens if request.HasField("max_tokens") else min(self.default_max_tokens, room)
        if max_tokens > room:
            raise InvalidArgument(f"max_tokens must be at most {room} for this prompt of {len(prompt_ids)} tokens "
                                  f"(context {self.max_context})")
        seed = checked.seed if checked.seed is not None else secrets.randbits(63)
        sampling = Sampling(temperature=checked.temperature, top_p=checked.top_p, top_k=checked.top_k, seed=seed)
        return Request(seq_id=uuid.uuid4().hex, prompt_ids=prompt_ids, sampling=sampling, max_tokens=max_tokens,
                       text=TextStream(self.tokenizer, checked.stops), eos_ids=self.eos_ids,
                       speculate=checked.speculate)


def add_generation_servicer(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_…_to_server, but bad request bytes reach the servicer as Malformed."""
    handler = grpc.method_handlers_generic_handler("minedraft.protos.Generation", {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=parse_request,
            response_serializer=generate_pb2.GenerateResponse.SerializeToString)})
    server.add_generic_rpc_handlers((handler,))
