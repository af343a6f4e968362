"""Target-side model work: prompts, and verification of a whole batch of drafts in one forward.

Every call checks each sequence before it changes anything; a sequence that fails (unknown, malformed drafts,
no cache room, a sampler fault) gets its own error in the results and leaves the others' untouched."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from minedraft.engine.forking import copy_prompt_cache, split_shared
from minedraft.engine.logits_processing import Logprob, adjust, log_distribution, token_logprobs
from minedraft.engine.model_runner import ModelRunner, SequenceState
from minedraft.engine.sampling import TARGET_STREAM, Sampling, verify_greedy, verify_sampled, warp
from minedraft.engine.sequence_table import SequenceTable
from minedraft.errors import InvalidArgument, ServiceError

Drafts = list[tuple[int, list[int], list[float]]]  # (token, q support ids, q probs) per position
DEFAULT_MAX_DRAFTS = 32


class Verdict(NamedTuple):
    accepted: int  # leading drafts kept
    next_token: int  # the target's own token after them (a prefill's first token)
    logprobs: Sequence[Logprob] = ()  # one per token put out (accepted drafts, then next_token), when asked


class TargetEngine:
    def __init__(self, runner: ModelRunner, max_sequences: int = 1 << 30, max_drafts: int = DEFAULT_MAX_DRAFTS,
                 lease_s: float = 60.0) -> None:
        self.runner = runner
        self.max_drafts = max_drafts
        self.table = SequenceTable(runner.max_context, runner.vocab_size, on_drop=runner.drop,
                                   max_sequences=max_sequences, lease_s=lease_s)

    def prefill(self, seqs: list[tuple[str, list[int], Sampling]], owner: str = "",
                same_prompt_as: dict[str, str] | None = None) -> list[Verdict | ServiceError]:
        """Runs each prompt (one batched forward); returns each sequence's first token, or its error.

        `same_prompt_as` maps a sequence to an earlier one of this call with the same tokens: it copies that one's
        cache rather than running the prompt again, and samples its own first token (n samples of one prompt)."""
        self.table.check_batch([seq_id for seq_id, _, _ in seqs])
        results: list[Verdict | ServiceError] = [Verdict(0, 0)] * len(seqs)
        checked: list[tuple[int, SequenceState]] = []
        for i, (seq_id, tokens, sampling) in enumerate(seqs):
            try:
                state = self.table.new_state(seq_id, tokens, sampling, TARGET_STREAM, self.runner.device, owner,
                                             room=1)
                self.table.check_room(len(checked), self.runner.free_slots)
                checked.append((i, state))
            except ServiceError as error:
                results[i] = error
        if not checked:
            return results
        ran, copies = split_shared([(seqs[i][0], state) for i, state in checked], same_prompt_as or {})
        logits = self.runner.forward(ran, logits_to_keep=1)[:, -1]
        row_of = {id(state): row for state, row in zip(ran, logits, strict=True)}
        for parent, child in copies:
            copy_prompt_cache(self.runner, parent, child)
            row_of[id(child)] = row_of[id(parent)]
        for i, state in checked:
            try:
                row = adjust(row_of[id(state)][None], state.sampling, state.tokens, len(state.tokens))
                results[i] = self._judge(row, [], state)
            except RuntimeError as error:  # a sampler fault is this sequence's alone
                self.runner.drop(state)
                results[i] = ServiceError(f"sampling failed: {error}")  # INTERNAL: the server's fault
                continue
            state.tokens.append(results[i].next_token)
            self.table.put(seqs[i][0], state)
        return results

    def verify(self, seqs: list[tuple[str, Drafts]], owner: str = "") -> list[Verdict | ServiceError]:
        """Scores all drafts in one batched forward; returns each sequence's verdict, or its error.

        Each sequence's state afterwards holds its accepted drafts and the next token; a failed one is as
        before the call."""
        self.table.check_batch([seq_id for seq_id, _ in seqs])
        results: list[Verdict | ServiceError] = [Verdict(0, 0)] * len(seqs)
        checked: list[tuple[int, SequenceState, Drafts]] = []
        for i, (seq_id, drafts) in enumerate(seqs):
            try:
                state = self.table.get(seq_id, owner)
                self._check_drafts(seq_id, state, drafts)
                checked.append((i, state, drafts))
            except ServiceError as error:
                results[i] = error
        if not checked:
            return results
        committed = {i: len(state.tokens) for i, state, _ in checked}
        for _, state, drafts in checked:
            state.tokens.extend(d[0] for d in drafts)
        keep = 1 + max(len(drafts) for *_, drafts in checked)
        try:
            logits = self.runner.forward([state for _, state, _ in checked], logits_to_keep=keep)
        except BaseException:  # nothing happened: every sequence back to what it held
            for i, state, _ in checked:
                state.truncate(committed[i])
            raise
        for row, (i, state, drafts) in enumerate(checked):
            try:
                rows = adjust(logits[row, keep - len(drafts) - 1:], state.sampling, state.tokens, committed[i])
                verdict = self._judge(rows, drafts, state)
            except RuntimeError as error:
                state.truncate(committed[i])
                results[i] = ServiceError(f"sampling failed: {error}")
                continue
            results[i] = verdict
            state.truncate(committed[i] + verdict.accepted)
            state.tokens.append(verdict.next_token)
        return results

    def _check_drafts(self, seq_id: str, state: SequenceState, drafts: Drafts) -> None:
        if len(drafts) > self.max_drafts:
            raise InvalidArgument(f"{seq_id}: {len(drafts)} drafts; at most {self.max_drafts}")
        self.table.check_tokens([d[0] for d in drafts], extra=len(state.tokens) + 1)
        for token, support, probs in drafts:
            if not support or len(support) != len(probs) or token not in support:
                raise InvalidArgument(f"{seq_id}: malformed draft distribution")
            self.table.check_tokens(support)
            if not all(math.isfinite(p) and 0 <= p <= 1 for p in probs):
                raise InvalidArgument(f"{seq_id}: draft probabilities must be in [0, 1]")

    @staticmethod
    def _judge(rows: torch.Tensor, drafts: Drafts, state: SequenceState) -> Verdict:
        """The accepted drafts and the next token from the adjusted logits of each position, and (when asked)
        the log-probabilities of every token it puts out."""
        tokens, sampling = [d[0] for d in drafts], state.sampling
        probs = None
        if sampling.greedy:
            accepted, token = verify_greedy(rows, tokens)
        else:
            probs = warp(rows, sampling)
            accepted, token = verify_sampled(probs, tokens, [d[1:] for d in drafts], state.generator)
        if sampling.logprobs < 0:
            return Verdict(accepted, token)
        log_dist = log_distribution(rows[:accepted + 1], sampling, None if probs is None else probs[:accepted + 1])
        return Verdict(accepted, token, token_logprobs(log_dist, [*tokens[:accepted], token], sampling.logprobs))

    def warm_up(self) -> None:
        """A prompt and a decode step of a throwaway sequence, so the first request pays no first-call costs."""
        self.prefill([("warm-up", [0, 1, 2, 3], Sampling())])
        self.verify([("warm-up", [])])
        self.release(["warm-up"])

    def release(self, seq_ids: list[str], owner: str | None = None) -> int:
        return self.table.release(seq_ids, owner)
