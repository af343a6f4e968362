"""Preallocated (static) KV storage: one row ("slot") per held sequence, written in place.

The dynamic runner copies every sequence's cache into a fresh padded batch on each call; here keys and
values live in one tensor per layer, [slots + 1, kv_heads, max_context + 1, head_dim], allocated once.
A step writes each new token's keys/values at (its slot, its position) and attends over a gather of the
batch's slots up to a width. Rolling back is just lowering `kv_len`: stale entries past it are never
attended (the mask stops every query at its own position) and are overwritten later.

The last slot and the last column are scratch: padding tokens write there, so a step can be padded to a
fixed shape (batch and width buckets) — the shapes `cuda_graphs` captures — without touching real data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minedraft.errors import ResourceExhausted


@dataclass
class StepInputs:
    """Every tensor one step needs; the shapes alone decide which captured graph can run it."""

    input_ids: torch.Tensor  # [batch, n] long
    position_ids: torch.Tensor  # [batch, n] long (rotary positions; 0 for padding)
    slots: torch.Tensor  # [batch] long (the scratch slot for padding rows)
    write_pos: torch.Tensor  # [batch, n] long (the scratch column for padding tokens)
    mask: torch.Tensor  # [batch, 1, n, width] additive float mask

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "slots": self.slots,
                "write_pos": self.write_pos, "mask": self.mask}


class SlotCache:
    """The cache object the model sees for one step (duck-types transformers' Cache.update)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor,
                 write_pos: torch.Tensor, width: int) -> None:
        self.keys, self.values = keys, values
        self.slots, self.write_pos, self.width = slots, write_pos, width

    def get_seq_length(self, layer_idx: int = 0) -> int:  # asked by older transformers 5.x; positions are explicit
        return 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_, **__
               ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = self.slots[:, None]
        keys[rows, :, self.write_pos] = key_states.transpose(1, 2)  # [batch, n, heads, head_dim]
        values[rows, :, self.write_pos] = value_states.transpose(1, 2)
        return keys[self.slots, :, :self.width], values[self.slots, :, :self.width]


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
    """One layer's keys (or values): every slot and column, the scratch ones included."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return max_seqs + 1, heads, max_context + 1, head_dim


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can take now: free GPU memory, or the kernel's MemAvailable on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def check_fits(config, max_seqs: int, max_context: int, dtype: torch.dtype, device: torch.device,
               fraction: float) -> None:
    """Refuses, at start-up and with the sizes that would fit, a cache larger than `fraction` of free memory."""
    shape = kv_shape(config, max_seqs, max_context)
    per_token = 2 * config.num_hidden_layers * shape[1] * shape[3] * torch.tensor([], dtype=dtype).element_size()
    needed, budget = per_token * shape[0] * shape[2], int(fraction * available_bytes(device))
    if needed > budget:
        raise ValueError(f"static KV cache of {max_seqs} sequences x {max_context} tokens needs {needed / 2**30:.1f} "
                         f"GiB, over {fraction:.0%} of the {budget / fraction / 2**30:.1f} GiB free on {device}: "
                         f"lower --max-seqs or --max-context (at most {budget // per_token} sequence-tokens fit), "
                         "or raise --kv-memory-fraction")


class StaticKV:
    def __init__(self, config, max_seqs: int, max_context: int, dtype: torch.dtype, device: torch.device,
                 pad_shapes: bool = False, min_width: int = 256) -> None:
        shape = kv_shape(config, max_seqs, max_context)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_seqs, self.max_context = max_seqs, max_context
        self.scratch_slot, self.scratch_col = max_seqs, max_context
        self.dtype, self.device = dtype, device
        self.pad_shapes = pad_shapes  # pad batch and width to buckets (what graph capture needs)
        self.min_width = min(min_width, max_context)
        self._free = list(range(max_seqs - 1, -1, -1))

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
        ends = [s.kv_len + len(f) for s, f in zip(states, feeds, strict=True)]
        if max(ends) > self.max_context:
            raise ResourceExhausted(f"sequence of {max(ends)} tokens exceeds the KV cache's {self.max_context}")
        batch, width = len(states), max(ends)
        if self.pad_shapes:
            batch = bucket(batch, 1, max(self.max_seqs, batch))
            width = bucket(width, self.min_width, self.max_context)
        input_ids = torch.zeros((batch, n), dtype=torch.long)
        positions = torch.zeros((batch, n), dtype=torch.long)
        write_pos = torch.full((batch, n), self.scratch_col, dtype=torch.long)
        slots = torch.full((batch,), self.scratch_slot, dtype=torch.long)
        for i, (state, feed) in enumerate(zip(states, feeds, strict=True)):
            start = n - len(feed)
            input_ids[i, start:] = torch.tensor(feed)
            positions[i, start:] = torch.arange(state.kv_len, state.kv_len + len(feed))
            write_pos[i, start:] = positions[i, start:]
            slots[i] = state.slot
        # A query sees every column up to its own position; padding queries (position 0) see column 0 only.
        allowed = torch.arange(width)[None, None, :] <= positions[:, :, None]
        mask = torch.zeros((batch, 1, n, width), dtype=self.dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(self.dtype).min)
        step = StepInputs(input_ids, positions, slots, write_pos, mask)
        return StepInputs(**{k: v.to(self.device, non_blocking=True) for k, v in step.tensors().items()})

    def cache_for(self, slots: torch.Tensor, write_pos: torch.Tensor, width: int) -> SlotCache:
        return SlotCache(self.keys, self.values, slots, write_pos, width)
