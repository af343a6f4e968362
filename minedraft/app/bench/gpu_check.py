"""Checks `scripts/gpu-check` runs besides the step and serving benchmarks, written to one JSON file.

1. agreement: greedy tokens of one model over 40 steps (joins that change the batch bucket, multi-token feeds
   and rollbacks as verification makes them) on the dynamic cache, the static cache run eagerly and the static
   cache replayed as CUDA graphs; the first must agree with the others nearly everywhere and graphs with eager
   static exactly (same kernels), with no failed capture.
2. host: for a draft and a target engine at one batch, greedy and sampled, the wall time of a propose and a
   verify call against the time of their model forwards (CUDA events): what the host adds around the steps.
3. start-up: graphs captured, capture seconds and peak device memory of each engine.
Runs on a CPU too (the plumbing; no graphs, no events), which is how CI tests it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from minedraft.engine.model_runner import ModelRunner, SequenceState
from minedraft.engine.sampling import Sampling
from services.draft.engine import DraftEngine
from services.target.engine import TargetEngine

LAYOUTS = {"dynamic": {"kv": "dynamic"}, "static": {"kv": "static", "cuda_graphs": False},
           "graphs": {"kv": "static", "cuda_graphs": True}}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy_run(runner: ModelRunner, steps: int = 40) -> list[list[int]]:
    """Greedy decoding of eight prompts (a ninth joins at step 15), with a 4-token feed and a rollback every
    10 steps, as verification makes them."""
    generator = torch.Generator().manual_seed(0)
    states = [SequenceState(torch.randint(0, 1000, (24 + 9 * i,), generator=generator).tolist()) for i in range(8)]
    for step in range(steps):
        if step == 15:
            states.append(SequenceState(list(range(50, 90))))
        if step % 10 == 9:
            for state in states:
                state.tokens += [7, 8, 9, 10]
            runner.forward(states, logits_to_keep=4)
            for state in states:
                state.truncate(len(state.tokens) - 6)  # the feed and two tokens before it: a rejection
        logits = runner.forward(states, logits_to_keep=1)
        for row, state in zip(logits[:, -1].argmax(dim=-1).tolist(), states, strict=True):
            state.tokens.append(row)
    return [s.tokens for s in states]


def agreement(model: str, device: str, dtype: str, max_context: int) -> dict:
    runs, graphs = {}, {}
    for layout, kv in LAYOUTS.items():
        if layout == "graphs" and not device.startswith("cuda"):
            continue
        runner = ModelRunner.load(model, device, dtype, max_seqs=16, max_context=max_context, **kv)
        runs[layout] = greedy_run(runner)
        if runner.graphs:
            graphs = {"captured": len(runner.graphs.graphs), "failed": len(runner.graphs.failed),
                      "replays": runner.graphs.replays, "eager_steps": runner.graphs.eager,
                      "attention": runner.static.attention}
        del runner
    reference = runs["static"]
    same = {layout: _agree(tokens, reference) for layout, tokens in runs.items() if layout != "static"}
    return {"model": model, "dtype": dtype, "agreement_with_static": same, "graphs": graphs}


def _agree(tokens: list[list[int]], reference: list[list[int]]) -> dict:
    """Positions where greedy tokens equal the reference's, and each sequence's first step that differs."""
    equal = sum(a == b for x, y in zip(tokens, reference, strict=True) for a, b in zip(x, y, strict=True))
    first = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
             for x, y in zip(tokens, reference, strict=True)]
    return {"fraction": equal / sum(len(x) for x in reference), "first_difference": first}


class ForwardTimer:
    """Wraps a runner's forward with CUDA events (wall clock on a CPU) to sum the time of its model steps."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner, self.inner, self.spans = runner, runner.forward, []
        runner.forward = self.forward

    def forward(self, states: list[SequenceState], logits_to_keep: int) -> torch.Tensor:
        if self.runner.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.inner(states, logits_to_keep)
            end.record()
            self.spans.append((start, end))
            return out
        started = time.perf_counter()
        out = self.inner(states, logits_to_keep)
        self.spans.append((started, time.perf_counter()))
        return out

    def take_ms(self) -> float:
        synchronize(self.runner.device)
        total = sum(s.elapsed_time(e) if isinstance(s, torch.cuda.Event) else (e - s) * 1e3 for s, e in self.spans)
        self.spans = []
        return total


def host_time(draft: str, target: str, device: str, dtype: str, batch: int, k: int, context: int,
              repeats: int) -> dict:
    """Per call: wall ms, model-forward ms, and the host's share outside the forwards (greedy and sampled)."""
    loaded, started = {}, {}
    for name, spec in (("draft", draft), ("target", target)):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        started[name] = time.perf_counter()
        loaded[name] = ModelRunner.load(spec, device, dtype, max_seqs=batch, max_context=context + 64,
                                        graph_tokens=k + 1)
        started[name] = time.perf_counter() - started[name]
    startup = {name: {"load_s": started[name], "graphs": len(r.graphs.graphs) if r.graphs else 0,
                      "capture_s": r.graphs.capture_s if r.graphs else 0.0,
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None}
               for name, r in loaded.items()}
    drafts, targets = DraftEngine(loaded["draft"], top_m=32), TargetEngine(loaded["target"], max_drafts=k)
    timers = {"draft": ForwardTimer(loaded["draft"]), "target": ForwardTimer(loaded["target"])}
    results = {}
    for label, sampling in (("greedy", Sampling()), ("sampled", Sampling(temperature=0.8, top_p=0.9, seed=1))):
        ids = [f"{label}-{i}" for i in range(batch)]
        prompt = torch.randint(0, 1000, (context,), generator=torch.Generator().manual_seed(1)).tolist()
        drafts.prefill([(s, prompt, sampling) for s in ids])
        firsts = targets.prefill([(s, prompt, sampling) for s in ids])
        held, calls = {s: len(prompt) for s in ids}, {"propose": [], "verify": []}
        nexts = {s: [f.next_token] for s, f in zip(ids, firsts, strict=True)}
        for _ in range(repeats + 1):  # the first round warms up
            timers["draft"].take_ms()
            synchronize(loaded["draft"].device)
            began = time.perf_counter()
            proposals = drafts.propose([(s, held[s], nexts[s], k) for s in ids])
            calls["propose"].append(((time.perf_counter() - began) * 1e3, timers["draft"].take_ms()))
            timers["target"].take_ms()
            began = time.perf_counter()
            verdicts = targets.verify([(s, [(t.token_id, t.support, t.probs) for t in p])
                                       for s, p in zip(ids, proposals, strict=True)])
            calls["verify"].append(((time.perf_counter() - began) * 1e3, timers["target"].take_ms()))
            for s, v in zip(ids, verdicts, strict=True):  # the draft keeps its accepted drafts, then the next
                held[s] += len(nexts[s]) + v.accepted
                nexts[s] = [v.next_token]
        for name, pairs in calls.items():
            wall = statistics.median(w for w, _ in pairs[1:])
            model = statistics.median(m for _, m in pairs[1:])
            results[f"{name} {label}"] = {"wall_ms": wall, "forward_ms": model, "host_ms": wall - model,
                                          "host_share": (wall - model) / wall}
        drafts.release(ids)
        targets.release(ids)
    return {"draft": draft, "target": target, "batch": batch, "k": k, "context": context, "startup": startup,
            "calls": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--model", default="random:qwen2.5-0.5b", help="the agreement check's model")
    parser.add_argument("--draft", default="random:qwen2.5-0.5b")
    parser.add_argument("--target", default="random:qwen2.5-7b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="runs/gpu-check/checks.json")
    args = parser.parse_args(argv)
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "agreement": agreement(args.model, args.device, args.dtype, max_context=512),
              "host": host_time(args.draft, args.target, args.device, args.dtype, args.batch, args.k, args.context,
                                args.repeats)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
