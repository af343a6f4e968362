"""Model loading: GGUF and converted cache agree; mismatched tokenizers are refused."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from minedraft.models.compat import TokenizerMismatch, check_same_tokenizer
from minedraft.models.store import PRESETS, cache_dir, resolve_model
from minedraft.models.tiny import build_tokenizer

needs_default_pair = pytest.mark.skipif(
    not (cache_dir() / "models" / PRESETS["default-draft"].name / "config.json").exists(),
    reason="default pair not fetched (run `minedraft models fetch`; `make test` does)")


def test_tokenizer_check_accepts_same_and_rejects_mismatch() -> None:
    check_same_tokenizer(build_tokenizer(320), build_tokenizer(320))
    with pytest.raises(TokenizerMismatch, match="differs"):
        check_same_tokenizer(build_tokenizer(320), build_tokenizer(300))


def test_unknown_model_spec_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no model"):
        resolve_model(str(tmp_path / "nothing-here"))


@pytest.mark.slow
@needs_default_pair
def test_gguf_and_converted_cache_give_identical_logits() -> None:
    draft = PRESETS["default-draft"]
    gguf = cache_dir() / "gguf" / f"{draft.name}.gguf"
    ids = torch.tensor([[151644, 872, 198, 750, 912, 2877, 11, 293, 982]])
    cached = AutoModelForCausalLM.from_pretrained(resolve_model("default-draft"), dtype=torch.float32).eval()
    with torch.no_grad():
        from_cache = cached(ids).logits
    del cached
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        from_gguf = original(ids).logits
    assert torch.equal(from_cache, from_gguf)
