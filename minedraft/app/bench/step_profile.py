"""Where one model step's time goes: copies, attention, matrix multiplies and the rest (`bench-steps --profile`).

torch's profiler over one step; on a GPU the kernels' own device time (CUPTI sees the kernels a CUDA graph
replays), on a CPU the operators' self time. Each kernel or operator is put in the first category whose
words its name holds, so the split adds up to the step's total."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

CATEGORIES = (
    ("attention", ("flash", "fmha", "attn", "attention", "scaled_dot_product")),
    ("gemm", ("gemm", "matmul", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "linear",
              "mkldnn", "onednn", "_weight_int")),
    ("copy", ("copy", "memcpy", "memset", "index", "gather", "scatter", "cat", "fill", "clone", "contiguous")),
)


def category(name: str) -> str:
    lowered = name.lower()
    return next((label for label, words in CATEGORIES if any(word in lowered for word in words)), "other")


def split_ms(step: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Milliseconds of one call of `step` per category (and their total)."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    totals = {label: 0.0 for label, _ in CATEGORIES} | {"other": 0.0}
    for event in prof.key_averages():
        if cuda and event.device_type != torch.autograd.DeviceType.CUDA:
            continue  # an operator's device time is its kernels', which are counted themselves
        micros = event.self_device_time_total if cuda else event.self_cpu_time_total
        if micros > 0:
            totals[category(event.key)] += micros / 1e3
    totals["total"] = sum(totals.values())
    return totals


def split_text(split: dict[str, float] | None) -> str:
    """'copy 1.2 / attention 3.4 / gemm 20.1 / other 2.0', or '–' without a profile."""
    if not split:
        return "–"
    return " / ".join(f"{label} {split[label]:.1f}" for label in ("copy", "attention", "gemm", "other"))
