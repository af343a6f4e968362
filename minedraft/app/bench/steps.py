"""`minedraft bench-steps`: one model step's time against its memory-bandwidth floor, per KV layout.

A decode step must at least read every weight once and its sequences' cached keys/values, so those bytes
(`step_bytes`) / measured copy bandwidth is its floor; at small batches a well-run step sits near it, and an
eager, launch-bound one far above. Each row also reports the bytes its layout actually moves (the KV copies
of the dynamic and gathered static caches), so a layout that moves more shows it against the same floor.
Measures draft-style decode (1 token per sequence) and target-style verify (k+1 tokens) at each
batch size, for the dynamic cache, the static cache, and the static cache replayed as CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from minedraft.app.bench.step_bytes import KVGeometry, held_tensors, layout_kv_bytes, real_kv_bytes, weight_bytes
from minedraft.app.bench.step_profile import split_ms, split_text
from minedraft.engine.model_runner import ModelRunner, SequenceState
from minedraft.engine.precision import resolve_dtype
from minedraft.engine.static_kv import StaticKV
from minedraft.models.random_shapes import is_random
from minedraft.models.store import resolve_model

log = logging.getLogger(__name__)
LAYOUTS = ("dynamic", "static", "gather", "graphs")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="random:qwen2.5-0.5b,random:qwen2.5-1.5b",
                        help="comma list: random:SHAPE, presets or folders")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="a dtype, or auto (precision.resolve_dtype)")
    parser.add_argument("--quants", default="none", help="comma list of weight formats: none, int8, int4 (CPU)")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--context", default="512", help="prompt tokens per sequence before timing (a comma list)")
    parser.add_argument("--k", type=int, default=4, help="verify feeds k+1 tokens per sequence")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU: 1, as a pinned service)")
    parser.add_argument("--profile", action="store_true",
                        help="also split one step's time into copy / attention / GEMM / other (step_profile)")
    parser.add_argument("--out", default="runs/steps")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, size_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes moved per second (read + written) by a device-to-device copy."""
    if device.type == "cpu":
        size_bytes = min(size_bytes, 1 << 28)
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    return 2 * size_bytes * repeats / (time.perf_counter() - started)


def runner_for(model, device: torch.device, layout: str, batch: int, max_context: int, k: int) -> ModelRunner:
    """dynamic; static (attention reads slots in place); gather (the static cache gathered per step, as before
    slot_attention: for the before/after in one run); graphs (static, its start-up grid captured)."""
    if layout == "dynamic":
        return ModelRunner(model, device)
    static = StaticKV(model.config, batch, max_context, next(model.parameters()).dtype, device,
                      pad_shapes=layout == "graphs", attention="gather" if layout == "gather" else None)
    runner = ModelRunner(model, device, static, cuda_graphs=layout == "graphs")
    runner.capture_graphs(k + 1)
    return runner


def step_once(runner: ModelRunner, states: list[SequenceState], feed: int) -> float:
    """Ms of one forward feeding `feed` tokens per sequence; the cache is rolled back after it."""
    lengths = [len(s.tokens) for s in states]
    for s in states:
        s.tokens.extend([7] * feed)
    synchronize(runner.device)
    started = time.perf_counter()
    runner.forward(states, logits_to_keep=feed)
    synchronize(runner.device)
    elapsed = (time.perf_counter() - started) * 1e3
    for s, length in zip(states, lengths, strict=True):
        s.truncate(length)
    return elapsed


def time_step(runner: ModelRunner, states: list[SequenceState], feed: int, repeats: int) -> float:
    """Median ms of `repeats` steps, after three that warm up."""
    times = [step_once(runner, states, feed) for _ in range(repeats + 3)]
    return statistics.median(times[3:])


def measure(spec: str, args: argparse.Namespace, bandwidth: float, quant: str) -> list[dict]:
    device = torch.device(args.device)
    path = spec if is_random(spec) else str(resolve_model(spec))
    model = ModelRunner.load(path, args.device, args.dtype, threads=args.threads, kv="dynamic", quant=quant).model
    rows = []
    for layout in args.layouts.split(","):
        if layout == "graphs" and device.type != "cuda":
            print(f"{spec}: skipping CUDA graphs: no CUDA device here ({args.device})", flush=True)
            continue
        for context in (int(c) for c in args.context.split(",")):
            for batch in (int(b) for b in args.batches.split(",")):
                rows += measure_one(model, spec, args, bandwidth, quant, layout, batch, context)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure_one(model, spec: str, args: argparse.Namespace, bandwidth: float, quant: str, layout: str, batch: int,
                context: int) -> list[dict]:
    device = torch.device(args.device)
    runner = runner_for(model, device, layout, batch, context + args.k + 8, args.k)
    generator = torch.Generator().manual_seed(batch)
    states = [SequenceState(torch.randint(0, 1000, (context,), generator=generator).tolist()) for _ in range(batch)]
    runner.forward(states, logits_to_keep=1)  # prefill, not timed
    kv_lens = [s.kv_len for s in states]  # each step rolls back to these
    geo = KVGeometry.of(model.config, runner.static.dtype if runner.static else runner.dtype)
    rows = []
    for op, feed in (("decode", 1), (f"verify k+1={args.k + 1}", args.k + 1)):
        ms = time_step(runner, states, feed, args.repeats)
        weights = weight_bytes(model, batch * feed, exclude=held_tensors(runner.static))
        kv = layout_kv_bytes(layout, geo, kv_lens, feed, runner.static)
        # The floor counts the KV bytes a step must read, not what this layout moves: one floor for
        # every layout of a model/op/batch, so extra copies show in x_floor.
        floor_ms = (weights + real_kv_bytes(geo, kv_lens, feed)) / bandwidth * 1e3
        row = {"model": spec, "quant": quant, "layout": layout, "op": op, "batch": batch, "context": context,
               "ms": ms, "weight_bytes": weights, "kv_bytes": kv, "bytes_moved": weights + kv, "floor_ms": floor_ms,
               "x_floor": ms / floor_ms}
        if args.profile:
            row["split_ms"] = split_ms(lambda feed=feed: step_once(runner, states, feed), device)
        rows.append(row)
        print(f"{spec} {quant:4s} {layout:8s} {op:14s} B={batch:<3d} ctx={context:<5d} {ms:8.2f} ms  "
              f"({ms / floor_ms:5.1f}x floor of {floor_ms:.2f} ms; {(weights + kv) / 1e6:.1f} MB moved)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | weights | layout | op | batch | context | ms | floor ms | × floor | MB moved | split ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['quant']} | {r['layout']} | {r['op']} | {r['batch']} | {r['context']} | "
              f"{r['ms']:.2f} | {r['floor_ms']:.2f} | {r['x_floor']:.1f} | {r['bytes_moved'] / 1e6:.1f} | "
              f"{split_text(r.get('split_ms'))} |" for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)
    rows = [row for spec in args.models.split(",") for quant in args.quants.split(",")
            for row in measure(spec, args, bandwidth, quant)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": name, "dtype": resolve_dtype(args.dtype, args.device), "threads": torch.get_num_threads(),
              "context": [int(c) for c in args.context.split(",")], "k": args.k,
              "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": rows}
    (out / "steps.json").write_text(json.dumps(result, indent=2))
    (out / "steps.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0
