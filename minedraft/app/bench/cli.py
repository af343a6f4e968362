"""`minedraft bench`: every mode on the same workload and concurrency, in one run, reported as ratios."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from minedraft.app.bench.driver import MODE_SPECS, cluster_args, run_mode
from minedraft.app.bench.metrics import compare_modes, summarise_runs
from minedraft.app.bench.peer import parse_peers, run_peer
from minedraft.app.bench.report import write_all
from minedraft.app.bench.workloads import load_prompts
from minedraft.app.launcher import cpu_layout, free_port
from minedraft.engine.precision import int8_vnni, native_bf16_cpu, resolve_dtype, resolve_quant
from services.router.drafting import DRAFT_STOP_BELOW

MODES = tuple(MODE_SPECS)
SHAREGPT_CONTEXT = 2048  # the longest prompt + max tokens drawn from ShareGPT when the context is sized to fit


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modes", default="ar,sd,psd,psd2c",
                        help="comma list of ar, sd, psd, auto, psd2c (psd with 2C in flight: the seed's convention), "
                             "tetris and tetris2c (psd and psd2c with TETRIS selection, --tetris-extra)")
    parser.add_argument("--workload", default="humaneval", help="humaneval, chat, sharegpt or a JSONL file")
    parser.add_argument("--seed", type=int, default=0, help="which ShareGPT conversations are drawn")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="every request generates exactly --max-tokens tokens (the seed paper's fixed lengths)")
    parser.add_argument("--tetris-extra", type=int, default=3, help="extra drafts per sequence in the tetris modes")
    parser.add_argument("--draft-stop-below", type=float, default=DRAFT_STOP_BELOW,
                        help="the router's --draft-stop-below (0: every round drafts k per sequence)")
    parser.add_argument("--paper-table", action="store_true",
                        help="the seed paper's table: ar, sd, psd, tetris, psd2c, tetris2c and auto over k in {2, 4} "
                             "and lane sizes {4, 8, 16}, ShareGPT, fixed output length (paper_table.py)")
    parser.add_argument("--paper-k", default="2,4", help="--paper-table: the k values")
    parser.add_argument("--paper-lanes", default="4,8,16", help="--paper-table: the concurrencies (sd's lane size)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompts-per-concurrency", type=int, default=0,
                        help="sweeps: run at least this many prompts per unit of concurrency, so every level is "
                             "saturated for about as many rounds")
    parser.add_argument("--concurrency", default="8", help="one value, or a comma list for a sweep")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--draft-model", default="default-draft")
    parser.add_argument("--target-model", default="default-target")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--draft-quant", default="auto", help="none, int8, int4 or auto (see `minedraft serve`)")
    parser.add_argument("--target-quant", default="auto", help="none, int8, int4 or auto")
    parser.add_argument("--draft-vocab", type=int, default=0,
                        help="the draft's --vocab: draft over the first N token ids only (0: the whole vocabulary)")
    parser.add_argument("--cpu-layout", default="auto", help="auto, split, shared or none (see `minedraft serve`)")
    parser.add_argument("--peer", action="append", default=[],
                        help="another server driven with the same prompts: NAME=URL (OpenAI-compatible), or "
                             "llamacpp / llamacpp-spec (started from scripts/peer-llamacpp); repeatable")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--draft-device", default=None)
    parser.add_argument("--tokenizer", default=None, help="the router's tokenizer (needed with random: models)")
    parser.add_argument("--kv", default="auto", choices=["auto", "dynamic", "static"])
    parser.add_argument("--max-context", type=int, default=0,
                        help="static KV: most tokens per sequence (0: up to 4096, shrunk to what fits in memory, as "
                             "`minedraft serve` sizes it; a float32 cache of 66 sequences x 2048 missed at C = 32)")
    parser.add_argument("--warmup-requests", type=int, default=2,
                        help="requests run (of --max-tokens each) before measuring; on a GPU use the concurrency, so "
                             "every batch shape's CUDA graph is captured before the clock starts")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every mode this many times per concurrency, interleaved and counterbalanced "
                             "(sd, psd, auto, auto, psd, sd, …), and pool them: a shared machine's drift in "
                             "speed then falls on every mode alike")
    parser.add_argument("--out", default="runs/bench")


def machine() -> str:
    cores = len(os.sched_getaffinity(0))
    return f"{platform.processor() or platform.machine()}, {cores} cores, {platform.system()} {platform.release()}"


def engine_record(args: argparse.Namespace) -> dict:
    """What the models ran as: the resolved dtype and weight formats, and what the CPU offers."""
    draft_device = args.draft_device or args.device
    return {"dtype": resolve_dtype(args.dtype, args.device), "draft_dtype": resolve_dtype(args.dtype, draft_device),
            "draft_quant": resolve_quant(args.draft_quant, "draft", draft_device),
            "target_quant": resolve_quant(args.target_quant, "target", args.device),
            "draft_vocab": args.draft_vocab, "cpu_native_bf16": native_bf16_cpu(), "cpu_int8_vnni": int8_vnni(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # what auto chose by: machines differ


def layout_of(args: argparse.Namespace, mode: str) -> str:
    """Which cores each service of this mode's cluster ran on (README: CPU layouts)."""
    layout = cpu_layout(cluster_args(args, mode, max_batch=1))
    cores = len(os.sched_getaffinity(0))
    return {"split": f"split: draft {cores // 2} core(s), target {cores - cores // 2}, pinned",
            "shared": f"shared: {cores} cores, all to a stage running alone, half each while both run",
            "none": "unpinned"}[layout] if mode != "ar" or layout == "none" else f"target alone on {cores} cores"


def run_order(modes: list[str], repeats: int, block: int = 0) -> list[str]:
    """Modes in the order they run at the `block`-th concurrency: every repeat runs each once, and odd repeats run
    them backwards (ABC CBA), so a steady drift in the machine's speed over a pair of repeats puts every mode at
    the same mean time. Odd blocks start backwards, so a sweep of one repeat does not always run the same mode
    last (auto, last in every block, measured 0.91x and 0.89x ar at C = 8 and 32, and 0.98x and 1.05x run alone)."""
    return [mode for repeat in range(repeats) for mode in (modes if (repeat + block) % 2 == 0 else modes[::-1])]


def load(args: argparse.Namespace, count: int) -> list[dict]:
    """The workload's first `count` prompts; ShareGPT's drawn with --seed, among those that fit the context."""
    fits = None
    if args.workload == "sharegpt":
        from transformers import AutoTokenizer

        from minedraft.models.store import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.tokenizer or args.target_model))
        room = (args.max_context or SHAREGPT_CONTEXT) - args.max_tokens
        fits = lambda text: 4 <= len(tokenizer.encode(text)) <= room  # noqa: E731
    return load_prompts(args.workload, count, seed=args.seed, fits=fits)


def run(args: argparse.Namespace) -> int:
    if args.paper_table:
        from minedraft.app.bench.paper_table import run_paper_table

        return run_paper_table(args, run)
    os.environ.setdefault("MINEDRAFT_LOG_LEVEL", "WARNING")
    modes = [m for m in args.modes.split(",") if m]
    peers = parse_peers(args.peer)
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    started = time.time()
    results: dict = {
        "settings": {"workload": args.workload, "num_prompts": args.num_prompts,
                     "prompts_per_concurrency": args.prompts_per_concurrency, "max_tokens": args.max_tokens,
                     "k": args.k, "rate": args.rate, "dtype": args.dtype, "device": args.device,
                     "concurrency": args.concurrency, "repeats": args.repeats,
                     "draft_quant": args.draft_quant, "target_quant": args.target_quant,
                     "cpu_layout": args.cpu_layout, "peers": args.peer, "ignore_eos": args.ignore_eos,
                     "tetris_extra": args.tetris_extra, "draft_stop_below": args.draft_stop_below, "seed": args.seed},
        "models": {"draft": args.draft_model, "target": args.target_model},
        "machine": machine(),
        "engine": engine_record(args),
        "runs": {},
    }
    psd_events = None
    out = Path(args.out)
    for block, concurrency in enumerate(concurrencies):
        prompts = max(args.num_prompts, args.prompts_per_concurrency * concurrency)
        # psd2c holds twice the requests (the seed paper's convention); every other mode runs at `concurrency`.
        scaled = {mode: MODE_SPECS[mode][1] for mode in modes}
        items = {mode: load(args, prompts * scaled[mode]) for mode in modes}
        items.update({name: load(args, prompts) for name in peers})
        raws: dict[str, list[dict]] = {mode: [] for mode in [*modes, *peers]}
        for mode in run_order([*modes, *peers], args.repeats, block):
            if mode in peers:
                warmup = items[mode][:max(1, min(args.warmup_requests, prompts))]
                raws[mode].append(run_peer(mode, peers[mode], items[mode], concurrency, args.max_tokens,
                                           free_port(), warmup))
            else:
                raws[mode].append(run_mode(args, mode, items[mode], concurrency * scaled[mode]))
            if mode == "psd":
                psd_events = raws[mode][-1]["events"]
            print(f"C={concurrency} {mode} (run {len(raws[mode])}/{args.repeats}): "
                  f"{summarise_runs(raws[mode][-1:])['throughput_tok_s']:.2f} tok/s", flush=True)
        summaries = {}
        for mode in [*modes, *peers]:
            summaries[mode] = summarise_runs(raws[mode])
            summaries[mode]["concurrency"] = concurrency * scaled.get(mode, 1)
            summaries[mode]["layout"] = peers[mode] or f"peer {mode}" if mode in peers else layout_of(args, mode)
            if mode not in peers:
                summaries[mode]["context"] = min(run["context"] for run in raws[mode])
        results["runs"][str(concurrency)] = {"modes": summaries, "comparison": compare_modes(summaries, list(peers))}
        # The last concurrency is the headline; written after every level so a late failure keeps the rest.
        results["modes"] = summaries
        results.update(results["runs"][str(concurrency)]["comparison"])
        results["bench_wall_s"] = time.time() - started
        write_all(results, psd_events, out)
    print((out / "report.md").read_text())
    print(f"wrote {out}/results.json, report.md and plots in {results['bench_wall_s']:.0f}s")
    return 0
