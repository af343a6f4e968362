"""Sampling and lossless verification (Leviathan et al. 2023; Chen et al. 2023).

The draft samples from a truncated distribution q (its top-m tokens, renormalised) and ships only
that support. Since q really is the distribution the token came from, accepting with probability
min(1, p/q) and resampling rejections from normalize(max(p - q, 0)) keeps the output distributed
exactly as the target's p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minedraft.protos import common_pb2

# Distinct streams for the draft and the target: a shared stream would correlate the draft's
# sample with the target's acceptance test and bias the output.
DRAFT_STREAM, TARGET_STREAM = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9
# Below this, logits / temperature can overflow float32 (inf - inf = nan in softmax): a setting is refused.
MIN_TEMPERATURE = 1e-3


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


def warp(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Probabilities [rows, vocab] after temperature, top-k, top-p (nucleus) and min-p filtering."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0.0 < sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token once the tokens ranked above it already hold top_p of the mass.
        drop_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if sampling.min_p > 0.0:  # scale-free: the same tokens go before or after renormalising
        probs = probs.masked_fill(probs < sampling.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_token(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token from a single row of logits, as plain (target-only) decoding would pick it."""
    if sampling.greedy:
        return int(logits.argmax())
    return sample_token(warp(logits[None], sampling)[0], generator)


def sample_truncated(logits: torch.Tensor, sampling: Sampling, top_m: int,
                     generator: torch.Generator) -> tuple[int, list[int], list[float]]:
    """Draft sampling: a token from q = the top-m of the warped distribution, renormalised.

    Returns the token and q's support with its probabilities (greedy: the argmax with q = 1).
    """
    if sampling.greedy:
        token = int(logits.argmax())
        return token, [token], [1.0]
    probs = warp(logits[None], sampling)[0]
    values, ids = torch.topk(probs, min(top_m, probs.shape[-1]))
    keep = values > 0
    values, ids = values[keep], ids[keep]
    q = values / values.sum()
    token = int(ids[sample_token(q, generator)])
    return token, ids.tolist(), q.tolist()


def verify_greedy(logits: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    """Accepts drafts while each equals the target's argmax; returns (accepted, next token)."""
    best = logits.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == best[accepted]:
        accepted += 1
    return accepted, best[accepted]


def verify_sampled(probs: torch.Tensor, drafts: list[int], q_support: list[tuple[list[int], list[float]]],
                   generator: torch.Generator) -> tuple[int, int]:
    """Lossless rejection sampling.

    probs: the target's warped distributions [k+1, vocab]; drafts[i] was sampled from the sparse
    q_support[i] = (token ids, probabilities). Returns (accepted, next token).
    """
    for i, token in enumerate(drafts):
        ids, q_probs = q_support[i]
        q_row = torch.zeros_like(probs[i])
        q_row[torch.tensor(ids, device=probs.device)] = torch.tensor(q_probs, dtype=probs.dtype,
                                                                     device=probs.device)
        p_x, q_x = float(probs[i, token]), float(q_row[token])
        u = float(torch.rand((), generator=generator, device=generator.device))
        if q_x > 0 and u * q_x < p_x:  # u < p/q, without dividing
            continue
        residual = (probs[i] - q_row).clamp_(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any rejection is a rounding artefact
            residual = probs[i]
        return i, sample_token(residual / residual.sum(), generator)
    return len(drafts), sample_token(probs[len(drafts)], generator)
