"""Attention read in place from the static cache: no per-step gather of the batch's slots, no repeated KV heads.

transformers' own attention gets keys/values as a dense [batch, kv_heads, width, head_dim] tensor, so the slot
cache used to gather every row's slot up to a shared width bucket (a copy of the batch's whole cache each step)
and, for a multi-token verify, SDPA then materialised `repeat_kv` (query heads / KV heads times that). Here the
cache's `update` hands over the whole layer and this attention function reads each row's own slot:
- "varlen" (CUDA, half precision): torch's Flash-Attention varlen kernel with the cache as a page pool, each
  slot a run of PAGE-token pages (`block_table`), `seqused_k` the row's length, GQA in the kernel. One launch;
  shapes depend only on the batch and the tokens per row, so a captured graph serves every context length.
- "rows" (CPU, or where varlen cannot run eagerly): per row, SDPA over a view of its slot (no copy), each KV
  head's query heads packed as query rows (GQA without repeated keys; on this CPU 7x faster than the gather at
  batch 8, context 512, and 6x for a 5-token verify); soft-capped logits (Gemma-2) take it in plain math.
- "gather": the old path (a CUDA graph in float32/64, or soft-capping on CUDA): transformers' SDPA over a gather.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "minedraft_slots"
PAGE = 256  # Flash-Attention's paged KV wants pages of a multiple of 256 tokens
# The rows path reads a query's keys in whole blocks of KEY_BLOCK columns, masking those past its length. CPU
# SDPA's rounding depends on the key count it is given, masked columns included (a ragged vector tail; on AVX2
# float32, any other count), so a query attending to 15 keys alone and the same query in a prefill or verify
# over 16 could differ in the last bit, and a greedy token flip at a near-tie between target-only and
# speculative decoding. Each query reads its own whole blocks, and a feed's queries are attended in runs that
# share a width. The query count matters too in float32 (MKL's GEMM inside SDPA rounds a block of 2 or 3 query
# rows its own way), so there each of a verify's queries is attended exactly as a decode of its position,
# on the CPU those sharing a width as batch items of one call (`_query_runs`): a token is the same bits decoded or
# verified (tested bit for bit; a C = 32 bench on AVX2 had sd write other tokens than ar before). bfloat16
# keeps one call per run (tested, prefills too).
log = logging.getLogger(__name__)
KEY_BLOCK = 32
QUERY_AT_A_TIME = 64  # float32 feeds up to this long (decodes; verifies: a target takes 32 drafts at most)
VARLEN_ARGS = {"block_table", "seqused_k", "enable_gqa", "window_size", "scale"}  # what `_varlen` passes by name


def varlen_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Flash-Attention's kernel: half precision, Ampere or newer, head_dim a multiple of 8 up to 256."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(device) < (8, 0) or head_dim % 8 or head_dim > 256:
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    # Paged reads came after the kernel itself (torch 2.13 has them), and a build whose kernel is FA2 refuses
    # them when called: one tiny paged read decides, else rows or a gather are read.
    return VARLEN_ARGS.issubset(inspect.signature(varlen_attn).parameters) and _paged_read_runs(
        device, dtype, head_dim)


@functools.cache
def _paged_read_runs(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    from torch.nn.attention.varlen import varlen_attn

    ints = {"device": device, "dtype": torch.int32}
    pool = torch.zeros(1, PAGE, 1, head_dim, device=device, dtype=dtype)  # one page, one KV head
    try:
        varlen_attn(torch.zeros(1, 2, head_dim, device=device, dtype=dtype), pool, pool,
                    torch.tensor([0, 1], **ints), torch.tensor([0, 1], **ints), 1, PAGE, window_size=(-1, 0),
                    enable_gqa=True, seqused_k=torch.tensor([1], **ints), block_table=torch.zeros(1, 1, **ints))
        torch.cuda.synchronize(device)
    except (RuntimeError, ValueError, TypeError) as error:
        log.warning("torch's varlen attention cannot read a paged cache here (%s): slots are read per row "
                    "(or gathered, under graphs)", error)
        return False
    return True


def attention_window(config) -> int | None:
    """The sliding window some of the model's layers attend within (Mistral, Gemma-2), or None."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types and "sliding_attention" not in layer_types):
        return None
    return None if getattr(config, "use_sliding_window", True) is False else int(window)


def choose(device: torch.device, dtype: torch.dtype, config, graphs: bool) -> str:
    """The attention path a static cache runs (see the module's note)."""
    softcap = getattr(config, "attn_logit_softcapping", None)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if varlen_available(device, dtype, head_dim) and not softcap:
        return "varlen"
    return "gather" if graphs else "rows"


def slot_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   sliding_window: int | None = None, softcap: float | None = None,
                   slot_step: dict[str, torch.Tensor] | None = None, slot_memo: dict | None = None, **_
                   ) -> tuple[torch.Tensor, None]:
    """query [batch, heads, n, head_dim]; key/value the layer's whole cache [slots, context, kv_heads, head_dim];
    `slot_step` the step's inputs (StaticKV.inputs), `slot_memo` a dict this forward's layers share.
    Returns [batch, n, heads, head_dim], as transformers' attention functions do."""
    if slot_step["block_table"].shape[-1]:
        return _varlen(query, key, value, scaling, sliding_window, slot_step), None
    return rows(query, key, value, scaling, sliding_window, softcap, slot_step, slot_memo), None


def _varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
            sliding_window: int | None, step: dict[str, torch.Tensor]) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    batch, heads, n, head_dim = query.shape
    pages = key.view(-1, PAGE, *key.shape[2:])  # the slot rows as a pool of pages: a view, no copy
    # Right-aligned feeds and bottom-right causal alignment agree: query i of a row of length L sees keys
    # up to L - n + i, its own position. Left padding queries see fewer (or none): their output is unused.
    out = varlen_attn(query.transpose(1, 2).reshape(batch * n, heads, head_dim), pages, value.view_as(pages),
                      step["cu_seq_q"], step["cu_seq_k"], n, key.shape[1], scale=scaling,
                      window_size=(sliding_window - 1 if sliding_window else -1, 0), enable_gqa=True,
                      seqused_k=step["lengths"], block_table=step["block_table"])
    return out.view(batch, n, heads, head_dim)


def rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
         sliding_window: int | None, softcap: float | None, step: dict[str, torch.Tensor],
         memo: dict) -> torch.Tensor:
    batch, heads, n, head_dim = query.shape
    kv_heads = key.shape[2]
    groups = heads // kv_heads
    out = query.new_zeros(batch, n, heads, head_dim)
    one_at_a_time = query.dtype == torch.float32  # QUERY_AT_A_TIME's note
    # Stacking such queries: on CPU SDPA only, where measured; with one KV head a decode's call is a single work
    # item, whose GEMMs may thread otherwise than a stacked item's
    stack = not softcap and query.device.type == "cpu" and kv_heads > 1
    if "rows" not in memo:  # the same for every layer of this forward: worked out once
        memo["rows"] = [(row, slot, length, feed) for row, (slot, length, feed) in enumerate(zip(
            step["slots"].tolist(), step["lengths"].tolist(), step["feeds"].tolist(), strict=True)) if feed]
    for row, slot, length, feed in memo["rows"]:
        if ("runs", row) not in memo:
            memo["runs", row] = _query_runs(length, feed, key.shape[1], one_at_a_time, stack)
        slot_views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # a verify's queries mostly share a width
        for first, last, width, stacked in memo["runs", row]:
            # Queries first..last-1 of the row's real (right-aligned) feed: each KV head's query heads packed as
            # extra query rows (GQA without repeating keys), [1, kv_heads, groups * m, head_dim]; or, stacked, each
            # query its own batch item with the arguments its decode has, [m, kv_heads, groups, head_dim].
            m = last - first
            start = n - feed + first
            picked = query[row, :, start:start + m]
            if stacked:
                q = picked.transpose(0, 1).reshape(m, kv_heads, groups, head_dim)
            else:
                q = picked.reshape(1, kv_heads, groups * m, head_dim)
            if width not in slot_views:  # views, no copy
                slot_views[width] = key[slot, :width].transpose(0, 1)[None], value[slot, :width].transpose(0, 1)[None]
            k, v = slot_views[width]
            if stacked:
                k, v = k.expand(m, -1, -1, -1), v.expand(m, -1, -1, -1)
            run_length = length - feed + last  # the keys the run's last query sees
            window = sliding_window if sliding_window and run_length > sliding_window else None
            if (row, first, window) not in memo:
                allowed = _allowed(run_length, m, window, groups, width, q.device, stacked)
                memo[row, first, window] = allowed if softcap or allowed is None else _additive(allowed, q.dtype)
            mask = memo[row, first, window]
            if softcap:
                attended = _softcapped(q, k, v, mask, scaling, softcap)
            else:
                attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
            if stacked:
                out[row, start:start + m] = attended.reshape(m, heads, head_dim)
            else:
                out[row, start:start + m] = attended[0].reshape(heads, m, head_dim).transpose(0, 1)
    return out


def _query_runs(length: int, feed: int, capacity: int, one_at_a_time: bool,
                stack: bool = False) -> list[tuple[int, int, int, bool]]:
    """The feed's queries in the calls that attend them: (first, last, width, stacked), query i seeing
    length - feed + i + 1 keys, read in whole KEY_BLOCKs up to the cache's capacity: runs of queries that
    share a width, as extra query rows of one attention; or in float32 a decode or verify (feed <=
    QUERY_AT_A_TIME) each query with the arguments a decode of that position has, those sharing a width
    stacked as batch items of one call (CPU SDPA computes each batch item alone, the same bits as its own call:
    `tests/test_static_kv.py`), or one call each where `stack` is off (soft-capped logits, whose plain math
    batches its own way, one KV head, and other devices' kernels)."""
    one_each = one_at_a_time and feed <= QUERY_AT_A_TIME
    runs: list[tuple[int, int, int, bool]] = []
    for i in range(feed):
        width = min(-(-(length - feed + i + 1) // KEY_BLOCK) * KEY_BLOCK, capacity)
        if runs and runs[-1][2] == width and (not one_each or stack):
            runs[-1] = (runs[-1][0], i + 1, width, one_each)
        else:
            runs.append((i, i + 1, width, False))
    return runs


def _allowed(length: int, feed: int, window: int | None, groups: int, width: int, device: torch.device,
             stacked: bool = False) -> torch.Tensor | None:
    """Which of `width` keys each query sees: up to its own position (and within the window), never the columns
    past `length`; None: all. [groups * feed, width] for packed query rows; stacked, [feed, 1, groups, width]."""
    if feed == 1 and window is None and width == length:
        return None
    positions = torch.arange(length - feed, length, device=device)[:, None]
    columns = torch.arange(width, device=device)[None, :]
    allowed = columns <= positions
    if window:
        allowed &= columns > positions - window
    if stacked:
        return allowed[:, None, None, :].expand(feed, 1, groups, width)
    return allowed.repeat(groups, 1)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float mask SDPA would make of `allowed` at every call (where(allowed, 0, -inf)): made once per step
    and layer-shared through the memo, the same numbers without an operator pair per call and layer."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _softcapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scaling: float | None,
                softcap: float) -> torch.Tensor:
    """Gemma-2's attention: tanh-capped scores, softmax in float32 (as its eager path)."""
    scores = q @ k.transpose(-1, -2) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


AttentionInterface.register(NAME, slot_attention)
