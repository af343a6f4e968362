"""Quantised linears read back from the cache compute exactly what freshly quantised ones do; a cache file that
does not fit (cut short, or another model's) is replaced, never trusted."""

import shutil

import pytest
import torch

from minedraft.engine.model_runner import ModelRunner, SequenceState

PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26]]


def load(path, quant: str, cache) -> ModelRunner:
    return ModelRunner.load(str(path), dtype="float32", quant=quant, kv="static", max_seqs=4, max_context=64,
                            quant_cache=cache)


def logits(runner: ModelRunner) -> torch.Tensor:
    return runner.forward([SequenceState(list(p)) for p in PROMPTS[:1]], logits_to_keep=5)


def buffers(runner: ModelRunner) -> dict[str, torch.Tensor]:
    return dict(runner.model.named_buffers())


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_read_back_linears_equal_fresh_ones_bit_for_bit(tiny_pair, tmp_path, quant: str) -> None:
    fresh = load(tiny_pair[0], quant, None)
    written = load(tiny_pair[0], quant, tmp_path)
    (kept,) = tmp_path.glob("*.safetensors")
    stamp = kept.stat().st_mtime_ns
    read_back = load(tiny_pair[0], quant, tmp_path)
    assert kept.stat().st_mtime_ns == stamp  # read, not written again
    assert not any(t.is_meta for t in read_back.model.parameters())
    expected = buffers(fresh)
    for runner in (written, read_back):
        assert buffers(runner).keys() == expected.keys()
        assert all(torch.equal(buffers(runner)[name], expected[name]) for name in expected)
        assert torch.equal(logits(runner), logits(fresh))


def test_a_cut_short_or_foreign_cache_file_is_replaced(tiny_pair, tmp_path) -> None:
    fresh = logits(load(tiny_pair[0], "int4", None))
    load(tiny_pair[0], "int4", tmp_path)
    (kept,) = tmp_path.glob("*.safetensors")
    kept.write_bytes(kept.read_bytes()[:1000])
    assert torch.equal(logits(load(tiny_pair[0], "int4", tmp_path)), fresh)
    other = tmp_path / "other"
    load(tiny_pair[1], "int4", other)  # the draft: other shapes under the target's name
    shutil.copy(next(other.glob("*.safetensors")), kept)
    assert torch.equal(logits(load(tiny_pair[0], "int4", tmp_path)), fresh)
    assert torch.equal(logits(load(tiny_pair[0], "int4", tmp_path)), fresh)  # and the replacement reads back


def test_formats_built_from_packed_kernels_state_are_not_cached(tiny_pair, tmp_path) -> None:
    load(tiny_pair[0], "w8a8", tmp_path)
    load(tiny_pair[0], "none", tmp_path)
    assert not list(tmp_path.glob("*"))
