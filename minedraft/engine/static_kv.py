"""Preallocated (static) KV storage: one row ("slot") per held sequence, written in place.

The dynamic runner copies every sequence's cache into a fresh padded batch on each call; here keys and
values live in one tensor per layer, [slots + 1, columns, kv_heads, head_dim], allocated once (columns: the
context and a scratch column, rounded up to whole pages). A step writes each new token's keys/values at (its
slot, its position), and attention reads each row's slot in place (`slot_attention`). Rolling back is just
lowering `kv_len`: entries past a row's length are never attended and are overwritten later.

The last slot and column `max_context` are scratch: padding tokens write there, so a step can be padded to a
fixed shape (batch buckets; and width buckets on the gather path) — the shapes `cuda_graphs` captures —
without touching real data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from minedraft.engine import slot_attention
from minedraft.errors import ResourceExhausted
from minedraft.host_memory import mem_available

log = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """Every tensor one step needs; the shapes alone decide which captured graph can run it."""

    input_ids: torch.Tensor  # [batch, n] long
    position_ids: torch.Tensor  # [batch, n] long (rotary positions; 0 for padding)
    slots: torch.Tensor  # [batch] long (the scratch slot for padding rows)
    write_pos: torch.Tensor  # [batch, n] long (the scratch column for padding tokens)
    lengths: torch.Tensor  # [batch] int32: keys each row attends to (cached + fed)
    feeds: torch.Tensor  # [batch] int32: tokens fed to each row (0: a padding row)
    block_table: torch.Tensor  # [batch, pages per slot] int32 (varlen path; [batch, 0] otherwise)
    cu_seq_q: torch.Tensor  # [batch + 1] int32: n per row, cumulated (varlen path)
    cu_seq_k: torch.Tensor  # [batch + 1] int32: lengths cumulated (varlen path)
    mask: torch.Tensor  # gather path: [batch, 1, n, width] additive float mask; else [batch, 1, n, 1], unused

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(vars(self))

    def to(self, device: torch.device, non_blocking: bool = False) -> StepInputs:
        return StepInputs(**{name: t.to(device, non_blocking=non_blocking) for name, t in vars(self).items()})


class SlotCache:
    """The cache object the model sees for one step (duck-types transformers' Cache.update)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor,
                 write_pos: torch.Tensor, width: int | None) -> None:
        self.keys, self.values = keys, values
        self.slots, self.write_pos, self.width = slots, write_pos, width

    def get_seq_length(self, layer_idx: int = 0) -> int:  # asked by older transformers 5.x; positions are explicit
        return 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_, **__
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the step's keys/values in place; returns the whole layer (read in place by `slot_attention`),
        or, on the gather path (`width` set), the batch's slots gathered up to the width, as [batch, heads, width,
        head_dim] for transformers' own attention."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = self.slots[:, None]
        keys[rows, self.write_pos] = key_states.transpose(1, 2)  # [batch, n, heads, head_dim]
        values[rows, self.write_pos] = value_states.transpose(1, 2)
        if self.width is None:
            return keys, values
        return keys[self.slots, :self.width].transpose(1, 2), values[self.slots, :self.width].transpose(1, 2)


def uses_static_kv(kv: str, device: str) -> bool:
    """The layout `--kv` picks: static unless dynamic is asked for. On the CPU too: a dynamic step copies every
    sequence's cache into a padded batch, a third of a bfloat16 target's batch-8 decode (README, "Measured")."""
    return kv != "dynamic"


def bucket(value: int, smallest: int, largest: int) -> int:
    """The smallest power-of-two multiple of `smallest` that holds `value`, capped at `largest`."""
    size = smallest
    while size < value:
        size *= 2
    return min(size, largest)


def kv_shape(config, max_seqs: int, max_context: int) -> tuple[int, int, int, int]:
    """One layer's keys (or values): every slot and column, the scratch ones included, in whole pages."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    columns = -(-(max_context + 1) // slot_attention.PAGE) * slot_attention.PAGE
    return max_seqs + 1, columns, heads, head_dim


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can take now: free GPU memory, or the kernel's MemAvailable on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return mem_available()


DEFAULT_CONTEXT = 4096  # an unsized cache's context: the model's own limit, at most this


def fit_context(config, max_seqs: int, max_context: int, limit: int, dtype: torch.dtype, device: torch.device,
                fraction: float) -> int:
    """The context each of `max_seqs` slots gets within `fraction` of free memory, at most `limit` (what the model
    computes exactly). `max_context` > 0 is held or refused at start-up; 0 asks for DEFAULT_CONTEXT, shrunk in whole
    pages to what fits, since a small host should still serve shorter sequences rather than not start."""
    wanted = min(max_context or DEFAULT_CONTEXT, limit)
    shape = kv_shape(config, max_seqs, wanted)
    per_token = 2 * config.num_hidden_layers * shape[2] * shape[3] * torch.tensor([], dtype=dtype).element_size()
    needed, budget = per_token * shape[0] * shape[1], int(fraction * available_bytes(device))
    if needed <= budget:
        return wanted
    pages = budget // per_token // shape[0] // slot_attention.PAGE  # a context of (pages - 1) pages takes `pages`
    if not max_context and pages >= 2:
        fitted = (pages - 1) * slot_attention.PAGE
        log.warning("static KV: %d sequences x %d tokens would take %.1f GiB, over %.0f%% of free memory; holding "
                    "%d tokens per sequence (--max-context or --max-seqs sizes it explicitly)", max_seqs, wanted,
                    needed / 2**30, 100 * fraction, fitted)
        return fitted
    raise ValueError(f"static KV cache of {max_seqs} sequences x {wanted} tokens needs {needed / 2**30:.1f} "
                     f"GiB, over {fraction:.0%} of the {budget / fraction / 2**30:.1f} GiB free on {device}: "
                     f"lower --max-seqs or --max-context (at most {budget // per_token} sequence-tokens fit), "
                     "or raise --kv-memory-fraction")


class StaticKV:
    def __init__(self, config, max_seqs: int, max_context: int, dtype: torch.dtype, device: torch.device,
                 pad_shapes: bool = False, min_width: int = 256, attention: str | None = None) -> None:
        shape = kv_shape(config, max_seqs, max_context)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_seqs, self.max_context = max_seqs, max_context
        self.scratch_slot, self.scratch_col = max_seqs, max_context
        self.dtype, self.device = dtype, device
        self.pad_shapes = pad_shapes  # pad batch (and the gather path's width) to buckets, as graph capture needs
        self.min_width = min(min_width, max_context)
        # varlen, rows or gather (slot_attention): the first two read each slot in place.
        self.attention = attention or slot_attention.choose(device, dtype, config, graphs=pad_shapes)
        self.pages_per_slot = shape[1] // slot_attention.PAGE
        self.token_buckets: tuple[int, ...] = ()  # with pad_shapes: tokens per row a step is padded up to
        self._free = list(range(max_seqs - 1, -1, -1))

    @property
    def paged(self) -> bool:
        """Whether attention reads each row's slot in place (no gathered copy of the batch's cache)."""
        return self.attention != "gather"

    @property
    def bytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.keys)

    @property
    def slots_free(self) -> int:
        return len(self._free)

    def assign(self, states: list) -> list:
        """Gives each state without one a slot; returns those newly assigned (all or none)."""
        needed = [s for s in states if s.slot is None]
        if len(needed) > len(self._free):
            raise ResourceExhausted(f"KV cache full: {len(needed)} new sequences, {len(self._free)} free slots "
                                    f"of {self.max_seqs}")
        for state in needed:
            state.slot = self._free.pop()
            state.forget_cache()
        return needed

    def free(self, state) -> None:
        if state.slot is not None:
            self._free.append(state.slot)
            state.slot = None
            state.forget_cache()

    def inputs(self, states: list, feeds: list[list[int]]) -> StepInputs:
        """Right-aligned new tokens (so every row's last positions share columns, for logits_to_keep)."""
        n = max(len(f) for f in feeds)
        if self.pad_shapes and self.token_buckets and n <= self.token_buckets[-1]:
            n = min(b for b in self.token_buckets if b >= n)
        ends = [s.kv_len + len(f) for s, f in zip(states, feeds, strict=True)]
        if max(ends) > self.max_context:
            raise ResourceExhausted(f"sequence of {max(ends)} tokens exceeds the KV cache's {self.max_context}")
        batch = bucket(len(states), 1, max(self.max_seqs, len(states))) if self.pad_shapes else len(states)
        input_ids = torch.zeros((batch, n), dtype=torch.long)
        positions = torch.zeros((batch, n), dtype=torch.long)
        write_pos = torch.full((batch, n), self.scratch_col, dtype=torch.long)
        slots = torch.full((batch,), self.scratch_slot, dtype=torch.long)
        lengths = torch.full((batch,), n, dtype=torch.int32)  # padding rows: n scratch-slot keys, never read back
        fed = torch.zeros((batch,), dtype=torch.int32)
        for i, (state, feed) in enumerate(zip(states, feeds, strict=True)):
            start = n - len(feed)
            input_ids[i, start:] = torch.tensor(feed)
            positions[i, start:] = torch.arange(state.kv_len, state.kv_len + len(feed))
            write_pos[i, start:] = positions[i, start:]
            slots[i], lengths[i], fed[i] = state.slot, ends[i], len(feed)
        step = StepInputs(input_ids, positions, slots, write_pos, lengths, fed, *self._paging(slots, lengths, n),
                          self._mask(positions))
        return step.to(self.device, non_blocking=True)

    def scratch_inputs(self, batch: int, n: int, width: int = 1) -> StepInputs:
        """A step of `batch` padding rows of `n` tokens: it writes and reads the scratch slot only (for capture)."""
        slots = torch.full((batch,), self.scratch_slot, dtype=torch.long)
        lengths = torch.full((batch,), n, dtype=torch.int32)
        step = StepInputs(torch.zeros((batch, n), dtype=torch.long), torch.zeros((batch, n), dtype=torch.long),
                          slots, torch.full((batch, n), self.scratch_col, dtype=torch.long), lengths,
                          torch.zeros((batch,), dtype=torch.int32), *self._paging(slots, lengths, n),
                          torch.zeros((batch, 1, n, width), dtype=self.dtype))
        return step.to(self.device)

    def _paging(self, slots: torch.Tensor, lengths: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        """The varlen kernel's view of a step: each row's pages, and query and key offsets."""
        pages = self.pages_per_slot if self.attention == "varlen" else 0
        block_table = (slots[:, None] * pages + torch.arange(pages)[None, :]).to(torch.int32)
        cu_seq_k = torch.zeros(len(slots) + 1, dtype=torch.int32)
        cu_seq_k[1:] = torch.cumsum(lengths, 0)
        return block_table, torch.arange(0, (len(slots) + 1) * n, n, dtype=torch.int32), cu_seq_k

    def _mask(self, positions: torch.Tensor) -> torch.Tensor:
        """The gather path's mask: a query sees every column up to its own position (padding queries, at
        position 0, see column 0 only). The in-place paths need none: a placeholder transformers passes on."""
        batch, n = positions.shape
        if self.paged:
            return torch.zeros((batch, 1, n, 1), dtype=self.dtype)
        width = int(positions.max()) + 1
        if self.pad_shapes:
            width = bucket(width, self.min_width, self.max_context)
        allowed = torch.arange(width)[None, None, :] <= positions[:, :, None]
        mask = torch.zeros((batch, 1, n, width), dtype=self.dtype)
        return mask.masked_fill_(~allowed[:, None], torch.finfo(self.dtype).min)

    def cache_for(self, slots: torch.Tensor, write_pos: torch.Tensor, mask: torch.Tensor) -> SlotCache:
        return SlotCache(self.keys, self.values, slots, write_pos, None if self.paged else mask.shape[-1])
