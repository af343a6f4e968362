"""The public Generate API: validates and tokenizes a request, admits it, streams it back."""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
from transformers import PreTrainedTokenizerBase

from minedraft import metrics
from minedraft.engine.sequence_table import MAX_LOGPROBS
from minedraft.errors import InvalidArgument, ServiceError, Unavailable
from minedraft.protos import generate_pb2
from minedraft.serving.telemetry import tracer
from services.router.admission import Admission
from services.router.cells import Cells
from services.router.prompts import PromptEncoder
from services.router.request import Request
from services.router.text_stream import TextStream
from services.router.validation import MAX_N, MAX_SEED, Malformed, check_request, parse_request

log = logging.getLogger(__name__)


class GenerationServicer:
    def __init__(self, cells: Cells, tokenizer: PreTrainedTokenizerBase, info: generate_pb2.ModelInfo,
                 max_context: int, admission: Admission, default_max_tokens: int = 256,
                 control_tokens: bool = False) -> None:
        """`info`: the models, tokenizer, vocabulary and EOS ids (the rest is filled in when asked)."""
        self.cells = cells
        self.tokenizer = tokenizer
        self.prompts = PromptEncoder(tokenizer, control_tokens)
        self.info = info
        self.eos_ids = frozenset(info.eos_token_ids)
        self.context_cap = max_context
        self.admission = admission
        self.default_max_tokens = default_max_tokens

    @property
    def max_context(self) -> int:
        """The configured cap, lowered to the least any service holds (each Renew answer says; a service
        restarted beside a busier one may fit a smaller cache than at first)."""
        backends = [b for s in self.cells.schedulers for b in (s.target, s.draft) if b is not None]
        return min([self.context_cap, *(b.max_context for b in backends if b.max_context)])

    async def Generate(self, request: generate_pb2.GenerateRequest | Malformed,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generate_pb2.GenerateResponse]:
        try:
            if not self.cells.ready:  # before ready() the services' contexts and auto's stage times are unknown
                raise Unavailable("the router is starting (services loading, auto calibrating); it takes requests "
                                  "once its health check says SERVING")
            jobs = await self._build(request)
            if not self.cells.target_up:
                raise Unavailable("every target service is down; the router is waiting for one to come back")
            await self.admission.admit(self.cells.in_flight, len(jobs))
        except ServiceError as error:
            await context.abort(error.code, str(error))
        for job in jobs:
            job.span = tracer().start_span("generate", attributes={
                "minedraft.prompt_tokens": len(job.prompt_ids), "minedraft.max_tokens": job.max_tokens,
                "minedraft.temperature": job.sampling.temperature, "minedraft.speculate": job.speculate,
                "minedraft.sample": job.index})
            self.cells.submit(job)
        events, finals = jobs[0].events, 0
        try:
            while finals < len(jobs):
                event = await events.get()
                if isinstance(event, ServiceError):
                    await context.abort(event.code, str(event))
                yield event
                finals += event.HasField("final")
        finally:
            for job in jobs:
                if job.finish_reason is None:  # the client went away or its deadline passed: free it next round
                    job.cancelled = True
                    self.cells[job.cell].poke()  # only its cell holds it
                job.end_span()
                metrics.REQUESTS.labels(job.finish_reason or "cancelled").inc()
                metrics.GENERATED_TOKENS.inc(len(job.generated))

    async def _build(self, request: generate_pb2.GenerateRequest | Malformed) -> list[Request]:
        """The request's n samples: one Request each, sharing one event queue and the first one's prefill."""
        checked = check_request(request)  # sizes first: only then is the text worth tokenising
        if checked.prompt_ids is not None:
            prompt_ids = checked.prompt_ids
            if not all(0 <= t < self.info.vocab_size for t in prompt_ids):
                raise InvalidArgument(f"prompt_ids: token ids must be in [0, {self.info.vocab_size})")
        else:
            prompt_ids = await self.prompts.encode(checked.prompt, checked.chat)
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty")
        room = self.max_context - len(prompt_ids)
        if room <= 0:
            raise InvalidArgument(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_context}")
        max_tokens = request.max_tokens if request.HasField("max_tokens") else \
            min(max(self.default_max_tokens, checked.sampling.min_tokens), room)
        if max_tokens > room:
            raise InvalidArgument(f"max_tokens must be at most {room} for this prompt of {len(prompt_ids)} tokens "
                                  f"(context {self.max_context})")
        if checked.sampling.min_tokens > max_tokens:
            raise InvalidArgument(f"min_tokens must be at most max_tokens ({max_tokens})")
        if checked.n > self.admission.max_sequences:  # never admissible: no use retrying
            raise InvalidArgument(f"n must be at most {self.admission.max_sequences} on this server")
        seed = checked.seed if checked.seed is not None else secrets.randbits(63)
        held = checked.stop_token_ids | (frozenset() if checked.ignore_eos else self.eos_ids)
        sampling = replace(checked.sampling, held_tokens=tuple(sorted(held)), prompt_len=len(prompt_ids))
        events: asyncio.Queue = asyncio.Queue()
        jobs: list[Request] = []
        for index in range(checked.n):
            jobs.append(Request(
                seq_id=uuid.uuid4().hex, prompt_ids=prompt_ids, max_tokens=max_tokens, eos_ids=self.eos_ids,
                sampling=replace(sampling, seed=(seed + index) % (MAX_SEED + 1)),
                text=TextStream(self.tokenizer, checked.stops), speculate=checked.speculate, events=events,
                index=index, same_prompt_as=jobs[0].seq_id if jobs else "", stop_ids=checked.stop_token_ids,
                ignore_eos=checked.ignore_eos))
        return jobs


    async def GetModelInfo(self, request: generate_pb2.ModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> generate_pb2.ModelInfo:
        info = generate_pb2.ModelInfo()
        info.CopyFrom(self.info)
        info.max_context, info.mode, info.k = self.max_context, self.cells.first.mode, self.cells.first.round_k
        info.modes[:] = ["auto", "off"] if self.cells.first.draft is not None else ["off"]
        info.max_n, info.max_logprobs = min(MAX_N, self.admission.max_sequences), MAX_LOGPROBS
        return info

    async def Tokenize(self, request: generate_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> generate_pb2.TokenizeResponse:
        try:
            checked = check_request(generate_pb2.GenerateRequest(prompt=request.prompt) if request.HasField("prompt")
                                    else generate_pb2.GenerateRequest(chat=request.chat))
        except ServiceError as error:
            await context.abort(error.code, str(error))
        return generate_pb2.TokenizeResponse(token_ids=await self.prompts.encode(checked.prompt, checked.chat))

    async def Detokenize(self, request: generate_pb2.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> generate_pb2.DetokenizeResponse:
        if len(request.token_ids) > self.max_context or \
                not all(0 <= t < self.info.vocab_size for t in request.token_ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {self.max_context} token ids, each in "
                                f"[0, {self.info.vocab_size})")
        text = self.tokenizer.decode(list(request.token_ids), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
        return generate_pb2.DetokenizeResponse(text=text)


def add_generation_servicer(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_…_to_server, but bad Generate bytes reach the servicer as Malformed."""
    def unary(method, request_type, response_type):
        return grpc.unary_unary_rpc_method_handler(method, request_deserializer=request_type.FromString,
                                                   response_serializer=response_type.SerializeToString)
    handler = grpc.method_handlers_generic_handler("minedraft.protos.Generation", {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=parse_request,
            response_serializer=generate_pb2.GenerateResponse.SerializeToString),
        "GetModelInfo": unary(servicer.GetModelInfo, generate_pb2.ModelInfoRequest, generate_pb2.ModelInfo),
        "Tokenize": unary(servicer.Tokenize, generate_pb2.TokenizeRequest, generate_pb2.TokenizeResponse),
        "Detokenize": unary(servicer.Detokenize, generate_pb2.DetokenizeRequest, generate_pb2.DetokenizeResponse)})
    server.add_generic_rpc_handlers((handler,))
