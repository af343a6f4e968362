"""`minedraft bench-steps` on CPU: every layout but graphs measured against a positive floor, graphs skipped."""

import argparse
import json

from minedraft.app.bench import gpu_summary, steps


def test_step_bench_measures_layouts_and_skips_graphs_without_cuda(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    steps.add_args(parser)
    args = parser.parse_args(["--models", "random:tiny-draft", "--device", "cpu", "--dtype", "float32",
                              "--batches", "1,2", "--context", "16", "--repeats", "1", "--out", str(tmp_path)])
    assert steps.run(args) == 0
    result = json.loads((tmp_path / "steps.json").read_text())
    assert "skipping CUDA graphs" in capsys.readouterr().out
    assert {(r["layout"], r["op"], r["batch"]) for r in result["rows"]} == {
        (layout, op, batch) for layout in ("dynamic", "static") for op in ("decode", "verify k+1=5")
        for batch in (1, 2)}
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 and r["x_floor"] == r["ms"] / r["floor_ms"] for r in result["rows"])
    table = "\n".join(gpu_summary.step_lines(result))
    assert "| random:tiny-draft | static | decode |" in table
