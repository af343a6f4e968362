"""`minedraft bench` end to end on tiny models: it writes the JSON, the report and the plots."""

import json

from minedraft.cli import main


def test_bench_writes_results_report_and_plots(tiny_pair, tmp_path) -> None:
    target, draft = tiny_pair
    out = tmp_path / "bench"
    assert main(["bench", "--modes", "sd,psd", "--workload", "chat", "--num-prompts", "4", "--concurrency", "2",
                 "--max-tokens", "8", "--target-model", str(target), "--draft-model", str(draft),
                 "--repeats", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    for mode in ("sd", "psd"):
        assert results["modes"][mode]["generated_tokens"] > 0 and results["modes"][mode]["errors"] == 0
        assert len(results["modes"][mode]["runs_throughput_tok_s"]) == 2, "both interleaved runs, pooled"
    assert results["psd_over_sd"] > 0 and results["predicted_psd_over_sd"] > 0
    assert 0 < results["overlap_efficiency"] <= 1
    assert (out / "modes.png").stat().st_size > 0 and (out / "timeline_psd.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "| psd |" in report and "| tok/s by run |" in report
