"""`minedraft bench --paper-table`: the MineDraft paper's table, in shape, on this machine.

ShareGPT chats with fixed output lengths (--ignore-eos): ar (target-only), sd, psd, tetris (psd with TETRIS
selection), psd2c, tetris2c (the same holding 2C requests: the paper's convention) and auto, at each k and
concurrency C (sd's lane size). Each k is one ordinary bench run (its own results.json and report.md under
OUT/k<k>); the table puts every mode's throughput and end-to-end latency beside sd's at the same C."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

MODES = ("ar", "sd", "psd", "tetris", "psd2c", "tetris2c", "auto")  # ar: target-only, the plain baseline
COLUMNS = [m for m in MODES if m != "sd"]


def run_paper_table(args: argparse.Namespace, run: Callable[[argparse.Namespace], int]) -> int:
    base = Path(args.out)
    tables = {}
    for k in [int(v) for v in args.paper_k.split(",")]:
        each = argparse.Namespace(**{**vars(args), "paper_table": False, "workload": "sharegpt", "ignore_eos": True,
                                     "modes": ",".join(MODES), "concurrency": args.paper_lanes, "k": k,
                                     "num_prompts": 0, "prompts_per_concurrency": max(1, args.prompts_per_concurrency),
                                     "out": str(base / f"k{k}")})
        run(each)
        tables[k] = json.loads((base / f"k{k}" / "results.json").read_text())
    text = table(tables, args)
    (base / "paper-table.md").write_text(text)
    print(text)
    return 0


def ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}" if value and reference else "–"


def table(results: dict[int, dict], args: argparse.Namespace) -> str:
    """Throughput over sd's (higher is better) and p50 end-to-end latency over sd's (lower is better)."""
    lines = ["# The MineDraft paper's table, on this machine", "",
             f"ShareGPT (first human turn, seed {args.seed}), {args.max_tokens} tokens per request (--ignore-eos), "
             f"TETRIS e = {args.tetris_extra}; each cell: throughput / p50 e2e latency, both over sd's at the "
             "same k and C. psd and tetris hold C requests (two lanes of C/2); psd2c and tetris2c hold 2C (two "
             "lanes of C, the paper's convention).", "",
             "| k | C | sd tok/s | sd e2e p50 s | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|---|" + "---|" * len(COLUMNS)]
    for k, result in results.items():
        for concurrency, level in result["runs"].items():
            modes = level["modes"]
            sd = modes["sd"]
            cells = [f"{ratio(modes[m]['throughput_tok_s'], sd['throughput_tok_s'])} / "
                     f"{ratio(modes[m]['e2e_latency_s']['p50'], sd['e2e_latency_s']['p50'])}" for m in COLUMNS]
            lines.append(f"| {k} | {concurrency} | {sd['throughput_tok_s']:.1f} | {sd['e2e_latency_s']['p50']:.1f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
