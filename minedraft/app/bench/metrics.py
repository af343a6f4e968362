"""Benchmark arithmetic, kept pure so it can be tested on synthetic timings (the cycle model is policy.py's).

PSD at a fixed concurrency C splits the requests into two lanes of C/2:
    SD  cycle = k·t_d(C) + t_v(C)               PSD cycle = 2 · max(k·t_d(C/2), t_v(C/2))
Both produce C·τ tokens, so the predicted PSD/SD throughput ratio is SD cycle / PSD cycle, with the
k-token proposal call's measured time standing for k·t_d.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class RequestRecord:
    submitted: float  # unix time
    first_token: float | None
    finished: float
    tokens: int
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    error: str = ""
    index: int = -1  # the prompt's place in the workload
    digest: str = ""  # of the generated token ids: equal digests, equal outputs (greedy modes must agree)


@dataclass
class Event:
    device: str
    kind: str
    lane: int
    start: float
    end: float


def percentiles(values: Iterable[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p90": None, "p99": None, "mean": None}

    def at(q: float) -> float:  # linear interpolation between closest ranks
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": sum(ordered) / len(ordered)}


def busy_fraction(events: Iterable[Event], device: str, window: tuple[float, float]) -> float:
    """Share of the window in which the device was running a call (overlapping calls merged)."""
    start, end = window
    if end <= start:
        return 0.0
    spans = sorted((max(e.start, start), min(e.end, end)) for e in events if e.device == device)
    busy, cursor = 0.0, start
    for lo, hi in spans:
        lo = max(lo, cursor)
        if hi > lo:
            busy += hi - lo
            cursor = hi
    return busy / (end - start)


def steady_window(records: list[RequestRecord]) -> tuple[float, float]:
    """From the first token of the run until the tail begins (last submission or first completion)."""
    firsts = [r.first_token for r in records if r.first_token is not None]
    start = min(firsts) if firsts else min(r.submitted for r in records)
    end = max(max(r.submitted for r in records), min(r.finished for r in records))
    return start, max(end, start)


def summarise_mode(records: list[RequestRecord], lanes: list[dict], events: list[Event]) -> dict:
    ok = [r for r in records if not r.error]
    wall = max(r.finished for r in ok) - min(r.submitted for r in ok)
    tokens = sum(r.tokens for r in ok)
    drafted, accepted, rounds = (sum(getattr(r, f) for r in ok) for f in ("drafted", "accepted", "rounds"))
    propose_calls = sum(lane["propose_calls"] for lane in lanes)
    verify_calls = sum(lane["verify_calls"] for lane in lanes)
    draft_ms, verify_ms = sum(lane["draft_ms"] for lane in lanes), sum(lane["verify_ms"] for lane in lanes)
    round_ms = sum(lane["round_ms"] for lane in lanes)
    window = steady_window(ok)
    one_lane = len(lanes) == 1
    return {
        "requests": len(records), "errors": len(records) - len(ok), "generated_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall if wall > 0 else 0.0,
        "ttft_s": percentiles(r.first_token - r.submitted for r in ok if r.first_token is not None),
        "tpot_s": percentiles((r.finished - r.first_token) / (r.tokens - 1)
                              for r in ok if r.first_token is not None and r.tokens > 1),
        "e2e_latency_s": percentiles(r.finished - r.submitted for r in ok),
        "alpha": accepted / drafted if drafted else None,
        "tau": (accepted + rounds) / rounds if rounds else None,
        "t_draft_ms": draft_ms / propose_calls if propose_calls else None,
        "t_verify_ms": verify_ms / verify_calls if verify_calls else None,
        "mean_lane_batch": sum(lane["sequences_in_rounds"] for lane in lanes) / verify_calls if verify_calls else 0,
        "busy_fraction": {device: busy_fraction(events, device, window) for device in ("draft", "target")},
        "steady_window_s": window[1] - window[0],
        # In one lane every round is propose + verify back to back, so the rest of its wall time is the
        # router's and gRPC's; with two lanes a round also waits for the other lane, so it is not reported.
        "router_overhead_frac": 1 - (draft_ms + verify_ms) / round_ms if one_lane and round_ms else None,
        "token_digests": {str(r.index): r.digest for r in sorted(ok, key=lambda r: r.index) if r.digest},
    }


def summarise_runs(runs: list[dict]) -> dict:
    """Several runs of one mode, each a dict of records, lanes and events, pooled into one summary.

    The bench interleaves repeats of every mode (sd, psd, auto, auto, psd, sd, …), so slow drift in a shared
    machine's speed falls on every mode alike. Throughput is all tokens over all runs' wall time; latencies,
    α, τ and stage times are over all requests and calls; busy fractions are weighted by each steady window.
    Each run's throughput and stage times are kept too: when modes run the same forwards, a gap in their
    stage times is the machine's, not the mode's.
    """
    per_run = [summarise_mode(run["records"], run["lanes"], run["events"]) for run in runs]
    if len(runs) == 1:
        return per_run[0]
    records = [r for run in runs for r in run["records"]]
    pooled = summarise_mode(records, [lane for run in runs for lane in run["lanes"]], [])
    wall = sum(s["wall_s"] for s in per_run)
    window = sum(s["steady_window_s"] for s in per_run)
    overheads = [s["router_overhead_frac"] for s in per_run]
    pooled.update({
        "wall_s": wall,
        "throughput_tok_s": pooled["generated_tokens"] / wall if wall > 0 else 0.0,
        "busy_fraction": {device: sum(s["busy_fraction"][device] * s["steady_window_s"] for s in per_run) / window
                          if window > 0 else 0.0 for device in ("draft", "target")},
        "steady_window_s": window,
        "router_overhead_frac": None if None in overheads else sum(overheads) / len(overheads),
        "runs_throughput_tok_s": [s["throughput_tok_s"] for s in per_run],
        "runs_t_draft_ms": [s["t_draft_ms"] for s in per_run],
        "runs_t_verify_ms": [s["t_verify_ms"] for s in per_run],
    })
    return pooled


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def predicted_psd_over_sd(sd: dict, psd: dict) -> float | None:
    """(k·t_d + t_v in sd) / (2 · max(k·t_d, t_v) in psd), from measured stage times."""
    if None in (sd.get("t_draft_ms"), sd.get("t_verify_ms"), psd.get("t_draft_ms"), psd.get("t_verify_ms")):
        return None
    return (sd["t_draft_ms"] + sd["t_verify_ms"]) / (2 * max(psd["t_draft_ms"], psd["t_verify_ms"]))


def compare_modes(modes: dict[str, dict], peers: list[str] = ()) -> dict:
    """Top-level ratios, all measured at the same concurrency unless named otherwise."""
    throughput = {name: m["throughput_tok_s"] for name, m in modes.items()}
    sd, psd = modes.get("sd"), modes.get("psd")
    return {
        "psd_over_sd": _ratio(throughput.get("psd"), throughput.get("sd")),
        "psd_over_ar": _ratio(throughput.get("psd"), throughput.get("ar")),
        "sd_over_ar": _ratio(throughput.get("sd"), throughput.get("ar")),
        "predicted_psd_over_sd": predicted_psd_over_sd(sd, psd) if sd and psd else None,
        "overlap_efficiency": max(psd["busy_fraction"].values()) if psd else None,
        # The seed paper's convention: PSD holding 2C requests (two lanes of C) against SD holding C.
        "psd2c_over_sd": _ratio(throughput.get("psd2c"), throughput.get("sd")),
        # auto against the better of the two fixed layouts at this concurrency (issue: ≥ 0.95).
        "auto_over_best_fixed": _ratio(throughput.get("auto"),
                                       max((throughput[m] for m in ("sd", "psd") if m in throughput), default=None)),
        # ... and against the best of all three baselines: with a costly draft, plain decoding can win.
        "auto_over_best_of_ar_sd_psd": _ratio(throughput.get("auto"), max(
            (throughput[m] for m in ("ar", "sd", "psd") if m in throughput), default=None)),
        # auto against the best peer server run with the same prompts, cores and concurrency.
        "auto_over_best_peer": _ratio(throughput.get("auto"), max((throughput[p] for p in peers), default=None)),
    }
