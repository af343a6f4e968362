"""The dynamic KV layout (`--kv dynamic`): each sequence owns a KV tensor; a call right-aligns them in a padded past.

Every call copies the batch's caches into a fresh padded past and each sequence's new cache back out — the
traffic the static layout (`static_kv`) avoids; kept as the reference the static path is tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache, PreTrainedModel

if TYPE_CHECKING:
    from minedraft.engine.model_runner import SequenceState


def forward_dynamic(model: PreTrainedModel, cache_kwarg: str, states: list[SequenceState],
                    logits_to_keep: int) -> torch.Tensor:
    """One batched forward: each sequence's cache right-aligned in a padded past, its new tokens after it."""
    weight = next(model.parameters())
    dtype, device = weight.dtype, weight.device
    feeds = [s.tokens[s.kv_len:] for s in states]
    batch, n_new = len(states), max(len(f) for f in feeds)
    n_past = max(s.kv_len for s in states)
    input_ids = torch.zeros((batch, n_new), dtype=torch.long)
    position_ids = torch.zeros((batch, n_new), dtype=torch.long)
    key_valid = torch.zeros((batch, n_past + n_new), dtype=torch.bool)
    for i, (state, feed) in enumerate(zip(states, feeds, strict=True)):
        start = n_new - len(feed)
        input_ids[i, start:] = torch.tensor(feed)
        position_ids[i, start:] = torch.arange(state.kv_len, state.kv_len + len(feed))
        key_valid[i, n_past - state.kv_len:n_past] = True
        key_valid[i, n_past + start:] = True
    causal = torch.arange(n_past + n_new)[None, :] <= (n_past + torch.arange(n_new))[:, None]
    allowed = causal[None, None] & key_valid[:, None, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)

    cache = DynamicCache(config=model.config)
    if n_past:
        past = _padded_past(states, n_past)
        cache = DynamicCache(ddp_cache_data=[(layer[0], layer[1]) for layer in past],
                             config=model.config)
    out = model(input_ids=input_ids.to(device), position_ids=position_ids.to(device),
                attention_mask=mask.to(device), use_cache=True, logits_to_keep=logits_to_keep,
                **{cache_kwarg: cache})
    _store_new_kv(states, feeds, getattr(out, cache_kwarg), n_past, n_new)
    return out.logits


def _padded_past(states: list[SequenceState], n_past: int) -> torch.Tensor:
    ref = next(s.kv for s in states if s.kv is not None)
    layers, _, heads, _, head_dim = ref.shape
    past = torch.zeros((layers, 2, len(states), heads, n_past, head_dim), dtype=ref.dtype,
                       device=ref.device)
    for i, state in enumerate(states):
        if state.kv is not None:
            past[:, :, i, :, n_past - state.kv_len:] = state.kv
    return past


def _store_new_kv(states: list[SequenceState], feeds: list[list[int]], cache: DynamicCache,
                  n_past: int, n_new: int) -> None:
    full = torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])
    total = n_past + n_new
    for i, (state, feed) in enumerate(zip(states, feeds, strict=True)):
        new = full[:, :, i, :, total - len(feed):]
        if state.kv is None:
            state.kv = new.clone()
        else:
            old = full[:, :, i, :, n_past - state.kv_len:n_past]
            state.kv = torch.cat([old, new], dim=3)
        state.mark_cached()
