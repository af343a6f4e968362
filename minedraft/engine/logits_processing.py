"""What depends on the tokens so far: repetition, frequency and presence penalties, and min_tokens.

Applied to the draft's logits before it samples and to every one of the target's verify positions (each with
its own history: the verified tokens plus the drafts before it), so q is the distribution the draft really
sampled from and p is what plain decoding would sample from: rejection sampling stays exact. The semantics are
vLLM's (and OpenAI's): the repetition penalty divides a positive logit (multiplies a negative one) of every
token seen in the prompt or the output; frequency and presence penalties subtract per output occurrence and
once per output token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from minedraft.engine.sampling import Sampling, widened


class Logprob(NamedTuple):
    token: int
    logprob: float
    top_ids: list[int]  # the most likely tokens at this position, best first
    top_logprobs: list[float]


def adjust(logits: torch.Tensor, sampling: Sampling, tokens: list[int], first: int) -> torch.Tensor:
    """Logits [rows, vocab] where row j continues tokens[:first + j]; unchanged when nothing applies."""
    if not sampling.adjusts_logits:
        return logits
    rows, vocab = logits.shape
    out = logits.to(widened(logits.dtype), copy=True)
    # Host lists reach the device without waiting for it (no sync: see sampling's note).
    history = torch.tensor(tokens[:first + rows - 1], dtype=torch.long).to(logits.device, non_blocking=True)
    held = torch.tensor([t for t in sampling.held_tokens if 0 <= t < vocab], dtype=torch.long)
    held = held.to(logits.device, non_blocking=True)
    for j in range(rows):
        end = first + j
        row = out[j]
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=row.device)
            seen[history[:end]] = True
            penalised = torch.where(row > 0, row / sampling.repetition_penalty, row * sampling.repetition_penalty)
            row.copy_(torch.where(seen, penalised, row))
        output = history[sampling.prompt_len:end]
        if sampling.frequency_penalty or sampling.presence_penalty:
            counts = torch.zeros_like(row).scatter_add_(0, output, torch.ones_like(output, dtype=row.dtype))
            row.sub_(sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0).to(row.dtype))
        if end - sampling.prompt_len < sampling.min_tokens and sampling.held_tokens:
            row.index_fill_(0, held, float("-inf"))
    return out


def log_distribution(logits: torch.Tensor, sampling: Sampling, probs: torch.Tensor | None) -> torch.Tensor:
    """Log-probabilities [rows, vocab] of the distribution tokens are drawn from: the warped `probs` when
    sampling; when greedy (a point mass), the adjusted logits' softmax at temperature 1."""
    if sampling.greedy or probs is None:
        return torch.log_softmax(logits.float(), dim=-1)
    return torch.log(probs)


def token_logprobs(log_dist: torch.Tensor, tokens: list[int], top: int) -> list[Logprob]:
    """Row i's token i with its log-probability and the row's `top` most likely tokens."""
    picked = log_dist[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    if top > 0:
        values, ids = torch.topk(log_dist[:len(tokens)], min(top, log_dist.shape[-1]), dim=-1)
        tops = list(zip(ids.tolist(), values.tolist(), strict=True))
    else:
        tops = [([], [])] * len(tokens)
    return [Logprob(token, logprob, top_ids, top_values)
            for token, logprob, (top_ids, top_values) in zip(tokens, picked, tops, strict=True)]
