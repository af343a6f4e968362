"""Draft-side model work: caching prompts and proposing k tokens for a whole batch."""

from __future__ import annotations

from dataclasses import dataclass

from minedraft.errors import InvalidArgument
from minedraft.model_runner import ModelRunner
from minedraft.sampling import DRAFT_STREAM, Sampling, sample_truncated
from minedraft.sequence_table import SequenceTable


@dataclass
class ProposedToken:
    token_id: int
    support: list[int]  # q's token ids
    probs: list[float]  # q's probabilities on them


class DraftEngine:
    def __init__(self, runner: ModelRunner, top_m: int = 32) -> None:
        self.runner = runner
        self.top_m = top_m
        self.table = SequenceTable(runner.max_context, runner.vocab_size, on_drop=runner.drop)

    def prefill(self, seqs: list[tuple[str, list[int], Sampling]]) -> None:
        """Caches each prompt in one batched forward (a known id is replaced: re-sync after a restart)."""
        states = self.table.new_states(seqs, DRAFT_STREAM, self.runner.device)
        self.runner.forward(states, logits_to_keep=1)
        for (seq_id, _, _), state in zip(seqs, states, strict=True):
            self.table.put(seq_id, state)

    def propose(self, seqs: list[tuple[str, int, list[int], int]]) -> list[list[ProposedToken]]:
        """For each (seq_id, keep, append, k): apply the commit, then draft k tokens.

        One batched forward per draft position; sequences asking for fewer tokens drop out early.
        """
        self.table.check_batch([seq_id for seq_id, *_ in seqs])
        states = [self.table.get(seq_id) for seq_id, *_ in seqs]
        for state, (seq_id, keep, append, k) in zip(states, seqs, strict=True):
            if keep > len(state.tokens) or keep + len(append) == 0:
                raise InvalidArgument(f"{seq_id}: cannot keep {keep} of {len(state.tokens)} tokens held")
            self.table.check_tokens(append, extra=keep + k)
        for state, (_, keep, append, _) in zip(states, seqs, strict=True):  # all checked: now mutate
            state.truncate(keep)
            state.tokens.extend(append)
        proposals: list[list[ProposedToken]] = [[] for _ in seqs]
        for step in range(max((k for *_, k in seqs), default=0)):
            active = [i for i, (*_, k) in enumerate(seqs) if k > step]
            logits = self.runner.forward([states[i] for i in active], logits_to_keep=1)[:, -1]
            for row, i in enumerate(active):
                state = states[i]
                token, support, probs = sample_truncated(logits[row], state.extra["sampling"], self.top_m,
                                                         state.extra["generator"])
                state.tokens.append(token)
                proposals[i].append(ProposedToken(token, support, probs))
        return proposals

    def step_once(self, seq_id: str) -> None:
        """Proposes two tokens for a held sequence (warm-up)."""
        self.propose([(seq_id, len(self.table.get(seq_id).tokens), [], 2)])

    def release(self, seq_ids: list[str]) -> int:
        return self.table.release(seq_ids)
