"""The seed's experiments: the ShareGPT workload on the real wheel, and the paper's table on tiny models."""

import json

from minedraft.app.bench.workloads import load_prompts
from minedraft.cli import main


def test_sharegpt_prompts_are_drawn_reproducibly_and_fit() -> None:
    short = lambda text: len(text) < 400  # noqa: E731
    first = load_prompts("sharegpt", 20, seed=1, fits=short)
    assert first == load_prompts("sharegpt", 20, seed=1, fits=short)
    assert first != load_prompts("sharegpt", 20, seed=2, fits=short)
    assert len({item["messages"][0]["content"] for item in first}) == 20
    for item in first:
        (message,) = item["messages"]
        assert message["role"] == "user" and 0 < len(message["content"]) < 400 and message["content"].strip()


def test_paper_table_runs_every_mode_at_fixed_length(tiny_pair, tmp_path) -> None:
    target, draft = tiny_pair
    out = tmp_path / "paper"
    assert main(["bench", "--paper-table", "--paper-k", "2", "--paper-lanes", "2", "--max-tokens", "6",
                 "--max-context", "1024", "--warmup-requests", "1", "--target-model", str(target),
                 "--draft-model", str(draft), "--out", str(out)]) == 0
    results = json.loads((out / "k2" / "results.json").read_text())
    modes = results["runs"]["2"]["modes"]
    for mode, held in (("ar", 2), ("sd", 2), ("psd", 2), ("tetris", 2), ("psd2c", 4), ("tetris2c", 4), ("auto", 2)):
        assert modes[mode]["errors"] == 0 and modes[mode]["generated_tokens"] == 6 * held, mode  # --ignore-eos
    assert results["settings"]["workload"] == "sharegpt" and results["settings"]["ignore_eos"]
    table = (out / "paper-table.md").read_text()
    assert "| 2 | 2 |" in table and "| ar | psd | tetris | psd2c | tetris2c | auto |" in table
