"""Bytes one model step moves (`minedraft bench-steps`): the weights it reads and each KV layout's cache traffic.

A step's floor is what it must move: every weight it reads once, in the layout the runner holds them, and the
keys/values it attends to. A layout that copies the cache around moves more than that, which is what the
bench's "MB moved" column shows next to the floor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from minedraft.engine.fbgemm_w8a8 import FbgemmW8A8Linear
from minedraft.engine.precision import PromptSplitLinear, RowsSwitchedLinear
from minedraft.engine.static_kv import bucket

NOT_WEIGHTS = frozenset({torch.int64, torch.bool})  # index and mask buffers: bookkeeping, not weights read


def _storage(tensor: torch.Tensor) -> tuple[object, int]:
    """A key shared by every tensor over one storage (tied or viewed weights), and that storage's bytes."""
    try:
        storage = tensor.untyped_storage()
        return (str(tensor.device), storage.data_ptr()), storage.nbytes()
    except (NotImplementedError, RuntimeError):
        # oneDNN (mkldnn) tensors are opaque: no storage to share or size. Each is its own, and on torch 2.13
        # numel() and element_size() still answer, giving its dense size (no to_dense copy needed).
        return ("opaque", id(tensor)), tensor.numel() * tensor.element_size()


def _unread(model: torch.nn.Module, rows: int) -> set[int]:
    """ids of tensors a step over `rows` token rows skips: a RowsSwitchedLinear holds int4 and W8A8 forms of
    one weight and runs one of them, a PromptSplitLinear its generated tokens' form in a decode or verify step
    (the bias, shared by both, is read either way)."""
    skipped: set[int] = set()
    for module in model.modules():
        if isinstance(module, PromptSplitLinear):
            used, idle = module.generated, module.prompt
        elif isinstance(module, RowsSwitchedLinear):
            few = rows <= module.max_int4_rows
            used, idle = (module.few, module.many) if few else (module.many, module.few)
        else:
            continue
        kept = {id(t) for t in [*used.parameters(), *used.buffers()]}
        skipped.update(id(t) for t in [*idle.parameters(), *idle.buffers()] if id(t) not in kept)
    return skipped


def _input_table(model: torch.nn.Module) -> torch.Tensor | None:
    try:
        return model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        return None


def held_tensors(holder: object) -> list[torch.Tensor]:
    """Every tensor an object holds as an attribute or in a list/tuple attribute (a KV cache's storage)."""
    found: list[torch.Tensor] = []
    for value in vars(holder).values() if holder is not None else ():
        items = value if isinstance(value, list | tuple) else [value]
        found += [item for item in items if isinstance(item, torch.Tensor)]
    return found


def weight_bytes(model: torch.nn.Module, rows: int = 1, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of weights one step feeding `rows` tokens (batch × tokens per row) reads, in the layout the model
    holds them: every distinct storage among its parameters AND buffers (oneDNN and quantised linears keep their
    weights in buffers, packed), tied or shared storages once; `exclude`: tensors that are not weights (a KV
    cache held on the model).

    An input-embedding table is not read whole: a lookup reads the `rows` rows fed. Only when its storage is
    also another module's (tied to the lm_head) is it read whole, once, by the head's matmul. Loading a float32
    model with oneDNN linears, or quantising, gives the head its own copy, so there the table counts its rows
    and the head its own (packed) bytes.
    """
    skipped = _unread(model, rows)
    excluded = {_storage(t)[0] for t in exclude}
    sizes: dict[object, int] = {}
    uses: Counter[object] = Counter()
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for _, tensor in named:
        if tensor.dtype in NOT_WEIGHTS or id(tensor) in skipped:
            continue
        key, nbytes = _storage(tensor)
        if key not in excluded:
            sizes[key] = nbytes
            uses[key] += 1  # a tied weight appears once per module holding it
    table = _input_table(model)
    if table is not None:
        key, nbytes = _storage(table)
        if uses[key] == 1:
            sizes[key] = min(nbytes, rows * table.shape[-1] * table.element_size())
    return sum(sizes.values()) + sum(_fbgemm_bytes(m) for m in model.modules())


def _fbgemm_bytes(module: torch.nn.Module) -> int:
    """fbgemm's packed int8 weight is not a tensor (no storage to count): one byte a code."""
    if not isinstance(module, FbgemmW8A8Linear) or module.weight_fbgemm is None:
        return 0
    return module.out_features * module.in_features


@dataclass(frozen=True)
class KVGeometry:
    """What one cached token costs: keys and values of every layer."""

    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int
    elem: int  # bytes per cached value

    @classmethod
    def of(cls, config: object, dtype: torch.dtype) -> KVGeometry:
        q_heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
        elem = torch.tensor([], dtype=dtype).element_size()
        return cls(config.num_hidden_layers, kv_heads, q_heads, head_dim, elem)

    @property
    def per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.elem  # 2: keys and values

    @property
    def groups(self) -> int:
        return self.q_heads // self.kv_heads


def real_kv_bytes(geo: KVGeometry, kv_lens: list[int], n: int) -> int:
    """The least any layout moves: each row's cached keys/values and its `n` new ones, read once."""
    return sum(kv_len + n for kv_len in kv_lens) * geo.per_token


def attention_kv_bytes(geo: KVGeometry, rows: int, width: int, n: int) -> int:
    """Keys/values attention reads over a padded [rows, width] batch. We pass a 4D mask, so transformers' SDPA
    path never takes enable_gqa: one query folds the groups into the query (pack_gqa, no copy), but n > 1 with
    GQA materialises repeat_kv, which reads the batch once, writes it groups× and SDPA reads that groups×."""
    batch = rows * width * geo.per_token
    return batch + 2 * geo.groups * batch if n > 1 and geo.groups > 1 else batch


def static_kv_bytes(geo: KVGeometry, kv_lens: list[int], n: int, rows: int | None = None,
                    width: int | None = None) -> int:
    """The slot cache without paged attention (`SlotCache.update`): the new tokens are written into their slots,
    then `keys[slots, :, :width]` gathers the batch, a copy that reads and writes rows × width, which attention
    reads. `rows`/`width`: the step's padded shape (CUDA graphs pad both to buckets); default the batch and its
    longest row."""
    rows = rows or len(kv_lens)
    width = width or max(kv_lens) + n
    written = rows * n * geo.per_token
    gathered = 2 * rows * width * geo.per_token
    return written + gathered + attention_kv_bytes(geo, rows, width, n)


def dynamic_kv_bytes(geo: KVGeometry, kv_lens: list[int], n: int) -> int:
    """The dynamic layout (`ModelRunner._forward_dynamic`), approximately (allocations' zero-fills, and the
    small copies of the new tokens alone, left out). Each step, in token units:
    - _padded_past reads every row's cache and writes a padded batch: Σ kv_len + rows × past;
    - DynamicLayer.update concatenates the new tokens to it: reads rows × past, writes rows × total;
    - attention reads rows × total (repeat_kv as in `attention_kv_bytes`);
    - _store_new_kv stacks the layers (reads and writes rows × total), then each row's own cache is rebuilt
      by a concatenation: reads and writes Σ (kv_len + n)."""
    rows, past = len(kv_lens), max(kv_lens)
    total = past + n
    padded = sum(kv_lens) + rows * past
    concatenated = rows * past + rows * total
    stacked = 2 * rows * total
    rebuilt = 2 * sum(kv_len + n for kv_len in kv_lens)
    copies = (padded + concatenated + stacked + rebuilt) * geo.per_token
    return copies + attention_kv_bytes(geo, rows, total, n)


def layout_kv_bytes(layout: str, geo: KVGeometry, kv_lens: list[int], n: int, static: object = None) -> int:
    """KV bytes one step moves in `layout` (dynamic, static, gather, graphs); `static` is the runner's StaticKV."""
    if layout == "dynamic":
        return dynamic_kv_bytes(geo, kv_lens, n)
    if getattr(static, "paged", False):  # paged attention reads each row's own blocks in place: no gather
        return real_kv_bytes(geo, kv_lens, n)
    rows, width = len(kv_lens), max(kv_lens) + n
    if getattr(static, "pad_shapes", False):  # as StaticKV.inputs pads a step to a captured graph's shape
        rows = bucket(rows, 1, max(static.max_seqs, rows))
        width = bucket(width, static.min_width, static.max_context)
    return static_kv_bytes(geo, kv_lens, n, rows, width)
