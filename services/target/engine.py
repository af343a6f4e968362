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
from minedraft.engine.sampling import TARGET_STREAM, Sampling, widened
from minedraft.engine.sequence_table import SequenceTable
from minedraft.engine.verification import Drafts, Judged, judge
from minedraft.errors import InvalidArgument, ServiceError

DEFAULT_MAX_DRAFTS = 32


MAX_SUPPORT = 256  # a draft position's q support (the draft sends its top-m, m = 32): bounds a batch's tensors


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
        states = [state for _, state in checked]
        logits = self.runner.forward(ran, logits_to_keep=1)
        try:
            row_of = {id(state): row for state, row in zip(ran, logits, strict=True)}
            for parent, child in copies:
                copy_prompt_cache(self.runner, parent, child)
                row_of[id(child)] = row_of[id(parent)]
            verdicts = self._judge(torch.stack([row_of[id(state)] for state in states]), [[] for _ in states],
                                   states, [len(state.tokens) for state in states])
        except BaseException:  # none of them is held yet: their cache space goes back
            for state in states:
                self.runner.drop(state)
            raise
        for (i, state), verdict in zip(checked, verdicts, strict=True):
            results[i] = verdict
            if isinstance(verdict, ServiceError):
                self.runner.drop(state)
                continue
            state.tokens.append(verdict.next_token)
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
            verdicts = self._judge(logits, [drafts for *_, drafts in checked], [state for _, state, _ in checked],
                                   [committed[i] for i, _, _ in checked])
        except BaseException:  # nothing happened: every sequence back to what it held
            for i, state, _ in checked:
                state.truncate(committed[i])
            raise
        for (i, state, _), verdict in zip(checked, verdicts, strict=True):
            results[i] = verdict
            if isinstance(verdict, ServiceError):
                state.truncate(committed[i])
                continue
            state.truncate(committed[i] + verdict.accepted)
            state.tokens.append(verdict.next_token)
        return results

    def _check_drafts(self, seq_id: str, state: SequenceState, drafts: Drafts) -> None:
        if len(drafts) > self.max_drafts:
            raise InvalidArgument(f"{seq_id}: {len(drafts)} drafts; at most {self.max_drafts}")
        self.table.check_tokens([d[0] for d in drafts], extra=len(state.tokens) + 1)
        for token, support, probs in drafts:
            if not support or len(support) != len(probs) or token not in support or len(set(support)) < len(support) \
                    or len(support) > MAX_SUPPORT:
                raise InvalidArgument(f"{seq_id}: malformed draft distribution")
            self.table.check_tokens(support)
            if not all(math.isfinite(p) and 0 <= p <= 1 for p in probs):
                raise InvalidArgument(f"{seq_id}: draft probabilities must be in [0, 1]")

    @staticmethod
    def _judge(logits: torch.Tensor, drafts: list[Drafts], states: list[SequenceState],
               firsts: list[int]) -> list[Verdict | ServiceError]:
        """Each row's verdict from logits [rows, P, vocab] (right-aligned; row i continues its tokens[:firsts[i]]):
        one batched judgement after each row's history-dependent adjustments, and log-probabilities where asked."""
        positions, scores = logits.shape[1], logits
        starts = [positions - len(d) - 1 for d in drafts]
        if any(state.sampling.adjusts_logits for state in states):
            scores = logits.to(widened(logits.dtype), copy=True)
            for row, state in enumerate(states):
                scores[row, starts[row]:] = adjust(logits[row, starts[row]:], state.sampling, state.tokens,
                                                   firsts[row])
        judged = judge(scores, drafts, [s.sampling for s in states], [s.generator for s in states])
        verdicts: list[Verdict | ServiceError] = []
        for row, (state, row_drafts) in enumerate(zip(states, drafts, strict=True)):
            accepted, token = judged.accepted[row], judged.next_tokens[row]
            if not judged.ok[row]:  # a sampler fault (no finite mass) is this sequence's alone
                verdicts.append(ServiceError("sampling failed: the target distribution holds no finite mass"))
            elif state.sampling.logprobs < 0:
                verdicts.append(Verdict(accepted, token))
            else:
                emitted = scores[row, starts[row]:starts[row] + accepted + 1]
                verdicts.append(Verdict(accepted, token, _logprobs(emitted, judged, row, starts[row], state.sampling,
                                                                   [*(d[0] for d in row_drafts[:accepted]), token])))
        return verdicts

    def warm_up(self) -> None:
        """A prompt and a decode step of a throwaway sequence, so the first request pays no first-call costs."""
        self.prefill([("warm-up", [0, 1, 2, 3], Sampling())])
        self.verify([("warm-up", [])])
        self.release(["warm-up"])

    def release(self, seq_ids: list[str], owner: str | None = None) -> int:
        return self.table.release(seq_ids, owner)


def _logprobs(emitted: torch.Tensor, judged: Judged, row: int, start: int, sampling: Sampling,
              tokens: list[int]) -> list[Logprob]:
    """The log-probabilities of the tokens a row puts out (a host copy of its own: only rows that ask pay it)."""
    probs = None
    if row in judged.sampled:
        probs = judged.probs[judged.sampled.index(row), start:start + len(tokens)]
    return token_logprobs(log_distribution(emitted, sampling, probs), tokens, sampling.logprobs)
