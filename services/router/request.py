"""One client request as the router tracks it: tokens, streamed text, stop conditions and statistics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from opentelemetry.trace import INVALID_SPAN, Span

from minedraft.engine.sampling import Sampling
from minedraft.protos import common_pb2, generate_pb2
from services.router.text_stream import TextStream


@dataclass
class Request:
    seq_id: str
    prompt_ids: list[int]
    sampling: Sampling
    max_tokens: int
    text: TextStream
    eos_ids: frozenset[int]  # end the output (finish reason eos), unless ignore_eos
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # shared by the n samples of one request
    index: int = 0  # which of the request's samples
    same_prompt_as: str = ""  # the first sample's seq_id: prefilled in one call, this one copies its cache
    stop_ids: frozenset[int] = frozenset()  # end the output (finish reason stop)
    ignore_eos: bool = False
    cell: int = 0  # which draft/target pair serves it (cells.py)
    moves: int = 0  # how often it moved to another cell after losing its target
    rescue: Callable[[Request], bool] | None = None  # takes it to another cell when its target is lost
    generated: list[int] = field(default_factory=list)
    speculate: bool = True  # False: decoded by the target alone
    draft_len: int = 0  # tokens of prompt + generated that the draft service holds, verified
    draft_epoch: int = -1  # the draft's epoch when it got this sequence (-1: it never did)
    draft_sent: bool = False  # a draft prefill went out for it: the draft may hold it, release it there too
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    span: Span = INVALID_SPAN  # the request's trace span, parent of the batch spans it leads

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def reserved_tokens(self) -> int:
        """The most tokens this sequence can come to hold: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.max_tokens

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.generated)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def add_tokens(self, new: list[int], logprobs: Sequence[common_pb2.TokenLogprob] = ()) -> None:
        """Takes a round's tokens (and their logprobs, when asked for) in order, stopping at EOS, a stop token,
        max_tokens or a stop string; streams a chunk."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        consumed = []
        for token in new:
            if token in self.stop_ids:
                self.finish_reason = "stop"
                break
            if token in self.eos_ids and not self.ignore_eos:
                self.finish_reason = "eos"
                break
            consumed.append(token)
            self.generated.append(token)
            self.text.add(token, may_stop=len(self.generated) > self.sampling.min_tokens)
            if self.text.stopped:
                self.finish_reason = "stop"
                break
            if self.remaining <= 0:
                self.finish_reason = "length"
                break
        delta = self.text.take(final=self.finish_reason is not None)
        logprobs = logprobs[:len(consumed)]
        for entry in logprobs:
            entry.token = self.text.token_text(entry.token_id)
            entry.top_tokens[:] = [self.text.token_text(t) for t in entry.top_ids]
            entry.token_bytes = self.text.token_bytes(entry.token_id)
            entry.top_token_bytes[:] = [self.text.token_bytes(t) for t in entry.top_ids]
        if consumed or delta:
            self.events.put_nowait(generate_pb2.GenerateResponse(chunk=generate_pb2.Chunk(
                text=delta, token_ids=consumed, logprobs=logprobs, index=self.index)))
        if self.finish_reason is not None:
            self.events.put_nowait(generate_pb2.GenerateResponse(final=generate_pb2.Final(
                finish_reason=self.finish_reason, stats=self.stats(), index=self.index)))

    def sampling_proto(self) -> common_pb2.SamplingParams:
        return self.sampling.to_proto()

    def fail(self, error: BaseException) -> None:
        """Ends the request with an error the servicer turns into a gRPC status."""
        self.finish_reason = "error"
        self.events.put_nowait(error)

    def end_span(self) -> None:
        self.span.set_attributes({
            "minedraft.finish_reason": self.finish_reason or "cancelled",
            "minedraft.completion_tokens": len(self.generated),
            "minedraft.drafted_tokens": self.drafted, "minedraft.accepted_tokens": self.accepted,
            "minedraft.rounds": self.rounds})
        self.span.end()

    def stats(self) -> generate_pb2.RequestStats:
        now = time.perf_counter()
        return generate_pb2.RequestStats(
            prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.generated),
            drafted_tokens=self.drafted, accepted_tokens=self.accepted, rounds=self.rounds,
            ttft_s=(self.first_token_at or now) - self.started, total_s=now - self.started,
            seed=self.sampling.seed)
