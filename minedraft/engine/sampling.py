"""Sampling settings and batched, sync-free sampling: the draft's truncated q and the warped distributions.

The draft samples from a truncated distribution q (its top-m tokens, renormalised) and ships only that
support; the target's verification (`verification`) accepts against it. Every function here works on a whole
batch at once, each row with its own settings and its own random stream, so a row's result never depends on
the rest of its batch. Draws come from the row's generator on the device, never through the host: a token is
drawn by an exponential race, argmax(w / E) with E ~ Exp(1), which picks i with probability w_i / sum(w)
(gpt-fast's sync-free sampling). Results reach the host through `to_host`, once per call (or per draft step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minedraft.protos import common_pb2

# Distinct streams for the draft and the target: a shared stream would correlate the draft's
# sample with the target's acceptance test and bias the output.
DRAFT_STREAM, TARGET_STREAM = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9
CANDIDATES = 1024  # on a CPU, the likeliest tokens top-k and top-p rank when a row's choice lies within them
# Below this, logits / temperature can overflow float32 (inf - inf = nan in softmax): a setting is refused.
MIN_TEMPERATURE = 1e-3
ARGMAX_BLOCK = 16  # rows `greedy_argmax` widens at a time: a few MB of float32 that stay in cache


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_tokens: int = 0
    held_tokens: tuple[int, ...] = ()  # kept out until min_tokens tokens are out (EOS, stop token ids)
    prompt_len: int = 0  # where the output begins (penalties and min_tokens count the tokens after it)
    logprobs: int = -1  # -1: none; else the token's log-probability and this many top alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits depend on the tokens so far (penalties, min_tokens): logits_processing.adjust."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or (self.min_tokens > 0 and bool(self.held_tokens)))

    @classmethod
    def from_proto(cls, msg) -> Sampling:
        def optional(name: str, absent: float) -> float:
            return getattr(msg, name) if msg.HasField(name) else absent
        return cls(temperature=msg.temperature, top_p=optional("top_p", 1.0), top_k=msg.top_k, seed=msg.seed,
                   min_p=optional("min_p", 0.0), repetition_penalty=optional("repetition_penalty", 1.0),
                   frequency_penalty=msg.frequency_penalty, presence_penalty=msg.presence_penalty,
                   min_tokens=msg.min_tokens, held_tokens=tuple(msg.held_tokens), prompt_len=msg.prompt_len,
                   logprobs=int(optional("logprobs", -1)))

    def to_proto(self) -> common_pb2.SamplingParams:
        msg = common_pb2.SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
            min_tokens=self.min_tokens, held_tokens=self.held_tokens, prompt_len=self.prompt_len)
        if self.logprobs >= 0:
            msg.logprobs = self.logprobs
        return msg


def make_generator(seed: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed((seed ^ stream) & 0x7FFF_FFFF_FFFF_FFFF)
    return generator


def to_host(tensor: torch.Tensor) -> list:
    """The one device-to-host copy of a step's results (each call is a host sync on a GPU)."""
    return tensor.cpu().tolist()


def widened(dtype: torch.dtype) -> torch.dtype:
    """The dtype logits are adjusted and warped in: float64 stays, anything narrower becomes float32 (exactly)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def column(values: Sequence[float | int], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-row settings as a [rows, 1, ...] tensor on `like`'s device, copied without waiting for the device."""
    shape = (len(values),) + (1,) * (like.dim() - 1)
    return torch.tensor(values, dtype=dtype or like.dtype).view(shape).to(like.device, non_blocking=True)


def warp_rows(logits: torch.Tensor, samplings: Sequence[Sampling]) -> torch.Tensor:
    """Probabilities [rows, ..., vocab] after each row's temperature, top-k, top-p (nucleus) and min-p filtering.

    A greedy row is warped at temperature 1 (its probabilities are not sampled from)."""
    logits = logits.to(widened(logits.dtype))
    vocab = logits.shape[-1]
    logits = logits / column([s.temperature if not s.greedy else 1.0 for s in samplings], logits)
    top_k = [s.top_k if 0 < s.top_k < vocab else vocab for s in samplings]
    top_p = [s.top_p if 0.0 < s.top_p < 1.0 else 2.0 for s in samplings]  # 2.0: never reached, keeps all
    # Each row takes the same arithmetic whatever the rest of its batch asks for (batching never changes a row).
    probs = torch.softmax(logits, dim=-1)
    if min(top_k) < vocab or min(top_p) < 1.0:
        wants = column([k < vocab or p < 1.0 for k, p in zip(top_k, top_p, strict=True)], probs, torch.bool)
        probs = torch.where(wants, _nucleus(probs, top_k, top_p), probs)
    min_p = [s.min_p for s in samplings]
    if max(min_p) > 0.0:  # scale-free: the same tokens go before or after renormalising
        kept = probs.masked_fill(probs < column(min_p, probs) * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = torch.where(column([p > 0.0 for p in min_p], probs, torch.bool),
                            kept / kept.sum(dim=-1, keepdim=True), probs)
    return probs


def _nucleus(probs: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Each row's top-k, then top-p, renormalised. A full sort of the vocabulary costs a CPU ~30 ms a position,
    so there a row whose top-k and nucleus lie within its CANDIDATES likeliest tokens ranks only those (the
    same tokens kept; deciding it reads the host, free on a CPU); on a GPU every row is sorted whole."""
    vocab = probs.shape[-1]
    if probs.device.type != "cpu" or vocab <= CANDIDATES:
        return _ranked_filter(probs, top_k, top_p, vocab)
    head = torch.topk(probs, CANDIDATES, dim=-1).values.sum(dim=-1).reshape(len(top_k), -1).amin(dim=-1)  # worst
    short = [(k <= CANDIDATES or k >= vocab) and (p >= 1.0 or mass >= p)
             for k, p, mass in zip(top_k, top_p, head.tolist(), strict=True)]
    out = torch.empty_like(probs)
    for fits, size in ((True, CANDIDATES), (False, vocab)):
        rows = [i for i, ok in enumerate(short) if ok == fits]
        if rows:
            out[rows] = _ranked_filter(probs[rows], [top_k[i] for i in rows], [top_p[i] for i in rows], size)
    return out


def _ranked_filter(probs: torch.Tensor, top_k: list[int], top_p: list[float], size: int) -> torch.Tensor:
    """top-k and top-p over each row's `size` likeliest tokens (the rest dropped: the caller checked they would be)."""
    ranked, order = torch.topk(probs, size, dim=-1) if size < probs.shape[-1] else \
        torch.sort(probs, dim=-1, descending=True)
    rank = torch.arange(size, device=probs.device)
    ranked = ranked.masked_fill(rank >= column(top_k, ranked, torch.long), 0.0)
    # With top-k, top-p works on the k tokens renormalised; without, on the full distribution.
    with_k = column([k < probs.shape[-1] for k in top_k], ranked, torch.bool)
    ranked = torch.where(with_k, ranked / ranked.sum(dim=-1, keepdim=True), ranked)
    # Drop a token once the tokens ranked above it already hold top_p of the mass.
    ranked = ranked.masked_fill((torch.cumsum(ranked, dim=-1) - ranked) >= column(top_p, ranked), 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, ranked)
    return kept / kept.sum(dim=-1, keepdim=True)


def warp(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """`warp_rows` with one setting for every row."""
    return warp_rows(logits, [sampling] * logits.shape[0])


def race(weights: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One draw per row [rows], with probability proportional to that row's non-negative weights."""
    noise = torch.stack([torch.empty(weights.shape[-1], dtype=weights.dtype, device=weights.device)
                         .exponential_(generator=generator) for generator in generators])
    # E = 0 (a float's rounding of a tiny draw) wins the race, as its limit would; 0/0 must not become NaN.
    return (weights / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def healthy(probs: torch.Tensor) -> torch.Tensor:
    """Rows [rows] whose distribution can be sampled: finite, with some mass (a NaN logit is that row's fault)."""
    return torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1), faster for half precision on the CPU, where torch's argmax has no vectorised
    bfloat16/float16 path (0.49 vs 0.13 ms over one 152k-token row, 9.9-10.0 vs 2.0-2.1 ms over 8 x 5). Rows are widened
    to float32 a block at a time first: exact (every half value is a float32) under the same first-maximum rule
    (NaN counting as the maximum), so the same index, tie or not."""
    if logits.device.type != "cpu" or logits.dtype not in (torch.bfloat16, torch.float16) or not logits.numel():
        return logits.argmax(dim=-1)
    flat = logits.reshape(-1, logits.shape[-1])
    blocks = [block.float().argmax(dim=-1) for block in flat.split(ARGMAX_BLOCK)]
    return torch.cat(blocks).view(logits.shape[:-1])


def draft_rows(logits: torch.Tensor, samplings: Sequence[Sampling], top_m: int,
               generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The draft's step for a batch: each row's token from q = the top-m of its warped distribution, renormalised.

    Returns tokens [rows], q's support ids and probabilities [rows, m] (0 past a row's support; greedy: the
    argmax with q = 1) and whether each row could be sampled [rows]."""
    rows, vocab = logits.shape
    m = min(top_m, vocab)
    tokens = greedy_argmax(logits)
    ids = torch.zeros((rows, m), dtype=torch.long, device=logits.device)
    ids[:, 0] = tokens
    q = torch.zeros((rows, m), dtype=widened(logits.dtype), device=logits.device)
    q[:, 0] = 1.0
    ok = torch.ones(rows, dtype=torch.bool, device=logits.device)
    sampled = [i for i, s in enumerate(samplings) if not s.greedy]
    if sampled:
        index = torch.tensor(sampled).to(logits.device, non_blocking=True)
        probs = warp_rows(logits.index_select(0, index), [samplings[i] for i in sampled])
        top, top_ids = torch.topk(probs, m, dim=-1)
        top_q = top / top.sum(dim=-1, keepdim=True)
        chosen = race(top_q, [generators[i] for i in sampled])
        tokens = tokens.index_copy(0, index, top_ids.gather(-1, chosen[:, None])[:, 0])
        ids = ids.index_copy(0, index, top_ids)
        q = q.index_copy(0, index, top_q.to(q.dtype))
        ok = ok.index_copy(0, index, healthy(top_q))
    return tokens, ids, q, ok


def sample_truncated(logits: torch.Tensor, sampling: Sampling, top_m: int,
                     generator: torch.Generator) -> tuple[int, list[int], list[float]]:
    """One row of `draft_rows`: the token and q's support with its probabilities."""
    tokens, ids, q, ok = draft_rows(logits[None], [sampling], top_m, [generator])
    if not to_host(ok)[0]:
        raise RuntimeError("the draft distribution holds no finite mass")
    support = [(i, p) for i, p in zip(to_host(ids[0]), to_host(q[0]), strict=True) if p > 0]
    return to_host(tokens)[0], [i for i, _ in support], [p for _, p in support]
