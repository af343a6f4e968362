"""The GPU check's closing tables (scripts/gpu-check): step times against the floor with their split, agreement,
host time and start-up, the modes, and the targets of #7 and #19."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def step_lines(steps: dict) -> list[str]:
    batches = sorted({r["batch"] for r in steps["rows"]})
    lines = [f"Step times on {steps['device']} ({steps['dtype']}), copy bandwidth "
             f"{steps['copy_bandwidth_gb_s']:.0f} GB/s; each cell: ms (× the floor: weights and KV read once); "
             f"floor and bytes moved per batch, in the order {', '.join(f'B={b}' for b in batches)}", "",
             "| model | layout | op | context | floor ms | MB moved | " + " | ".join(f"B={b}" for b in batches) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(batches)]
    keys = dict.fromkeys((r["model"], r["layout"], r["op"], r.get("context")) for r in steps["rows"])
    for model, layout, op, context in keys:
        cells = {r["batch"]: r for r in steps["rows"]
                 if (r["model"], r["layout"], r["op"], r.get("context")) == (model, layout, op, context)}
        # The floor and the bytes grow with the batch (KV read, embedding rows), so each batch has its own.
        floors = " / ".join(f"{cells[b]['floor_ms']:.2f}" for b in batches if b in cells)
        moved = " / ".join(f"{cells[b]['bytes_moved'] / 1e6:.1f}" if "bytes_moved" in cells[b] else "–"
                           for b in batches if b in cells)
        lines.append(f"| {model} | {layout} | {op} | {context} | {floors} | {moved} | " + " | ".join(
            f"{cells[b]['ms']:.2f} ({cells[b]['x_floor']:.1f}×)" if b in cells else "–" for b in batches) + " |")
    split = [r for r in steps["rows"] if r.get("split_ms")]
    if split:
        lines += ["", "Where each step's time goes (profiler, ms): copy / attention / GEMM / other", "",
                  "| layout | op | batch | context | copy | attention | GEMM | other |", "|---" * 8 + "|"]
        lines += [f"| {r['layout']} | {r['op']} | {r['batch']} | {r.get('context')} | " + " | ".join(
            f"{r['split_ms'][label]:.2f}" for label in ("copy", "attention", "gemm", "other")) + " |" for r in split]
    return lines


def check_lines(checks: dict) -> list[str]:
    agreement, host = checks["agreement"], checks["host"]
    lines = ["", f"Greedy agreement with the eager static cache ({agreement['model']}, {agreement['dtype']}, 40 steps, "
             f"joins, feeds, rollbacks); graphs: {agreement['graphs'] or 'none (no CUDA)'}", "",
             "| layout | tokens equal | first difference per sequence |", "|---|---|---|"]
    lines += [f"| {layout} | {a['fraction']:.3f} | {a['first_difference']} |"
              for layout, a in agreement["agreement_with_static"].items()]
    lines += ["", f"Host time per call at B = {host['batch']}, k = {host['k']}, context {host['context']} "
              f"({host['draft']} → {host['target']})", "", "| call | wall ms | forwards ms | host ms | host share |",
              "|---|---|---|---|---|"]
    lines += [f"| {name} | {c['wall_ms']:.2f} | {c['forward_ms']:.2f} | {c['host_ms']:.2f} | {c['host_share']:.1%} |"
              for name, c in host["calls"].items()]
    lines += ["", "| engine | load s | graphs | capture s | peak GiB |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {e['load_s']:.1f} | {e['graphs']} | {e['capture_s']:.1f} | "
              f"{'–' if e['peak_gib'] is None else format(e['peak_gib'], '.1f')} |"
              for name, e in host["startup"].items()]
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


def target_lines(steps: dict, bench: dict, checks: dict) -> list[str]:
    graph_rows = [r for r in steps["rows"] if r["layout"] == "graphs" and r["batch"] <= 32]
    decode = max((r["x_floor"] for r in graph_rows if r["op"] == "decode"), default=None)
    verify = max((r["x_floor"] for r in graph_rows if r["op"] != "decode"), default=None)
    host = max(c["host_share"] for c in checks["host"]["calls"].values())
    psd, sd = bench["modes"].get("psd", {}), bench["modes"].get("sd", {})
    overlap = bench.get("overlap_efficiency")
    ar_digests, psd_digests = bench["modes"].get("ar", {}).get("token_digests", {}), psd.get("token_digests", {})
    same = sum(psd_digests.get(i) == d for i, d in ar_digests.items())
    graphs = checks["agreement"]["graphs"]

    def verdict(value: float | None, limit: float, text: str) -> str:
        return "skipped (no CUDA)" if value is None else f"{'✓' if value <= limit else '✗'} {text.format(value)}"
    rows = [
        ("decode steps ≤ 1.5× floor (graphs, B ≤ 32)", verdict(decode, 1.5, "worst {:.2f}×")),
        ("verify(5) steps ≤ 2× floor (graphs, B ≤ 32)", verdict(verify, 2.0, "worst {:.2f}×")),
        ("host time ≤ 5 % of a propose / verify call", f"{'✓' if host <= 0.05 else '✗'} worst {host:.1%}"),
        ("no failed graph capture", "skipped (no CUDA)" if not graphs else
         f"{'✓' if graphs['failed'] == 0 else '✗'} {graphs['captured']} captured, {graphs['failed']} failed"),
        ("psd beats sd", f"{'✓' if psd and sd and psd['throughput_tok_s'] > sd['throughput_tok_s'] else '✗'} "
                         f"psd/sd {bench.get('psd_over_sd', 0):.2f}"),
        ("overlap efficiency ≥ 0.8", "–" if overlap is None else f"{'✓' if overlap >= 0.8 else '✗'} {overlap:.2f}"),
        ("psd == ar tokens (greedy)", f"{'✓' if ar_digests and same == len(ar_digests) else '✗'} "
                                      f"{same}/{len(ar_digests)} requests"),
    ]
    return ["", "| target | result |", "|---|---|", *(f"| {name} | {result} |" for name, result in rows)]


def main(out: str) -> None:
    """Prints the tables of the stages that wrote their results; a failed stage's are named as missing."""
    parts = {"steps": Path(out) / "steps" / "steps.json", "checks": Path(out) / "checks.json",
             "bench": Path(out) / "bench" / "results.json"}
    found = {name: json.loads(path.read_text()) for name, path in parts.items() if path.exists()}
    lines = [f"(no {path.relative_to(out)}: its stage failed)" for name, path in parts.items() if name not in found]
    makers = {"steps": step_lines, "checks": check_lines, "bench": mode_lines}
    for name, part in found.items():
        lines += makers[name](part)
    if len(found) == len(parts):
        lines += target_lines(found["steps"], found["bench"], found["checks"])
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
