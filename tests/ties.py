"""Speculation must never change a greedy token; in reduced precision a verify forward (k+1 tokens a row)
and a decode forward (one) round differently, so two tokens whose logits differ by less than that rounding
can trade places. A divergence between two modes is therefore allowed only at such a near-tie: at the first
differing position the model's own top-2 logits must lie within `tolerance`."""

from __future__ import annotations

import torch

from minedraft.engine.model_runner import SequenceState
from minedraft.engine.prompt_rows import feeding


def top2_gap(model, prompt_ids: list[int], generated: list[int]) -> float:
    tokens = prompt_ids + generated  # the output's rows computed as output (formats that compute prompts apart)
    with torch.no_grad(), feeding([SequenceState(tokens, prompt_len=len(prompt_ids))]):
        top = torch.topk(model(torch.tensor([tokens])).logits[0, -1].float(), 2).values
    return float(top[0] - top[1])


def assert_same_or_tie(model, tokenizer, prompts: list[str], expected: list[list[int]], actual: list[list[int]],
                       tolerance: float) -> int:
    """Returns how many sequences diverged (each at a tie); fails on a divergence that is not a tie."""
    diverged = 0
    for prompt, want, got in zip(prompts, expected, actual, strict=True):
        if want == got:
            continue
        diverged += 1
        first = next((i for i, (x, y) in enumerate(zip(want, got, strict=False)) if x != y), min(len(want), len(got)))
        gap = top2_gap(model, tokenizer.encode(prompt, add_special_tokens=False), want[:first])
        assert gap < tolerance, f"{prompt!r}: token {first} differs with a top-2 gap of {gap:.4f} (≥ {tolerance})"
    return diverged
