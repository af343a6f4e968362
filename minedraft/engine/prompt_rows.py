"""Which rows of the forward running now are positions of a sequence's prompt.

A layer that computes prompts in one format and generated tokens in another (`precision.PromptSplitLinear`)
asks here. A position counts as prompt when it lies before the sequence's `prompt_len` (the sampling's count,
as the router sets it, else the tokens it was created with), whichever call computes it — a prefill, a chunk
of one, or a step that also feeds tokens after it — so the format of a position never depends on how the calls
were cut. A forward outside `feeding` (a model called directly) counts every row as generated.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import torch


class Fed(Protocol):
    tokens: list[int]
    kv_len: int
    prompt_len: int


_rows: ContextVar[bool | torch.Tensor] = ContextVar("prompt_rows", default=False)


def rows_of(states: Sequence[Fed]) -> bool | torch.Tensor:
    """True or False when every fed row is (or none is) a prompt position; else a [batch, width] mask over the
    right-aligned feeds (`static_kv.StepInputs`), padding counted as generated."""
    spans = [(s.kv_len, len(s.tokens), s.prompt_len) for s in states]
    if all(end <= prompt for _, end, prompt in spans):
        return True
    if all(start >= prompt for start, _, prompt in spans):
        return False
    width = max(end - start for start, end, _ in spans)
    mask = torch.zeros(len(states), width, dtype=torch.bool)
    for i, (start, end, prompt) in enumerate(spans):
        mask[i, width - (end - start):] = torch.arange(start, end) < prompt
    return mask


@contextmanager
def feeding(states: Sequence[Fed]) -> Iterator[None]:
    """Marks the rows of the forward run inside as these states' feeds."""
    token = _rows.set(rows_of(states))
    try:
        yield
    finally:
        _rows.reset(token)


def current(x: torch.Tensor) -> bool | torch.Tensor:
    """For a layer input x [batch, m, ...features] (or its flattening): True/False for all its rows, or a mask
    over its flattened rows — the last m columns of each row's feed (a head sees only the kept positions)."""
    rows = _rows.get()
    if isinstance(rows, bool):
        return rows
    count = x[..., 0].numel()
    if count % rows.shape[0] or (x.dim() > 2 and x.shape[0] != rows.shape[0]):
        raise ValueError(f"a layer input of shape {tuple(x.shape)} does not match a batch of {rows.shape[0]} feeds")
    width = count // rows.shape[0]
    if width > rows.shape[1]:  # a step padded wider than its feeds: the extra columns are padding
        rows = torch.nn.functional.pad(rows, (width - rows.shape[1], 0))
    return rows[:, rows.shape[1] - width:].reshape(-1).to(x.device)
