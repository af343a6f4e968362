"""The public Generate API: validates and tokenizes a request, hands it to the scheduler, streams it back."""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import AsyncIterator

import grpc
from transformers import PreTrainedTokenizerBase

from minedraft.errors import InvalidArgument, ServiceError
from minedraft.protos import generate_pb2, generate_pb2_grpc
from minedraft.sampling import Sampling
from services.router.request import Request
from services.router.scheduler import Scheduler
from services.router.text_stream import TextStream

log = logging.getLogger(__name__)


class GenerationServicer(generate_pb2_grpc.GenerationServicer):
    def __init__(self, scheduler: Scheduler, tokenizer: PreTrainedTokenizerBase, eos_ids: frozenset[int],
                 max_context: int, default_max_tokens: int = 256) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_context = max_context
        self.default_max_tokens = default_max_tokens

    async def Generate(self, request: generate_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generate_pb2.GenerateResponse]:
        try:
            job = self._build(request)
        except ServiceError as error:
            await context.abort(error.code, str(error))
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
            if job.finish_reason is None:  # the client went away: free the sequence at the next boundary
                job.cancelled = True

    def _build(self, request: generate_pb2.GenerateRequest) -> Request:
        prompt_ids = self._prompt_ids(request)
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty")
        room = self.max_context - len(prompt_ids)
        if room <= 0:
            raise InvalidArgument(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_context}")
        max_tokens = request.max_tokens if request.HasField("max_tokens") else min(self.default_max_tokens, room)
        if max_tokens <= 0 or max_tokens > room:
            raise InvalidArgument(f"max_tokens must be in [1, {room}] for this prompt")
        params = request.sampling
        seed = params.seed if params.HasField("seed") else secrets.randbits(63)
        sampling = Sampling(temperature=params.temperature, top_p=params.top_p or 1.0, top_k=params.top_k,
                            seed=seed)
        return Request(seq_id=uuid.uuid4().hex, prompt_ids=prompt_ids, sampling=sampling, max_tokens=max_tokens,
                       text=TextStream(self.tokenizer, list(request.stop)), eos_ids=self.eos_ids)

    def _prompt_ids(self, request: generate_pb2.GenerateRequest) -> list[int]:
        if request.WhichOneof("input") == "chat":
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if not messages:
                raise InvalidArgument("the chat has no messages")
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if request.WhichOneof("input") == "prompt":
            return self.tokenizer.encode(request.prompt, add_special_tokens=False)
        raise InvalidArgument("give a prompt or chat messages")
