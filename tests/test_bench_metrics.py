"""Benchmark arithmetic on synthetic timings, where every answer is known by hand."""

import pytest

from minedraft.app.bench.cli import run_order
from minedraft.app.bench.metrics import (
    Event,
    RequestRecord,
    busy_fraction,
    compare_modes,
    percentiles,
    predicted_psd_over_sd,
    steady_window,
    summarise_mode,
    summarise_runs,
)
from minedraft.app.bench.report import markdown


def test_percentiles_interpolate_between_ranks() -> None:
    p = percentiles([1.0, 2.0, 3.0, 4.0, 5.0])
    assert p == {"p50": 3.0, "p90": pytest.approx(4.6), "p99": pytest.approx(4.96), "mean": 3.0}
    assert percentiles([])["p50"] is None


def test_busy_fraction_clips_to_window_and_merges_overlaps() -> None:
    events = [Event("target", "verify", 0, 0.0, 2.0), Event("target", "verify", 1, 1.0, 3.0),
              Event("target", "verify", 0, 5.0, 6.0), Event("draft", "propose", 0, 0.0, 10.0)]
    assert busy_fraction(events, "target", (1.0, 9.0)) == pytest.approx((2.0 + 1.0) / 8.0)
    assert busy_fraction(events, "draft", (1.0, 9.0)) == 1.0
    assert busy_fraction(events, "target", (3.0, 3.0)) == 0.0


def test_predicted_ratio_follows_the_two_cycle_formulas() -> None:
    # SD at C: 40 ms of drafting + 60 ms verify = 100 ms a cycle. PSD at C/2: max(30, 45) twice = 90 ms.
    sd, psd = {"t_draft_ms": 40.0, "t_verify_ms": 60.0}, {"t_draft_ms": 30.0, "t_verify_ms": 45.0}
    assert predicted_psd_over_sd(sd, psd) == pytest.approx(100 / 90)
    # Launch-bound: halving the batch saves nothing, so PSD loses (0.5 + 0.5 ... < 1).
    assert predicted_psd_over_sd(sd, {"t_draft_ms": 40.0, "t_verify_ms": 60.0}) == pytest.approx(100 / 120)


def lane(rounds: int, draft_ms: float, verify_ms: float, round_ms: float, batch: int) -> dict:
    return {"rounds": rounds, "draft_ms": draft_ms, "verify_ms": verify_ms, "round_ms": round_ms,
            "propose_calls": rounds if draft_ms else 0, "verify_calls": rounds, "sequences_in_rounds": rounds * batch}


def test_summary_of_a_synthetic_run() -> None:
    # Two requests submitted at t=0; first tokens at 1 s; 11 tokens each, done at 3 s and 5 s.
    records = [RequestRecord(0.0, 1.0, 3.0, 11, drafted=16, accepted=12, rounds=4),
               RequestRecord(0.0, 1.0, 5.0, 11, drafted=16, accepted=4, rounds=4)]
    events = [Event("target", "verify", 0, 1.0, 2.0), Event("draft", "propose", 0, 2.0, 2.5)]
    summary = summarise_mode(records, [lane(8, 400.0, 800.0, 1600.0, 2)], events)
    assert summary["throughput_tok_s"] == pytest.approx(22 / 5)
    assert summary["alpha"] == pytest.approx(16 / 32)
    assert summary["tau"] == pytest.approx((16 + 8) / 8)
    assert summary["t_draft_ms"] == 50.0 and summary["t_verify_ms"] == 100.0
    assert summary["mean_lane_batch"] == 2
    assert summary["tpot_s"]["p50"] == pytest.approx((0.2 + 0.4) / 2)
    assert steady_window(records) == (1.0, 3.0)
    assert summary["busy_fraction"] == {"draft": 0.25, "target": 0.5}
    assert summary["router_overhead_frac"] == pytest.approx(1 - 1200 / 1600)


def test_failed_requests_are_counted_and_named_in_the_report() -> None:
    """A request the cluster refused (a prompt longer than the context a mode's caches held) is left out of
    throughput, so the report must say so, with the context that mode held."""
    records = [RequestRecord(0.0, 1.0, 3.0, 11, drafted=16, accepted=12, rounds=4),
               RequestRecord(0.0, None, 0.1, 0, error="INVALID_ARGUMENT: prompt too long")]
    summary = summarise_mode(records, [lane(4, 200.0, 400.0, 800.0, 1)], [])
    assert summary["errors"] == 1 and summary["requests"] == 2 and summary["generated_tokens"] == 11
    summary["context"] = 1792
    clean = summarise_mode(records[:1], [lane(4, 200.0, 400.0, 800.0, 1)], [])
    results = {"settings": {"workload": "humaneval"}, "machine": "test",
               "runs": {"32": {"modes": {"ar": clean, "sd": summary}, "comparison": {}}}}
    report = markdown(results)
    assert "Failed requests, left out of every column: sd 1 of 2 (context 1792)" in report
    assert "ar 0" not in report
    assert "Failed requests" not in markdown({**results, "runs": {"32": {"modes": {"ar": clean}, "comparison": {}}}})


def test_comparison_ratios() -> None:
    def mode(tput: float, t_d: float | None, t_v: float, busy: dict) -> dict:
        return {"throughput_tok_s": tput, "t_draft_ms": t_d, "t_verify_ms": t_v, "busy_fraction": busy}

    result = compare_modes({"ar": mode(10, None, 50, {}), "sd": mode(20, 40, 60, {}),
                            "psd": mode(25, 30, 45, {"draft": 0.6, "target": 0.95}),
                            "psd2c": mode(36, 30, 45, {})})
    assert result["psd_over_sd"] == 1.25 and result["psd_over_ar"] == 2.5
    assert result["overlap_efficiency"] == 0.95 and result["psd2c_over_sd"] == 1.8
    assert result["predicted_psd_over_sd"] == pytest.approx(100 / 90)
    assert result["auto_over_best_fixed"] is None
    with_auto = compare_modes({"sd": mode(20, 40, 60, {}), "psd": mode(25, 30, 45, {"target": 0.9}),
                               "auto": mode(24, 30, 45, {})})
    assert with_auto["auto_over_best_fixed"] == pytest.approx(24 / 25)


def test_repeated_runs_pool_tokens_over_wall_time_and_latencies_over_all_requests() -> None:
    # Run 1: 22 tokens in 5 s (steady window 2 s); run 2, an hour later: 30 tokens in 10 s (window 4 s).
    first = {"records": [RequestRecord(0.0, 1.0, 3.0, 11, 16, 12, 4), RequestRecord(0.0, 1.0, 5.0, 11, 16, 4, 4)],
             "lanes": [lane(8, 400.0, 800.0, 1600.0, 2)],
             "events": [Event("target", "verify", 0, 1.0, 2.0)]}
    later = {"records": [RequestRecord(3600.0, 3602.0, 3606.0, 10, 8, 8, 2),
                         RequestRecord(3600.0, 3602.0, 3610.0, 20, 8, 0, 4)],
             "lanes": [lane(6, 600.0, 600.0, 1500.0, 2)],
             "events": [Event("target", "verify", 0, 3602.0, 3606.0)]}
    pooled = summarise_runs([first, later])
    assert pooled["wall_s"] == 15.0 and pooled["throughput_tok_s"] == pytest.approx(52 / 15)
    assert pooled["runs_throughput_tok_s"] == pytest.approx([22 / 5, 3.0])
    assert pooled["runs_t_draft_ms"] == [50.0, 100.0] and pooled["runs_t_verify_ms"] == [100.0, 100.0]
    assert pooled["e2e_latency_s"]["p50"] == pytest.approx((5.0 + 6.0) / 2)  # of 3, 5, 6 and 10 s
    assert pooled["alpha"] == pytest.approx(24 / 48) and pooled["t_verify_ms"] == pytest.approx(1400 / 14)
    assert pooled["busy_fraction"]["target"] == pytest.approx((0.5 * 2 + 1.0 * 4) / 6)
    assert pooled["router_overhead_frac"] == pytest.approx(((1 - 1200 / 1600) + (1 - 1200 / 1500)) / 2)
    assert summarise_runs([first]) == summarise_mode(first["records"], first["lanes"], first["events"])


def test_repeats_run_counterbalanced_so_a_steady_drift_falls_on_every_mode_alike() -> None:
    modes = ["sd", "psd", "auto"]
    order = run_order(modes, 4)
    assert order[:6] == ["sd", "psd", "auto", "auto", "psd", "sd"]
    mean_slot = {mode: sum(i for i, m in enumerate(order) if m == mode) / 4 for mode in modes}
    assert len(set(mean_slot.values())) == 1 and all(order.count(mode) == 4 for mode in modes)
    assert run_order(modes, 1) == modes


def test_a_sweep_of_one_repeat_alternates_which_mode_runs_last() -> None:
    modes = ["ar", "sd", "psd", "auto", "llamacpp"]
    assert run_order(modes, 1, block=0) == modes and run_order(modes, 1, block=1) == modes[::-1]
    assert run_order(modes, 2, block=1) == [*modes[::-1], *modes]
