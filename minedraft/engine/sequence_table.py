"""The sequences a service holds, by id: who owns each, how long it may sit unused, and the checks every
service applies before it touches one.

Checks come in two kinds. A malformed batch (empty, an id twice) fails the whole call. Anything about one
sequence (unknown id, bad tokens, no room) fails that sequence only: the engines report it beside the others'
results, so one bad request never takes its batch-mates down.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch

from minedraft.engine.model_runner import SequenceState
from minedraft.engine.sampling import MIN_TEMPERATURE, Sampling, make_generator
from minedraft.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted

MAX_SEQ_ID_BYTES = 128
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's limit)
MAX_REPETITION_PENALTY = 10.0
DEFAULT_LEASE_S = 60.0


class SequenceTable:
    def __init__(self, max_context: int, vocab_size: int,
                 on_drop: Callable[[SequenceState], None] = lambda state: None,
                 max_sequences: int = 1 << 30, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.max_context = max_context
        self.vocab_size = vocab_size
        self.on_drop = on_drop  # gives a dropped sequence's cache space back (static KV slots)
        self.max_sequences = max_sequences
        self.lease_s = lease_s
        self._seqs: dict[str, SequenceState] = {}

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def get(self, seq_id: str, owner: str = "") -> SequenceState:
        """The owner's sequence, its lease renewed; another owner's is as unknown as a missing one."""
        state = self._seqs.get(seq_id)
        if state is None or state.owner != owner:
            raise NotFound(f"unknown sequence {seq_id[:MAX_SEQ_ID_BYTES]!r} (never prefilled, released or expired)")
        state.expires_at = time.monotonic() + self.lease_s
        return state

    def put(self, seq_id: str, state: SequenceState) -> None:
        replaced = self._seqs.get(seq_id)
        if replaced is not None and replaced is not state:
            self.on_drop(replaced)
        state.expires_at = time.monotonic() + self.lease_s
        self._seqs[seq_id] = state

    def release(self, seq_ids: Iterable[str], owner: str | None = None) -> int:
        """Drops these sequences (only the owner's, unless owner is None: the service itself)."""
        released = 0
        for seq_id in seq_ids:
            state = self._seqs.get(seq_id)
            if state is not None and (owner is None or state.owner == owner):
                del self._seqs[seq_id]
                self.on_drop(state)
                released += 1
        return released

    def renew(self, seq_ids: Iterable[str], owner: str) -> int:
        """Extends the lease of these sequences of this owner; returns how many it holds."""
        expires_at, renewed = time.monotonic() + self.lease_s, 0
        for seq_id in seq_ids:
            state = self._seqs.get(seq_id)
            if state is not None and state.owner == owner:
                state.expires_at = expires_at
                renewed += 1
        return renewed

    def expired(self) -> list[str]:
        now = time.monotonic()
        return [seq_id for seq_id, state in list(self._seqs.items()) if state.expires_at < now]

    def check_room(self, taken: int, free_slots: int) -> None:
        """Refuses one more new sequence when `taken` of this call's already use up the cap or the cache."""
        if len(self._seqs) + taken >= self.max_sequences:
            raise ResourceExhausted(f"this service holds its most sequences ({self.max_sequences}); retry when "
                                    "others finish")
        if taken >= free_slots:
            raise ResourceExhausted("KV cache full; retry when others finish")

    @staticmethod
    def check_batch(seq_ids: list[str]) -> None:
        """What fails a whole call: an empty batch or an id twice (no sequence could be told apart)."""
        if not seq_ids:
            raise InvalidArgument("empty batch")
        if len(set(seq_ids)) != len(seq_ids):
            raise InvalidArgument("a sequence appears twice in one batch")

    def new_state(self, seq_id: str, tokens: list[int], sampling: Sampling, stream: int, device: torch.device,
                  owner: str = "", room: int = 0, replace: bool = False) -> SequenceState:
        """A checked state for one prefill, with its own sampling generator on `stream`.

        `room`: tokens the service adds at once (the target samples a first token). `replace`: a re-sync of an
        id this owner holds already (its old state is dropped when the new one is put). The state's prompt is the
        sampling's `prompt_len` tokens (the router's count; a request moved from another cell brings its output
        too), else all of them."""
        if not seq_id or len(seq_id.encode()) > MAX_SEQ_ID_BYTES:
            raise InvalidArgument(f"a sequence id must have 1 to {MAX_SEQ_ID_BYTES} bytes")
        held = self._seqs.get(seq_id)
        if held is not None and not (replace and held.owner == owner):
            raise AlreadyExists(f"sequence {seq_id!r} is held already")
        if not tokens:
            raise InvalidArgument("empty prompt")
        self.check_tokens(tokens, extra=room)
        check_sampling(sampling)
        return SequenceState(list(tokens), sampling=sampling, generator=make_generator(sampling.seed, stream, device),
                             owner=owner, prompt_len=min(sampling.prompt_len, len(tokens)) or len(tokens))

    def check_tokens(self, tokens: list[int], extra: int = 0) -> None:
        if any(t < 0 or t >= self.vocab_size for t in tokens):
            raise InvalidArgument(f"token id outside the vocabulary [0, {self.vocab_size})")
        if len(tokens) + extra > self.max_context:
            raise InvalidArgument(f"sequence of {len(tokens) + extra} tokens exceeds the context of "
                                  f"{self.max_context}")


def check_sampling(sampling: Sampling) -> None:
    """Settings the sampler can compute with (the router checks the same; a direct caller may not)."""
    if not math.isfinite(sampling.temperature) or sampling.temperature < 0 or \
            0 < sampling.temperature < MIN_TEMPERATURE:
        raise InvalidArgument(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
    if not math.isfinite(sampling.top_p) or not 0 < sampling.top_p <= 1:
        raise InvalidArgument("top_p must be in (0, 1]")
    if sampling.top_k < 0:
        raise InvalidArgument("top_k must be 0 (off) or positive")
    if not 0 <= sampling.min_p <= 1:  # a NaN fails this too
        raise InvalidArgument("min_p must be in [0, 1]")
    if not 1 / MAX_REPETITION_PENALTY <= sampling.repetition_penalty <= MAX_REPETITION_PENALTY:
        raise InvalidArgument(f"repetition_penalty must be in [{1 / MAX_REPETITION_PENALTY:g}, "
                              f"{MAX_REPETITION_PENALTY:g}]")
    if not (-2 <= sampling.frequency_penalty <= 2 and -2 <= sampling.presence_penalty <= 2):
        raise InvalidArgument("frequency_penalty and presence_penalty must be in [-2, 2]")
    if sampling.logprobs > MAX_LOGPROBS:
        raise InvalidArgument(f"logprobs: at most {MAX_LOGPROBS} top alternatives")
