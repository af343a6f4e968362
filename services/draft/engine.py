"""Draft-side model work: caching prompts and proposing k tokens for a whole batch.

As on the target, each sequence is checked before anything changes, and one that fails gets its own error
beside the others' results."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minedraft.engine.forking import copy_prompt_cache, split_shared
from minedraft.engine.logits_processing import adjust
from minedraft.engine.model_runner import ModelRunner, SequenceState
from minedraft.engine.sampling import DRAFT_STREAM, Sampling, draft_rows, to_host, widened
from minedraft.engine.sequence_table import SequenceTable
from minedraft.errors import InvalidArgument, ServiceError

DEFAULT_MAX_K = 32


@dataclass
class ProposedToken:
    token_id: int
    support: list[int]  # q's token ids
    probs: list[float]  # q's probabilities on them
    logprob: float = 0.0  # the draft's log-probability of the token, when asked for (see common.proto)


class DraftEngine:
    def __init__(self, runner: ModelRunner, top_m: int = 32, max_sequences: int = 1 << 30,
                 max_k: int = DEFAULT_MAX_K, lease_s: float = 60.0) -> None:
        self.runner = runner
        self.top_m = top_m
        self.max_k = max_k
        self.table = SequenceTable(runner.max_context, runner.vocab_size, on_drop=runner.drop,
                                   max_sequences=max_sequences, lease_s=lease_s)

    def prefill(self, seqs: list[tuple[str, list[int], Sampling]], owner: str = "",
                replace: frozenset[str] = frozenset(),
                same_prompt_as: dict[str, str] | None = None) -> list[ServiceError | None]:
        """Caches each prompt in one batched forward; returns each sequence's error (None: held now).

        Ids in `replace` may be held by the owner already, and are replaced (a re-sync after a timeout).
        `same_prompt_as`: as on the target, a sequence copies an earlier one's cache (n samples of one prompt)."""
        self.table.check_batch([seq_id for seq_id, *_ in seqs])
        errors: list[ServiceError | None] = [None] * len(seqs)
        checked: list[tuple[str, SequenceState]] = []
        for i, (seq_id, tokens, sampling) in enumerate(seqs):
            try:
                state = self.table.new_state(seq_id, tokens, sampling, DRAFT_STREAM, self.runner.device, owner,
                                             replace=seq_id in replace)
                if seq_id not in self.table:  # a replaced one takes its own old room
                    self.table.check_room(len(checked) - self._replaced(checked), self.runner.free_slots)
                checked.append((seq_id, state))
            except ServiceError as error:
                errors[i] = error
        self.table.release([seq_id for seq_id, _ in checked], owner)  # replaced ones: their space first
        if checked:
            ran, copies = split_shared(checked, same_prompt_as or {})
            self.runner.forward(ran, logits_to_keep=1)
            try:
                for parent, child in copies:
                    copy_prompt_cache(self.runner, parent, child)
            except BaseException:  # none of them is held yet: their cache space goes back
                for _, state in checked:
                    self.runner.drop(state)
                raise
        for seq_id, state in checked:
            self.table.put(seq_id, state)
        return errors

    def _replaced(self, checked: list[tuple[str, SequenceState]]) -> int:
        return sum(1 for seq_id, _ in checked if seq_id in self.table)

    def propose(self, seqs: list[tuple[str, int, list[int], int]], owner: str = "",
                with_logprobs: bool = False, stop_below: float = 0.0) -> list[list[ProposedToken] | ServiceError]:
        """For each (seq_id, keep, append, k): apply the commit, then draft up to k tokens (or report its error).

        One batched forward per draft position; sequences asking for fewer tokens drop out early, and so does
        one whose latest draft the draft model itself gave less than `stop_below` probability (the next would
        likely be rejected too: drafting it costs a step that buys nothing). A failed call leaves every
        sequence holding its verified tokens (the commit) only."""
        self.table.check_batch([seq_id for seq_id, *_ in seqs])
        results: list[list[ProposedToken] | ServiceError] = [[] for _ in seqs]
        checked: list[tuple[int, SequenceState, int, list[int], int]] = []
        for i, (seq_id, keep, append, k) in enumerate(seqs):
            try:
                state = self.table.get(seq_id, owner)
                if keep > len(state.tokens) or keep + len(append) == 0:
                    raise InvalidArgument(f"{seq_id}: cannot keep {keep} of {len(state.tokens)} tokens held")
                if k > self.max_k:
                    raise InvalidArgument(f"{seq_id}: k={k}; at most {self.max_k}")
                self.table.check_tokens(append, extra=keep + k)
                checked.append((i, state, keep, append, k))
            except ServiceError as error:
                results[i] = error
        for _, state, keep, append, _ in checked:  # all checked: now mutate
            state.truncate(keep)
            state.tokens.extend(append)
        try:
            self._draft(checked, results, with_logprobs, stop_below)
        except BaseException:
            for _, state, keep, append, _ in checked:
                state.truncate(keep + len(append))
            raise
        return results

    def _draft(self, checked: list[tuple[int, SequenceState, int, list[int], int]],
               results: list[list[ProposedToken] | ServiceError], with_logprobs: bool, stop_below: float) -> None:
        """One batched forward and one batched draw per position; one host copy of each position's draws."""
        finished: set[int] = set()  # failed, or stopped by `stop_below`
        for step in range(max((k for *_, k in checked), default=0)):
            active = [(i, state) for i, state, *_, k in checked if k > step and i not in finished]
            if not active:
                break
            logits = self.runner.forward([state for _, state in active], logits_to_keep=1)[:, -1]
            if any(state.sampling.adjusts_logits for _, state in active):
                wide = widened(logits.dtype)
                logits = torch.stack([adjust(row[None], state.sampling, state.tokens, len(state.tokens))[0].to(wide)
                                      for row, (_, state) in zip(logits, active, strict=True)])
            samplings = [state.sampling for _, state in active]
            tokens, ids, q, ok = draft_rows(logits, samplings, self.top_m, [state.generator for _, state in active])
            columns = [tokens[:, None].double(), ok[:, None].double(), ids.double(), q.double()]
            if with_logprobs or stop_below > 0:  # the early stop reads the same log-probability
                columns.append(draft_logprobs(logits, tokens, ids, q, samplings)[:, None])
            host = to_host(torch.cat(columns, dim=-1))  # ids are exact in float64 (below 2**53)
            m = ids.shape[1]
            for (i, state), values in zip(active, host, strict=True):
                if not values[1]:  # a sampler fault is this sequence's alone: it keeps its commit
                    state.truncate(len(state.tokens) - len(results[i]))
                    results[i] = ServiceError("draft sampling failed: the draft distribution holds no finite mass")
                    finished.add(i)
                    continue
                token = int(values[0])
                support = [(int(t), p) for t, p in zip(values[2:2 + m], values[2 + m:2 + 2 * m], strict=True) if p > 0]
                state.tokens.append(token)
                logprob = values[-1] if with_logprobs or stop_below > 0 else 0.0
                results[i].append(ProposedToken(token, [t for t, _ in support], [p for _, p in support],
                                                logprob if with_logprobs else 0.0))
                if stop_below > 0 and math.exp(logprob) < stop_below:
                    finished.add(i)

    def warm_up(self) -> None:
        """A prompt and a proposal of a throwaway sequence, so the first request pays no first-call costs."""
        self.prefill([("warm-up", [0, 1, 2, 3], Sampling())])
        self.propose([("warm-up", 4, [], 2)], stop_below=1e-9)  # its early-stop check too
        self.release(["warm-up"])

    def release(self, seq_ids: list[str], owner: str | None = None) -> int:
        return self.table.release(seq_ids, owner)


def draft_logprobs(logits: torch.Tensor, tokens: torch.Tensor, ids: torch.Tensor, q: torch.Tensor,
                   samplings: list[Sampling]) -> torch.Tensor:
    """log q(token) per row [rows] when sampling; when greedy (q is a point mass), the logits' softmax at
    temperature 1 (see common.proto)."""
    greedy = torch.tensor([s.greedy for s in samplings]).to(logits.device, non_blocking=True)
    plain = torch.log_softmax(logits.double(), dim=-1).gather(-1, tokens[:, None])[:, 0]
    drawn = torch.log((q.double() * (ids == tokens[:, None])).sum(dim=-1))
    return torch.where(greedy, plain, drawn)
