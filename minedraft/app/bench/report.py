"""Writes results.json, report.md and the PNG plots of a benchmark run."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from minedraft.app.bench.metrics import Event

COLUMNS = [("throughput tok/s", "throughput_tok_s"), ("TTFT p50 s", "ttft_s.p50"), ("TPOT p50 s", "tpot_s.p50"),
           ("e2e p50 s", "e2e_latency_s.p50"), ("e2e p90 s", "e2e_latency_s.p90"),
           ("e2e p99 s", "e2e_latency_s.p99"), ("α", "alpha"), ("τ", "tau"), ("t_draft ms", "t_draft_ms"),
           ("t_verify ms", "t_verify_ms"), ("lane batch", "mean_lane_batch"), ("draft busy", "busy_fraction.draft"),
           ("target busy", "busy_fraction.target"), ("router+gRPC", "router_overhead_frac")]


def _get(summary: dict, dotted: str):
    value = summary
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _runs_table(modes: dict[str, dict]) -> list[str]:
    """Each repeat of each mode, in its own run order: shows how far the machine drifted between them."""
    if not all("runs_throughput_tok_s" in summary for summary in modes.values()):
        return []
    lines = ["", "| mode | tok/s by run | t_draft ms by run | t_verify ms by run |", "|---|---|---|---|"]
    for mode, summary in modes.items():
        lines.append(f"| {mode} | " + " | ".join(" / ".join(_fmt(v) for v in summary[key]) for key in (
            "runs_throughput_tok_s", "runs_t_draft_ms", "runs_t_verify_ms")) + " |")
    return lines


def markdown(results: dict) -> str:
    lines = [f"# minedraft bench — {results['settings']['workload']}", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in results["settings"].items()), "",
             "Machine: " + results["machine"], ""]
    if "engine" in results:
        lines += ["Engine: " + ", ".join(f"{k}={v}" for k, v in results["engine"].items()), ""]
    for concurrency, run in results["runs"].items():
        lines += [f"## concurrency {concurrency}", "", "| mode | " + " | ".join(c for c, _ in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
        for mode, summary in run["modes"].items():
            lines.append(f"| {mode} | " + " | ".join(_fmt(_get(summary, key)) for _, key in COLUMNS) + " |")
        lines += _runs_table(run["modes"])
        lines += ["", "Cores: " + "; ".join(f"{mode}: {summary['layout']}" for mode, summary in run["modes"].items()
                                          if "layout" in summary)]
        failed = [f"{mode} {summary['errors']} of {summary['requests']} (context {summary.get('context', '–')})"
                  for mode, summary in run["modes"].items() if summary.get("errors")]
        if failed:
            lines += ["", "Failed requests, left out of every column: " + ", ".join(failed)]
        lines += ["", "| ratio | value |", "|---|---|"]
        lines += [f"| {name} | {_fmt(value)} |" for name, value in run["comparison"].items()]
        lines.append("")
    lines += ["psd2c is the seed paper's convention (PSD holding 2C requests against SD holding C); every other "
              "ratio compares modes at the same concurrency."]
    return "\n".join(lines) + "\n"


def plot_modes(run: dict, path: Path) -> None:
    modes = list(run["modes"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(modes, [run["modes"][m]["throughput_tok_s"] for m in modes], color="tab:blue")
    left.set_ylabel("generated tokens / s")
    left.set_title("throughput")
    for i, q in enumerate(("p50", "p90", "p99")):
        right.bar([x + (i - 1) * 0.25 for x in range(len(modes))],
                  [run["modes"][m]["e2e_latency_s"][q] or 0 for m in modes], width=0.25, label=q)
    right.set_xticks(range(len(modes)), modes)
    right.set_ylabel("seconds")
    right.set_title("end-to-end latency")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timeline(events: list[Event], path: Path, stretch_s: float = 20.0) -> None:
    """When each device was busy, with which lane and doing what, over a stretch of the psd run."""
    calls = [e for e in events if e.kind != "prefill"] or events
    if not calls:
        return
    t0 = sorted(e.start for e in calls)[len(calls) // 4]  # skip the start-up transient
    shown = [e for e in events if t0 <= e.start <= t0 + stretch_s]
    colors = {0: "tab:blue", 1: "tab:orange"}
    fig, ax = plt.subplots(figsize=(12, 2.6))
    for row, device in enumerate(("draft", "target")):
        for e in (e for e in shown if e.device == device):
            ax.broken_barh([(e.start - t0, e.end - e.start)], (row - 0.35, 0.7),
                           facecolors=colors.get(e.lane, "gray"), edgecolor="black" if e.kind == "prefill" else None)
    ax.set_yticks([0, 1], ["draft", "target"])
    ax.set_xlabel("seconds (blue: lane 0, orange: lane 1, outlined: prefill)")
    ax.set_title("device timeline, psd")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    by_mode: dict[str, list[tuple[float, float, str]]] = {}
    for concurrency, run in results["runs"].items():
        for mode, summary in run["modes"].items():
            by_mode.setdefault(mode, []).append(
                (summary["e2e_latency_s"]["p50"] or 0, summary["throughput_tok_s"], concurrency))
    for mode, points in by_mode.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mode)
        for x, y, c in points:
            ax.annotate(f"C={c}", (x, y), fontsize=7)
    ax.set_xlabel("end-to-end latency p50 (s)")
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_title("throughput against latency, by concurrency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results: dict, psd_events: list[Event] | None, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(markdown(results))
    last = list(results["runs"].values())[-1]
    plot_modes(last, out / "modes.png")
    if psd_events:
        plot_timeline(psd_events, out / "timeline_psd.png")
    if len(results["runs"]) > 1:
        plot_sweep(results, out / "sweep.png")
