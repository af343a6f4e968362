"""The GPU check's closing table (scripts/gpu-check): step times against the floor, modes, and #7's targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def step_lines(steps: dict) -> list[str]:
    batches = sorted({r["batch"] for r in steps["rows"]})
    lines = [f"Step times on {steps['device']} ({steps['dtype']}, context {steps['context']}), copy bandwidth "
             f"{steps['copy_bandwidth_gb_s']:.0f} GB/s; each cell: ms (× the floor: weights and KV read once); "
             f"floor and bytes moved per batch, in the order {', '.join(f'B={b}' for b in batches)}", "",
             "| model | layout | op | floor ms | MB moved | " + " | ".join(f"B={b}" for b in batches) + " |",
             "|---|---|---|---|---|" + "---|" * len(batches)]
    keys = dict.fromkeys((r["model"], r["layout"], r["op"]) for r in steps["rows"])
    for model, layout, op in keys:
        cells = {r["batch"]: r for r in steps["rows"] if (r["model"], r["layout"], r["op"]) == (model, layout, op)}
        # The floor and the bytes grow with the batch (KV read, embedding rows), so each batch has its own.
        floors = " / ".join(f"{cells[b]['floor_ms']:.2f}" for b in batches if b in cells)
        moved = " / ".join(f"{cells[b]['bytes_moved'] / 1e6:.1f}" if "bytes_moved" in cells[b] else "–"
                           for b in batches if b in cells)
        lines.append(f"| {model} | {layout} | {op} | {floors} | {moved} | " + " | ".join(
            f"{cells[b]['ms']:.2f} ({cells[b]['x_floor']:.1f}×)" if b in cells else "–" for b in batches) + " |")
    return lines


def mode_lines(bench: dict) -> list[str]:
    lines = ["", f"Modes at concurrency {bench['settings']['concurrency']} ({bench['models']['draft']} → "
             f"{bench['models']['target']}, separate processes on one device)", "",
             "| mode | tok/s | α | τ | t_draft ms | t_verify ms | busier device busy |",
             "|---|---|---|---|---|---|---|"]
    for mode, m in bench["modes"].items():
        busiest = max(m["busy_fraction"].values())
        lines.append(f"| {mode} | {m['throughput_tok_s']:.1f} | {m['alpha'] or 0:.2f} | {m['tau'] or 1:.2f} | "
                     f"{m['t_draft_ms'] or 0:.1f} | {m['t_verify_ms'] or 0:.1f} | {busiest:.2f} |")
    return lines


def target_lines(steps: dict, bench: dict) -> list[str]:
    graph_rows = [r for r in steps["rows"] if r["layout"] == "graphs" and r["batch"] <= 8]
    worst = max((r["x_floor"] for r in graph_rows), default=None)
    psd, sd = bench["modes"].get("psd", {}), bench["modes"].get("sd", {})
    overlap = bench.get("overlap_efficiency")
    checks = [
        ("CUDA-graph steps within 2× floor at B 1–8", "skipped (no CUDA)" if worst is None else
         f"{'✓' if worst <= 2 else '✗'} worst {worst:.1f}×"),
        ("psd beats sd", f"{'✓' if psd and sd and psd['throughput_tok_s'] > sd['throughput_tok_s'] else '✗'} "
                         f"psd/sd {bench.get('psd_over_sd', 0):.2f}"),
        ("overlap efficiency ≥ 0.8", "–" if overlap is None else f"{'✓' if overlap >= 0.8 else '✗'} {overlap:.2f}"),
    ]
    return ["", "| target | result |", "|---|---|", *(f"| {name} | {result} |" for name, result in checks)]


def main(out: str) -> None:
    steps = json.loads((Path(out) / "steps" / "steps.json").read_text())
    bench = json.loads((Path(out) / "bench" / "results.json").read_text())
    print("\n".join(step_lines(steps) + mode_lines(bench) + target_lines(steps, bench)))


if __name__ == "__main__":
    main(sys.argv[1])
