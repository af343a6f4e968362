"""The sequences a service holds, by id, with the checks every service applies to a batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from minedraft.errors import InvalidArgument, NotFound
from minedraft.model_runner import SequenceState
from minedraft.sampling import Sampling, make_generator


class SequenceTable:
    def __init__(self, max_context: int, vocab_size: int,
                 on_drop: Callable[[SequenceState], None] = lambda state: None) -> None:
        self.max_context = max_context
        self.vocab_size = vocab_size
        self.on_drop = on_drop  # gives a dropped sequence's cache space back (static KV slots)
        self._seqs: dict[str, SequenceState] = {}

    def __len__(self) -> int:
        return len(self._seqs)

    def get(self, seq_id: str) -> SequenceState:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise NotFound(f"unknown sequence {seq_id!r} (never prefilled, or released)") from None

    def put(self, seq_id: str, state: SequenceState) -> None:
        replaced = self._seqs.get(seq_id)
        if replaced is not None and replaced is not state:
            self.on_drop(replaced)
        self._seqs[seq_id] = state

    def release(self, seq_ids: Iterable[str]) -> int:
        released = 0
        for seq_id in seq_ids:
            state = self._seqs.pop(seq_id, None)
            if state is not None:
                self.on_drop(state)
                released += 1
        return released

    def check_batch(self, seq_ids: list[str]) -> None:
        if not seq_ids:
            raise InvalidArgument("empty batch")
        if len(set(seq_ids)) != len(seq_ids):
            raise InvalidArgument("a sequence appears twice in one batch")
        if any(not seq_id for seq_id in seq_ids):
            raise InvalidArgument("empty sequence id")

    def new_states(self, seqs: list[tuple[str, list[int], Sampling]], stream: int, device: torch.device,
                   room: int = 0) -> list[SequenceState]:
        """Checked states for a prefill batch, each with its own sampling generator on `stream`.

        `room`: tokens the service adds at once (the target samples a first token)."""
        self.check_batch([seq_id for seq_id, _, _ in seqs])
        states = []
        for _, tokens, sampling in seqs:
            if not tokens:
                raise InvalidArgument("empty prompt")
            self.check_tokens(tokens, extra=room)
            generator = make_generator(sampling.seed, stream, device)
            states.append(SequenceState(list(tokens), extra={"sampling": sampling, "generator": generator}))
        self.release(seq_id for seq_id, _, _ in seqs)  # a known id is re-sent (re-sync): free its old space first
        return states

    def check_tokens(self, tokens: list[int], extra: int = 0) -> None:
        if any(t < 0 or t >= self.vocab_size for t in tokens):
            raise InvalidArgument(f"token id outside the vocabulary [0, {self.vocab_size})")
        if len(tokens) + extra > self.max_context:
            raise InvalidArgument(f"sequence of {len(tokens) + extra} tokens exceeds the context of "
                                  f"{self.max_context}")
