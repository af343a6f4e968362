"""Numeric formats of a loaded model: `--dtype auto` and quantised linears on the CPU.

Weight-only quantisation keeps activations in the model's dtype and stores each linear's weight as int8 (one
scale per output channel) or int4 (asymmetric, a scale and a zero per group of input channels); W8A8 also
quantises activations, per token. All multiply with torch's own kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`, `_int_mm`, oneDNN's int8 `qlinear`, fbgemm's in fbgemm_w8a8) — none hand-written.
A decode step reads every weight once: fewer bytes, a faster step where memory bounds it (not a kernel's
arithmetic, as AVX2's int4); the cost is a small, measured change in the logits (`minedraft bench-quality`).
Speculation stays lossless for a configuration: the target's own numbers decide every token, whatever the draft's.
"""

from __future__ import annotations

import os

import torch
import torch.utils.mkldnn

from minedraft.engine import prompt_rows
from minedraft.engine.fused_linears import GroupMember, fuse_siblings

QUANTS = ("none", "int8", "int4", "w8a8", "w8a8-fbgemm", "int4-w8a8", "int4-w8a8-prompt")
DRAFT_ONLY_QUANTS = frozenset({"int4-w8a8"})
# `--quant auto` on the CPU, chosen from measurements (README, "Measured"), by what the CPU multiplies natively.
# With AMX (oneDNN's exact u8·s8 GEMM on tiles): target W8A8, 1.6-1.8x bfloat16 at every row count, rows never
# batch-dependent; draft int4 for decode steps (the fewest bytes), W8A8 for prefills (it only moves acceptance).
CPU_DEFAULT_QUANT = {"draft": "int4-w8a8", "target": "w8a8"}
# With VNNI but no AMX (AVX-512 EPYCs) fbgemm's row-exact W8A8 (7-bit weights) reads weights at up to 35 GB/s at
# a step's few rows, oneDNN's at 16-20, and is within ~15 % at prefill sizes (1.5B decode 82 against 122-128 ms).
CPU_DEFAULT_QUANT_NO_AMX = {"draft": "int4-w8a8", "target": "w8a8-fbgemm"}
# Without VNNI (AVX2) fbgemm's int8 GEMM is 2-3x int4 (bound by its arithmetic) and oneDNN's, decode to prefill.
CPU_DEFAULT_QUANT_NO_VNNI = {"draft": "w8a8-fbgemm", "target": "w8a8-fbgemm"}
CPU_DEFAULT_QUANT_NO_INT8 = {"draft": "int4", "target": "int4"}  # no int8 GEMM in torch (_int_mm is 10-30x slower)
# Formats whose sibling projections share one GEMM (fused_linears): W8A8's integer GEMM gives a column the
# same value fused or alone; the draft's int4 form may round differently, which moves acceptance only.
FUSED_QUANTS = frozenset({"w8a8", "w8a8-fbgemm", "int4-w8a8"})
INT4_GROUP = 32  # input channels sharing one scale and zero: the finest grouping torch's kernel takes


def cpu_default_quant(role: str) -> str:
    """The CPU's `--quant auto` for a role: by whether it multiplies full 8-bit weights here (VNNI) and on AMX
    tiles, else whether torch has fbgemm's int8 linear."""
    from minedraft.engine.fbgemm_w8a8 import fbgemm_available  # imports this module

    if int8_vnni():
        return (CPU_DEFAULT_QUANT if torch.cpu._is_amx_tile_supported() or not fbgemm_available()
                else CPU_DEFAULT_QUANT_NO_AMX)[role]
    return (CPU_DEFAULT_QUANT_NO_VNNI if fbgemm_available() else CPU_DEFAULT_QUANT_NO_INT8)[role]


def resolve_quant(quant: str, role: str, device: str) -> str:
    """`auto`: `cpu_default_quant` for this role on the CPU; none elsewhere (the kernels are CPU ones)."""
    if quant != "auto":
        return quant
    return cpu_default_quant(role) if torch.device(device).type == "cpu" else "none"


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX), as torch reports it."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto`: bfloat16 on a GPU that has it and on a CPU that multiplies it natively, else float32."""
    if dtype != "auto":
        return dtype
    kind = torch.device(device).type
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if kind == "cpu" and native_bf16_cpu() else "float32"


def int8_per_row(values: torch.Tensor, shift: int = 0, limit: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes in [-limit, limit] and one scale per row (a weight's output channel, or an activation's
    token); `shift=128` gives the same codes + 128 as uint8 (oneDNN's u8 activations, zero point 128)."""
    scales = (values.abs().amax(dim=1, keepdim=True) / limit).clamp(min=1e-12)
    codes = torch.round(values / scales).clamp(-limit, limit)
    return (codes + shift).to(torch.uint8) if shift else codes.to(torch.int8), scales


def reshaped_with_bias(out: torch.Tensor, x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """A kernel's [rows, out] result back in x's shape and dtype, plus the layer's bias."""
    out = out.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)
    return out + layer.bias if layer.bias is not None else out


class Int8WeightOnlyLinear(torch.nn.Module):
    """y = x · (w_int8 · scale)ᵀ + b, with one scale per output channel (symmetric)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        codes, scales = int8_per_row(linear.weight.detach().float())
        self.register_buffer("weight_int8", codes)
        self.register_buffer("scales", scales[:, 0].to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scales.dtype).contiguous()
        return reshaped_with_bias(torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales), x, self)


def int4_quantize(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes in 0..15 [out, in] and per-group scale and zero [out, in / group], asymmetric (min to max)."""
    n, k = weight.shape
    grouped = weight.float().reshape(n, k // group, group)
    lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((grouped - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    return codes, scale, lo + 8 * scale  # the kernel computes (q - 8) * scale + zero


def int4_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    grouped = codes.float().reshape(n, scale.shape[1], -1)
    return ((grouped - 8) * scale[..., None] + zero[..., None]).reshape(n, k)


class Int4WeightOnlyLinear(torch.nn.Module):
    """y = x · w_dequantᵀ + b, w_dequant = (q − 8) · scale + zero per group of INT4_GROUP input channels."""

    def __init__(self, linear: torch.nn.Linear, group: int = INT4_GROUP) -> None:
        super().__init__()
        codes, scale, zero = int4_quantize(linear.weight.detach(), group)
        self.register_buffer("scale_zero", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
                             .to(torch.bfloat16))  # [in / group, out, 2], the kernel's layout
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        self.bias = linear.bias
        self.group, self.in_features, self.out_features = group, linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scale_zero)
        return reshaped_with_bias(out, x, self)


def onednn_int8_available() -> bool:
    """Whether torch has oneDNN's prepacked int8 linear here (any x86 CPU with AVX2 or later)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")


def int8_vnni() -> bool:
    """Whether oneDNN multiplies u8·s8 straight into int32 here (VNNI or AMX). Without it (AVX2, AVX-512 before
    VNNI) vpmaddubsw adds pairs of u8·s8 products in int16 and saturates past 32767: 2·255·127 would, so the
    weights then keep 7 bits (2·255·63 = 32130 never does) and the GEMM stays exact."""
    capped = any(os.environ.get(name) for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"))  # may exclude VNNI
    return onednn_int8_available() and torch.cpu._is_vnni_supported() and not capped


SATURATION_FREE_WEIGHT = 63  # the largest weight code whose u8 pair sums fit int16 (int8_vnni)


class W8A8Linear(torch.nn.Module):
    """Int8 weights (per output channel) times int8 activations (per token, symmetric, quantised on the fly),
    multiplied exactly in integers and rescaled: y = (x_q · w_qᵀ) · s_w · s_x + b.

    The GEMM is oneDNN's, on weights packed once (`onednn.qlinear_prepack`; activations shifted by +128 to u8,
    zero point 128), 1.7-2x torch._int_mm at a step's few rows with VNNI, 10-70x without; else `_int_mm`.
    Integer accumulation is exact either way (7-bit weights where oneDNN would saturate: `int8_vnni`), so a row's
    result never depends on the other rows in its batch, and both give the same numbers for the same codes.
    The codes (`weight_codes`, what the quantised cache saves) are kept until `pack()` lays them out."""

    def __init__(self, linear: torch.nn.Linear, packed: bool | None = None, weight_max: int | None = None) -> None:
        super().__init__()
        self.packed = onednn_int8_available() if packed is None else packed
        self.weight_max = weight_max or (127 if not self.packed or int8_vnni() else SATURATION_FREE_WEIGHT)
        codes, scales = int8_per_row(linear.weight.detach().float(), limit=self.weight_max)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("scales", scales[:, 0].contiguous())
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def pack(self) -> None:
        """Lays the codes out for the GEMM, once (the layouts are derived, so not part of the state dict)."""
        if self.weight_codes is None:
            return
        codes, self.weight_codes = self.weight_codes, None
        if self.packed:
            self.register_buffer("weight_packed", torch.ops.onednn.qlinear_prepack(codes, None), persistent=False)
            self.register_buffer("zero_points", torch.zeros(self.out_features, dtype=torch.int64), persistent=False)
        else:
            self.register_buffer("weight_kn", codes.t().contiguous(), persistent=False)  # [in, out]: _int_mm's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_codes is not None:
            raise RuntimeError("W8A8Linear used before pack() (precision.pack_int8)")
        codes, row_scale = int8_per_row(x.reshape(-1, self.in_features).float(), shift=128 if self.packed else 0)
        if self.packed:
            out = torch.ops.onednn.qlinear_pointwise(codes, 1.0, 128, self.weight_packed, self.scales,
                                                     self.zero_points, None, 1.0, 0, torch.float32, "none", [], "")
        else:
            out = torch._int_mm(codes, self.weight_kn).float() * self.scales
        return reshaped_with_bias(out * row_scale, x, self)


class RowsSwitchedLinear(torch.nn.Module):
    """int4 weight-only for a few rows (small decode steps: int4 reads the fewest bytes), W8A8 for more
    (the int4 kernel's cost jumps from 4-5 rows; on the 0.5B draft's shapes it is 1.7x faster than W8A8 at
    one row, even at four, 1.8x slower at five). A row's result then depends on how many rows share its call:
    a draft only (acceptance moves, never greedy output or the sampled distribution; a seed's draw may: README)."""

    max_int4_rows = 4

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.few, self.many = Int4WeightOnlyLinear(linear), W8A8Linear(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.few if x[..., 0].numel() <= self.max_int4_rows else self.many)(x)


class PromptSplitLinear(torch.nn.Module):
    """W8A8 for the rows of a sequence's prompt, int4 weight-only for the tokens generated after it
    (`prompt_rows`). Without VNNI int4 is the faster of the two below ~12 rows (a decode or verify step) and
    W8A8 above (a prefill); which one computes a position depends on that position alone (prompt or not),
    never on the call or batch it runs in, and both are row-exact: so for the target too, whatever the mode."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.prompt, self.generated = W8A8Linear(linear), Int4WeightOnlyLinear(linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = prompt_rows.current(x)
        if isinstance(rows, bool):
            return (self.prompt if rows else self.generated)(x)
        flat = x.reshape(-1, self.in_features)
        out = flat.new_empty(flat.shape[0], self.out_features)
        for layer, chosen in ((self.prompt, rows), (self.generated, ~rows)):
            if chosen.any():  # the kernels are not asked for zero rows
                out[chosen] = layer(flat[chosen])
        return out.reshape(*x.shape[:-1], self.out_features)


def quantizable(linear: torch.nn.Linear, quant: str) -> bool:
    """The int4 kernel takes whole groups of inputs and outputs in multiples of 16."""
    whole = linear.in_features % INT4_GROUP == 0 and linear.out_features % 16 == 0
    return not quant.startswith("int4") or whole


def quantize_linears(module: torch.nn.Module, quant: str, pack: bool = True) -> int:
    """Replaces every nn.Linear (the output head included) with its quantised form, in place;
    returns how many were replaced. Embeddings stay in the model's dtype (a lookup reads one row).
    `pack=False` leaves W8A8 codes unpacked, to be saved first (quantized_cache), then `pack_int8`."""
    if quant == "none":
        return 0
    if quant not in QUANTS:
        raise ValueError(f"unknown quantisation {quant!r}; choose from {', '.join(QUANTS)}")
    replaced = _replace_linears(module, quant)
    if pack:
        pack_int8(module)
    return replaced


def pack_int8(module: torch.nn.Module) -> None:
    """Packs every W8A8 linear's codes for its GEMM (and drops them)."""
    for child in module.modules():
        if isinstance(child, W8A8Linear):
            child.pack()


def _replace_linears(module: torch.nn.Module, quant: str) -> int:
    from minedraft.engine.fbgemm_w8a8 import FbgemmW8A8Linear  # a W8A8Linear: imports this module

    layer = {"int8": Int8WeightOnlyLinear, "int4": Int4WeightOnlyLinear, "w8a8": W8A8Linear,
             "w8a8-fbgemm": FbgemmW8A8Linear, "int4-w8a8": RowsSwitchedLinear,
             "int4-w8a8-prompt": PromptSplitLinear}[quant]
    replaced = fuse_siblings(module, layer, lambda linear: quantizable(linear, quant)) if quant in FUSED_QUANTS else 0
    for name, child in module.named_children():
        if isinstance(child, GroupMember):
            continue
        if isinstance(child, torch.nn.Linear) and quantizable(child, quant):
            setattr(module, name, layer(child))
            replaced += 1
        else:
            replaced += _replace_linears(child, quant)
    return replaced


ONEDNN_MIN_PARAMS = 1 << 20


def use_onednn_linears(module: torch.nn.Module, min_params: int = ONEDNN_MIN_PARAMS) -> int:
    """Swaps large float32 CPU linears for oneDNN (mkldnn) ones; returns how many were swapped.

    On CPU, F.linear takes a much slower GEMM path for a few rows than for one: a 5-token verify of the
    1.5B target cost 2.0x a 1-token decode at batch 1. oneDNN brings that to 1.3x and cuts batch-8
    decode by a third. Small layers are left alone: there oneDNN's overhead dominates.
    """
    swapped = 0
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear) and child.in_features * child.out_features >= min_params:
            setattr(module, name, torch.utils.mkldnn.to_mkldnn(torch.nn.Sequential(child))[0])
            swapped += 1
        else:
            swapped += use_onednn_linears(child, min_params)
    return swapped
