"""Lossless verification of a whole batch of drafts in one pass (Leviathan et al. 2023; Chen et al. 2023).

Greedy rows keep drafts while each equals the target's argmax. Sampled rows accept draft x with probability
min(1, p(x)/q(x)) and, at the first rejection, draw from normalize(max(p - q, 0)); since q is exactly the
distribution the draft drew from (its top-m support, renormalised), the output follows the target's p. Every
row is judged at once on the device, each with its own random stream; one copy brings the verdicts to the host.

Positions are right-aligned, as the model runner returns them: a row with n drafts owns the last n + 1 of the
batch's P positions, and its draft i is judged by position P - n - 1 + i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minedraft.engine.sampling import Sampling, column, greedy_argmax, healthy, race, to_host, warp_rows

Drafts = list[tuple[int, list[int], list[float]]]  # (token, q support ids, q probs) per position


@dataclass
class Judged:
    """Each row's accepted drafts, next token and health [rows] (host lists), and the warped probabilities of
    the sampled rows (for log-probabilities), indexed as `sampled`."""

    accepted: list[int]
    next_tokens: list[int]
    ok: list[bool]
    probs: torch.Tensor | None
    sampled: list[int]


def judge(logits: torch.Tensor, drafts: Sequence[Drafts], samplings: Sequence[Sampling],
          generators: Sequence[torch.Generator | None]) -> Judged:
    """Verdicts for every row of logits [rows, P, vocab] (P >= 1 + each row's drafts), with one host copy."""
    rows, positions, _ = logits.shape
    device = logits.device
    counts = [len(d) for d in drafts]
    pads = [positions - 1 - n for n in counts]
    tokens = torch.zeros((rows, positions - 1), dtype=torch.long)
    valid = torch.zeros((rows, positions - 1), dtype=torch.bool)
    for row, (pad, row_drafts) in enumerate(zip(pads, drafts, strict=True)):
        tokens[row, pad:] = torch.tensor([d[0] for d in row_drafts], dtype=torch.long)
        valid[row, pad:] = True
    tokens, valid = tokens.to(device, non_blocking=True), valid.to(device, non_blocking=True)
    best = greedy_argmax(logits)  # [rows, P]
    matched = (best[:, :-1] == tokens) | ~valid
    ok = torch.ones(rows, dtype=torch.bool, device=device)
    sampled = [row for row, s in enumerate(samplings) if not s.greedy]
    probs = None
    if sampled:
        index = torch.tensor(sampled).to(device, non_blocking=True)
        probs, s_matched, s_next, s_ok = _judge_sampled(logits, sampled, index, tokens, valid, drafts, pads,
                                                        samplings, generators)
        matched = matched.index_copy(0, index, s_matched)
        ok = ok.index_copy(0, index, s_ok)
    pad = column(pads, best, torch.long)
    accepted = matched.long().cumprod(dim=-1).sum(dim=-1) - pad[:, 0]
    at = pad + accepted[:, None]  # each row's first rejected (or bonus) position
    next_tokens = best.gather(-1, at)[:, 0]
    if sampled:
        next_tokens = next_tokens.index_copy(0, index, s_next)
    host = to_host(torch.stack([accepted, next_tokens, ok.long()], dim=-1))
    return Judged([h[0] for h in host], [h[1] for h in host], [bool(h[2]) for h in host], probs, sampled)


def _judge_sampled(logits: torch.Tensor, sampled: list[int], index: torch.Tensor, tokens: torch.Tensor,
                   valid: torch.Tensor,
                   drafts: Sequence[Drafts], pads: list[int], samplings: Sequence[Sampling],
                   generators: Sequence[torch.Generator | None]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the sampled rows: their warped probabilities, which drafts pass the test u * q(x) < p(x), the token
    each row draws where it stops (from the residual at its first rejection, or p at the bonus position), and
    whether that distribution could be sampled."""
    device, positions = logits.device, logits.shape[1]
    probs = warp_rows(logits.index_select(0, index), [samplings[r] for r in sampled])  # [S, P, V]
    width = max((len(ids) for r in sampled for _, ids, _ in drafts[r]), default=1)
    q_x = torch.ones((len(sampled), positions - 1), dtype=probs.dtype)
    q_ids = torch.zeros((len(sampled), positions, width), dtype=torch.long)
    q_probs = torch.zeros((len(sampled), positions, width), dtype=probs.dtype)
    for s, row in enumerate(sampled):
        for i, (token, ids, q) in enumerate(drafts[row]):
            q_x[s, pads[row] + i] = q[ids.index(token)]
            q_ids[s, pads[row] + i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            q_probs[s, pads[row] + i, :len(q)] = torch.tensor(q, dtype=probs.dtype)
    q_x, q_ids, q_probs = (t.to(device, non_blocking=True) for t in (q_x, q_ids, q_probs))
    uniforms = torch.ones((len(sampled), positions - 1), dtype=probs.dtype, device=device)
    for s, row in enumerate(sampled):  # each row's own stream: as many draws as it has drafts
        n = len(drafts[row])
        if n:
            uniforms[s, pads[row]:] = torch.rand(n, dtype=probs.dtype, device=device, generator=generators[row])
    s_tokens, s_valid = tokens.index_select(0, index), valid.index_select(0, index)
    p_x = probs[:, :-1].gather(-1, s_tokens[..., None])[..., 0]
    matched = ((q_x > 0) & (uniforms * q_x < p_x)) | ~s_valid  # u < p/q, without dividing
    # One draw per row, where it stops: q there is zero at the bonus position, so the residual is p itself.
    stop = matched.long().cumprod(dim=-1).sum(dim=-1)  # positions passed, padding included
    every = torch.arange(len(sampled), device=device)
    p_stop = probs[every, stop]  # [S, V]
    q_stop = torch.zeros_like(p_stop).scatter_add_(-1, q_ids[every, stop], q_probs[every, stop])
    residual = (p_stop - q_stop).clamp_(min=0)
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_stop)  # p == q up to rounding
    return probs, matched, race(residual, [generators[r] for r in sampled]), healthy(p_stop)


def verify_greedy(logits: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    """One row's logits [>= k+1, vocab], draft i judged by row i: (accepted, next token)."""
    verdict = judge(logits[None, :len(drafts) + 1], [[(t, [t], [1.0]) for t in drafts]], [Sampling()], [None])
    return verdict.accepted[0], verdict.next_tokens[0]


def verify_sampled(probs: torch.Tensor, drafts: list[int], q_support: list[tuple[list[int], list[float]]],
                   generator: torch.Generator) -> tuple[int, int]:
    """One row's already-warped probabilities [>= k+1, vocab], draft i judged by row i (warped again at
    temperature 1: unchanged, as log-probabilities): (accepted, next token)."""
    rows = [(t, ids, q) for t, (ids, q) in zip(drafts, q_support, strict=True)]
    verdict = judge(torch.log(probs[:len(drafts) + 1])[None], [rows], [Sampling(temperature=1.0)], [generator])
    if not verdict.ok[0]:
        raise RuntimeError("the target distribution holds no finite mass")
    return verdict.accepted[0], verdict.next_tokens[0]
