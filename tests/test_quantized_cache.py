"""Quantised linears read back from the cache compute exactly what freshly quantised ones do; a cache file that
does not fit (cut short, or another model's) is replaced, never trusted."""

import shutil

import pytest
import torch

from minedraft.engine.model_runner import ModelRunner, SequenceState
from tests.formats import FBGEMM

PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26]]


def load(path, quant: str, cache) -> ModelRunner:
    return ModelRunner.load(str(path), dtype="float32", quant=quant, kv="static", max_seqs=4, max_context=64,
                            quant_cache=cache)


def logits(runner: ModelRunner) -> torch.Tensor:
    """A prompt's logits, then three generated tokens' (the formats that split by position use both halves)."""
    state = SequenceState(list(PROMPTS[0]))
    prompt = runner.forward([state], logits_to_keep=5)
    state.tokens += [7, 8, 9]
    return torch.cat([prompt, runner.forward([state], logits_to_keep=3)], dim=1)


def buffers(runner: ModelRunner) -> dict[str, torch.Tensor]:
    """Every buffer but oneDNN's packed weights (an opaque layout, compared through the logits)."""
    return {name: b for name, b in runner.model.named_buffers() if b.layout == torch.strided}


@pytest.mark.parametrize("quant", ["int4", "int8", "w8a8", FBGEMM, "int4-w8a8", "int4-w8a8-prompt"])
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


def test_a_kept_file_with_the_right_key_and_wrong_buffers_is_replaced(tiny_pair, tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    fresh = logits(load(tiny_pair[0], "int4", None))
    load(tiny_pair[0], "int4", tmp_path)
    (kept,) = tmp_path.glob("*.safetensors")
    with safe_open(str(kept), framework="pt") as file:
        metadata, names = file.metadata(), list(file.keys())
    save_file({name: torch.zeros(3) for name in names}, str(kept), metadata=metadata)  # shapes that cannot load
    assert torch.equal(logits(load(tiny_pair[0], "int4", tmp_path)), fresh)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert torch.equal(logits(load(tiny_pair[0], "int4", tmp_path)), fresh)


def test_a_folder_that_cannot_be_written_only_costs_the_cache(tiny_pair, tmp_path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    fresh = logits(load(tiny_pair[0], "int4", None))
    assert torch.equal(logits(load(tiny_pair[0], "int4", blocked / "quantized")), fresh)


def test_changed_weights_or_code_replace_the_kept_file(tiny_pair, tmp_path, monkeypatch) -> None:
    from minedraft.engine import quantized_cache

    model = tmp_path / "model"
    shutil.copytree(tiny_pair[0], model)
    load(model, "int4", tmp_path / "cache")
    (first,) = (tmp_path / "cache").glob("*.safetensors")
    shutil.copy(tiny_pair[1] / "model.safetensors", model / "model.safetensors")  # a fine-tune: same shapes
    retrained = logits(load(tiny_pair[1], "int4", None))
    assert torch.equal(logits(load(model, "int4", tmp_path / "cache")), retrained)
    (second,) = (tmp_path / "cache").glob("*.safetensors")  # one file per model and format: the old one went
    monkeypatch.setattr(quantized_cache, "FORMAT", quantized_cache.FORMAT + 1)
    load(model, "int4", tmp_path / "cache")
    kept = list((tmp_path / "cache").glob("*.safetensors"))
    assert first != second and len(kept) == 1 and kept != [second]


def test_a_tied_output_head_reads_back_exactly(tmp_path) -> None:
    """The default pair ties its output head to the embedding: the head is quantised, the embedding kept."""
    from transformers import AutoModelForCausalLM

    from minedraft.models.tiny import tiny_config

    config = tiny_config(512)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    fresh = load(tmp_path / "tied", "int4", None)
    load(tmp_path / "tied", "int4", tmp_path / "cache")
    read_back = load(tmp_path / "tied", "int4", tmp_path / "cache")
    assert torch.equal(logits(read_back), logits(fresh))
    embedding = read_back.model.get_input_embeddings().weight
    assert not embedding.is_meta and torch.equal(embedding, fresh.model.get_input_embeddings().weight)


def test_unquantised_models_keep_nothing(tiny_pair, tmp_path) -> None:
    load(tiny_pair[0], "none", tmp_path)
    assert not list(tmp_path.glob("*"))
