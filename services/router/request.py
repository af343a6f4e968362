"""One client request as the router tracks it: tokens, streamed text, stop conditions and statistics."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from minedraft.protos import generate_pb2
from minedraft.sampling import Sampling
from services.router.text_stream import TextStream


@dataclass
class Request:
    seq_id: str
    prompt_ids: list[int]
    sampling: Sampling
    max_tokens: int
    text: TextStream
    eos_ids: frozenset[int]
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    draft_len: int = 0  # tokens of prompt + generated that the draft service holds, verified
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.generated)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def add_tokens(self, new: list[int]) -> None:
        """Takes a round's tokens in order, stopping at EOS, max_tokens or a stop string; streams a chunk."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        consumed = []
        for token in new:
            if token in self.eos_ids:
                self.finish_reason = "eos"
                break
            consumed.append(token)
            self.generated.append(token)
            self.text.add(token)
            if self.text.stopped:
                self.finish_reason = "stop"
                break
            if self.remaining <= 0:
                self.finish_reason = "length"
                break
        delta = self.text.take(final=self.finish_reason is not None)
        if consumed or delta:
            self.events.put_nowait(generate_pb2.GenerateResponse(
                chunk=generate_pb2.Chunk(text=delta, token_ids=consumed)))
        if self.finish_reason is not None:
            self.events.put_nowait(generate_pb2.GenerateResponse(final=generate_pb2.Final(
                finish_reason=self.finish_reason, stats=self.stats())))

    def fail(self, error: BaseException) -> None:
        """Ends the request with an error the servicer turns into a gRPC status."""
        self.finish_reason = "error"
        self.events.put_nowait(error)

    def stats(self) -> generate_pb2.RequestStats:
        now = time.perf_counter()
        return generate_pb2.RequestStats(
            prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.generated),
            drafted_tokens=self.drafted, accepted_tokens=self.accepted, rounds=self.rounds,
            ttft_s=(self.first_token_at or now) - self.started, total_s=now - self.started,
            seed=self.sampling.seed)
