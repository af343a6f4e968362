"""The lean Llama-family forward gives transformers' own logits bit for bit — prefill, decode, a verify and
mixed batches, in every numeric format — so switching it on can never move a token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from minedraft.engine.lean_forward import LeanForward
from minedraft.engine.model_runner import ModelRunner, SequenceState
from minedraft.engine.precision import quantize_linears
from minedraft.engine.static_kv import StaticKV
from tests.formats import FBGEMM
from tests.test_model_families import FAMILIES, SHAPE
from tests.test_static_kv import decode_one_at_a_time

LEAN = ["llama", "mistral", "qwen2"]


def runner_for(model: torch.nn.Module, dtype: torch.dtype) -> ModelRunner:
    static = StaticKV(model.config, 4, 128, dtype, torch.device("cpu"), attention="rows")
    return ModelRunner(model, torch.device("cpu"), static)


def model_of(config, dtype: torch.dtype, quant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)
    quantize_linears(model, quant)
    return model


def steps(runner: ModelRunner, lean: LeanForward | None) -> list[torch.Tensor]:
    """With `lean` (None: transformers' forward), a batched prefill of two lengths, decodes, a 5-token verify
    rolled back and a row alone: every logit."""
    runner.lean = lean
    a, b = SequenceState(list(range(5, 19))), SequenceState([9, 10, 11])
    out = [runner.forward([a, b], logits_to_keep=1)]
    for feed in (1, 5, 1, 2, 1):
        a.tokens += [40 + i for i in range(feed)]
        b.tokens += [60 + i for i in range(feed)]
        out.append(runner.forward([a, b], logits_to_keep=feed))
        if feed == 5:
            a.truncate(len(a.tokens) - 4)
            b.truncate(len(b.tokens) - 4)
    a.tokens.append(3)
    out.append(runner.forward([a], logits_to_keep=1))
    runner.drop(a)
    runner.drop(b)
    return out


@pytest.mark.parametrize("quant", ["none", "w8a8", FBGEMM, "int4", "int8", "int4-w8a8"])
@pytest.mark.parametrize("family", LEAN)
def test_lean_forward_gives_transformers_logits_bit_for_bit(family: str, quant: str) -> None:
    dtype = torch.float32 if quant == "none" else torch.bfloat16
    runner = runner_for(model_of(FAMILIES[family](**SHAPE), dtype, quant), dtype)
    lean = runner.lean
    assert lean is not None
    own, fast = steps(runner, None), steps(runner, lean)
    assert all(torch.equal(x, y) for x, y in zip(own, fast, strict=True))


def test_a_sliding_window_is_kept_on_the_lean_path() -> None:
    """Mistral with a 5-token window: the lean path masks exactly the keys transformers' path does."""
    runner = runner_for(model_of(MistralConfig(**SHAPE, sliding_window=5), torch.float32, "none"), torch.float32)
    lean = runner.lean
    own = steps(runner, None)
    assert all(torch.equal(x, y) for x, y in zip(own, steps(runner, lean), strict=True))


@pytest.mark.parametrize("family", ["phi3", "gemma2"])
def test_other_families_keep_transformers_forward(family: str) -> None:
    extra = {"head_dim": 16} if family == "gemma2" else {}
    model = model_of(FAMILIES[family](**SHAPE, **extra), torch.float32, "none")
    assert runner_for(model, torch.float32).lean is None


VARIANTS = {
    "llama, biased attention, llama3 rope, tied head": LlamaConfig(
        **SHAPE, attention_bias=True, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}),
    "qwen2, a window on the upper layers": Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=6,
                                                      max_window_layers=1),
    "mistral, head_dim overridden": MistralConfig(**SHAPE, head_dim=32),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_keep_their_bits(variant: str) -> None:
    runner = runner_for(model_of(VARIANTS[variant], torch.bfloat16, "w8a8"), torch.bfloat16)
    lean = runner.lean
    assert lean is not None
    assert all(torch.equal(x, y) for x, y in zip(steps(runner, None), steps(runner, lean), strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_long_multithreaded_prefill_keeps_its_bits(dtype: torch.dtype) -> None:
    """A prefill big enough to be split across threads, with an intermediate size that leaves a vector tail in
    every row (100): the lean path still gives transformers' bits. (Its silu runs on a contiguous copy because
    CPU silu's vector body and scalar tail can differ in the last bit; W8A8's next quantisation hides that
    here except at a code boundary, so this checks the whole path, not that one rounding.)"""
    config = Qwen2Config(**{**SHAPE, "intermediate_size": 100})
    model = model_of(config, dtype, "w8a8")
    static = StaticKV(model.config, 2, 512, dtype, torch.device("cpu"), attention="rows")
    runner = ModelRunner(model, torch.device("cpu"), static)
    lean = runner.lean

    def logits(use: LeanForward | None) -> list[torch.Tensor]:
        runner.lean = use
        state = SequenceState([(7 * i) % 300 + 1 for i in range(400)])
        out = [runner.forward([state], logits_to_keep=400)]
        state.tokens += [5, 6, 7, 8, 9]
        out.append(runner.forward([state], logits_to_keep=5))
        runner.drop(state)
        return out

    assert all(torch.equal(x, y) for x, y in zip(logits(None), logits(lean), strict=True))


def test_a_float32_verify_under_a_sliding_window_equals_its_decodes() -> None:
    """Mistral with a 20-token window, W8A8 (row-exact linears), float32: a verify's queries stacked in one
    attention call (their widths shared, the earlier ones inside the window and the later ones past it) give
    each position the bits its own decode gives."""
    runner = runner_for(model_of(MistralConfig(**SHAPE, sliding_window=20), torch.float32, "w8a8"), torch.float32)
    generator = torch.Generator().manual_seed(2)
    for length in (14, 17, 27, 40):
        prompt = torch.randint(3, 200, (length,), generator=generator).tolist()
        feed = torch.randint(3, 200, (5,), generator=generator).tolist()
        state = SequenceState(list(prompt))
        decoded = decode_one_at_a_time(runner, state, feed)
        state.truncate(length)
        state.tokens.extend(feed)
        verified = runner.forward([state], logits_to_keep=5)[0].clone()
        runner.drop(state)
        assert torch.equal(verified, torch.stack(decoded[1:])), length
