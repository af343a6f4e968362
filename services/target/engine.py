"""Target-side model work: prompts, and verification of a whole batch of drafts in one forward."""

from __future__ import annotations

from minedraft.errors import InvalidArgument
from minedraft.model_runner import ModelRunner
from minedraft.sampling import (
    TARGET_STREAM,
    Sampling,
    next_token,
    verify_greedy,
    verify_sampled,
    warp,
)
from minedraft.sequence_table import SequenceTable

Drafts = list[tuple[int, list[int], list[float]]]  # (token, q support ids, q probs) per position


class TargetEngine:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.table = SequenceTable(runner.max_context, runner.vocab_size, on_drop=runner.drop)

    def prefill(self, seqs: list[tuple[str, list[int], Sampling]]) -> list[int]:
        """Runs each prompt (one batched forward) and returns each sequence's first token."""
        states = self.table.new_states(seqs, TARGET_STREAM, self.runner.device, room=1)
        logits = self.runner.forward(states, logits_to_keep=1)[:, -1]
        firsts = []
        for (seq_id, _, _), state, row in zip(seqs, states, logits, strict=True):
            token = next_token(row, state.extra["sampling"], state.extra["generator"])
            state.tokens.append(token)
            self.table.put(seq_id, state)
            firsts.append(token)
        return firsts

    def verify(self, seqs: list[tuple[str, Drafts]]) -> list[tuple[int, int]]:
        """Scores all drafts in one batched forward; returns (accepted, next token) per sequence.

        Each sequence's state afterwards holds its accepted drafts and the next token.
        """
        self.table.check_batch([seq_id for seq_id, _ in seqs])
        states = [self.table.get(seq_id) for seq_id, _ in seqs]
        for state, (seq_id, drafts) in zip(states, seqs, strict=True):
            self.table.check_tokens([d[0] for d in drafts], extra=len(state.tokens) + 1)
            if any(not support or len(support) != len(probs) for _, support, probs in drafts):
                raise InvalidArgument(f"{seq_id}: malformed draft distribution")
        committed = [len(state.tokens) for state in states]
        for state, (_, drafts) in zip(states, seqs, strict=True):
            state.tokens.extend(d[0] for d in drafts)
        keep = 1 + max(len(drafts) for _, drafts in seqs)
        logits = self.runner.forward(states, logits_to_keep=keep)
        verdicts = []
        for i, (state, (_, drafts)) in enumerate(zip(states, seqs, strict=True)):
            rows = logits[i, keep - len(drafts) - 1:]
            sampling: Sampling = state.extra["sampling"]
            tokens = [d[0] for d in drafts]
            if sampling.greedy:
                accepted, token = verify_greedy(rows, tokens)
            else:
                accepted, token = verify_sampled(warp(rows, sampling), tokens, [d[1:] for d in drafts],
                                                 state.extra["generator"])
            state.truncate(committed[i] + accepted)
            state.tokens.append(token)
            verdicts.append((accepted, token))
        return verdicts

    def step_once(self, seq_id: str) -> None:
        """Decodes one token for a held sequence (warm-up)."""
        self.verify([(seq_id, [])])

    def release(self, seq_ids: list[str]) -> int:
        return self.table.release(seq_ids)
