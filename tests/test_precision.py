"""Numeric formats: `--dtype auto` and weight-only int8/int4 linears. A quantised model is a different model,
but for a given configuration speculation must still never change a token: every check the float path
passes (cached == uncached, batched == alone, psd == ar) runs here on the quantised path too."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from minedraft.app.bench.step_bytes import weight_bytes
from minedraft.app.client import collect, make_request, stream
from minedraft.engine import fbgemm_w8a8, precision
from minedraft.engine.fbgemm_w8a8 import FbgemmW8A8Linear, fbgemm_available
from minedraft.engine.fused_linears import GroupMember
from minedraft.engine.model_runner import ModelRunner, SequenceState
from minedraft.engine.precision import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    W8A8Linear,
    int4_dequantize,
    int4_quantize,
    int8_vnni,
    native_bf16_cpu,
    onednn_int8_available,
    resolve_dtype,
    resolve_quant,
)
from minedraft.serving.model_service import runner_loader
from services.draft import main as draft_main
from services.draft.engine import DraftEngine
from services.target import main as target_main
from services.target.engine import TargetEngine
from tests.conftest import channel_to
from tests.formats import FBGEMM, NEEDS_FBGEMM
from tests.test_end_to_end import PROMPTS as TEXT_PROMPTS
from tests.test_engines import PROMPTS, speculate
from tests.ties import assert_same_or_tie

QUANTS = ["int8", "int4", "w8a8", FBGEMM]
BF16_TIE = 0.1  # logits: a few bfloat16 rounding steps at the tiny model's logit scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_kernels_compute_their_dequantised_weights(dtype: torch.dtype) -> None:
    """The packed layouts must multiply by exactly the weights the quantiser chose (a wrong packing or
    zero-point convention would be off by a whole quantisation step, not by rounding)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48).to(dtype)
    x = torch.randn(3, 7, 96, dtype=dtype)
    int8 = Int8WeightOnlyLinear(linear)
    expected8 = F.linear(x.float(), int8.dequantized(), linear.bias.float())
    int4 = Int4WeightOnlyLinear(linear)
    expected4 = F.linear(x.float(), int4_dequantize(*int4_quantize(linear.weight.detach())), linear.bias.float())
    exact = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    step4 = (exact - expected4).abs().max()  # what int4 rounding costs: the kernel must be far closer than that
    assert (int8(x).float() - expected8).abs().max() < 2e-2 * expected8.abs().max()
    assert (int4(x).float() - expected4).abs().max() < 0.25 * step4
    assert int8(x).dtype == int4(x).dtype == dtype


@pytest.mark.skipif(not onednn_int8_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_on_onednn_equals_int_mm_bit_for_bit_and_row_by_row(dtype: torch.dtype) -> None:
    """Both W8A8 GEMMs accumulate exactly in integers and scale in the same order, so the packed oneDNN
    layout must give torch._int_mm's numbers to the last bit — at full-scale codes (±127 on every input and
    the weights' largest codes, where an int16 intermediate saturates without VNNI unless the weights keep
    7 bits) too — and a row alone must equal that row in a batch."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 80).to(dtype)
    with torch.no_grad():
        linear.weight[:8] = linear.weight[:8].abs()  # same-sign weights: every pair of products adds up
    packed = W8A8Linear(linear, packed=True)
    assert packed.weight_max == (127 if int8_vnni() else precision.SATURATION_FREE_WEIGHT)
    plain = W8A8Linear(linear, packed=False, weight_max=packed.weight_max)
    precision.pack_int8(packed)
    precision.pack_int8(plain)
    x = (torch.randn(40, 256) * 3).to(dtype)
    x[0] = 5.0
    x[1] = -5.0
    full = packed(x)
    assert torch.equal(full, plain(x))
    assert all(torch.equal(packed(x[:rows]), full[:rows]) for rows in (1, 2, 5, 8, 16))
    assert full.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_rows_do_not_depend_on_the_batch(dtype: torch.dtype) -> None:
    """Where the CPU has no VNNI the target runs int4 by default: a verify's rows must then equal the same rows
    decoded alone, or speculation could flip a near-tie token. Every row count the kernel may block
    differently (1 to 40, and a prefill-sized 200), at the 1.5B target's widths."""
    torch.manual_seed(0)
    linear = Int4WeightOnlyLinear(torch.nn.Linear(1536, 512, bias=False))
    x = torch.randn(200, 1536).to(dtype)
    full = linear(x)
    alone = torch.cat([linear(x[i:i + 1]) for i in range(40)])
    assert torch.equal(full[:40], alone)
    assert all(torch.equal(linear(x[:rows]), full[:rows]) for rows in (2, 3, 4, 5, 8, 9, 16, 17, 33))
    down = Int4WeightOnlyLinear(torch.nn.Linear(8960, 256, bias=False))  # the down projection's long inputs
    wide = torch.randn(9, 8960).to(dtype)
    assert torch.equal(down(wide)[:5], torch.cat([down(wide[i:i + 1]) for i in range(5)]))


@pytest.mark.parametrize(("quant", "layer"), [("w8a8", W8A8Linear), pytest.param("w8a8-fbgemm", FbgemmW8A8Linear,
                                                                                  marks=NEEDS_FBGEMM)])
def test_fused_sibling_projections_give_the_separate_linears_numbers(tiny_pair, quant: str, layer: type) -> None:
    """W8A8 q/k/v and gate/up share one GEMM (fused_linears); the model's logits must equal those of the same
    model with every linear quantised on its own, bit for bit, in a batch and token by token."""
    fused = ModelRunner.load(str(tiny_pair[0]), dtype="bfloat16", quant=quant).model
    assert any(isinstance(m, GroupMember) for m in fused.modules())
    separate = ModelRunner.load(str(tiny_pair[0]), dtype="bfloat16").model

    def quantise_each(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, layer(child))
                getattr(module, name).pack()
            else:
                quantise_each(child)

    quantise_each(separate)
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10], [20, 21, 22, 23, 24, 25], [40, 41, 40, 42, 43, 44]])
    with torch.no_grad():
        assert torch.equal(fused(tokens).logits, separate(tokens).logits)
        for position in range(1, tokens.shape[1] + 1):
            assert torch.equal(fused(tokens[:1, :position]).logits, separate(tokens[:1, :position]).logits)


def test_quantiser_recovers_weights_already_on_a_4_bit_grid() -> None:
    """Q4_K GGUF weights are 4-bit, 32-wide groups already: re-quantising one such group loses nothing."""
    codes = torch.randint(0, 16, (8, 64))
    codes[:, ::32] = 0
    codes[:, 1::32] = 15  # every group spans the whole code range, as a min-max quantiser leaves it
    scale = torch.rand(8, 2) + 0.5
    weight = (codes.reshape(8, 2, 32) * scale[..., None] - 3.0).reshape(8, 64)
    assert torch.allclose(int4_dequantize(*int4_quantize(weight)), weight, atol=1e-5)


def test_dtype_and_quant_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if native_bf16_cpu() else "float32")
    assert resolve_dtype("float64", "cpu") == "float64"
    amx = torch.cpu._is_amx_tile_supported()
    here = ("w8a8" if amx or not fbgemm_available() else "w8a8-fbgemm") if int8_vnni() else (
        "w8a8-fbgemm" if fbgemm_available() else "int4")
    assert resolve_quant("auto", "target", "cpu") == here
    for vnni, amx, fbgemm, draft, target in ((True, True, True, "int4-w8a8", "w8a8"),
                                             (True, False, True, "int4-w8a8", "w8a8-fbgemm"),
                                             (True, False, False, "int4-w8a8", "w8a8"),
                                             (False, False, True, "w8a8-fbgemm", "w8a8-fbgemm"),
                                             (False, False, False, "int4", "int4")):
        monkeypatch.setattr(precision, "int8_vnni", lambda vnni=vnni: vnni)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(fbgemm_w8a8, "fbgemm_available", lambda fbgemm=fbgemm: fbgemm)
        assert (resolve_quant("auto", "draft", "cpu"), resolve_quant("auto", "target", "cpu")) == (draft, target)
    assert resolve_quant("auto", "target", "cuda") == "none"
    assert resolve_quant("int8", "target", "cpu") == "int8"


@pytest.mark.parametrize("quant", QUANTS)
def test_quantised_runner_caches_exactly_like_its_uncached_self(tiny_pair, quant: str) -> None:
    """Batched, cached, incremental decoding through the quantised runner gives the greedy tokens of the same
    quantised model run uncached on each sequence alone."""
    runner = ModelRunner.load(str(tiny_pair[0]), dtype="float32", quant=quant)
    linears = [m for m in runner.model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears, "every linear, the output head included, is quantised"
    assert weight_bytes(runner.model) < weight_bytes(ModelRunner.load(str(tiny_pair[0]), dtype="float32").model)
    prompts = list(PROMPTS.values())
    states = [SequenceState(list(p)) for p in prompts]
    for _ in range(10):
        logits = runner.forward(states, logits_to_keep=1)
        for i, state in enumerate(states):
            state.tokens.append(int(logits[i, -1].argmax()))
    with torch.no_grad():
        for prompt, state in zip(prompts, states, strict=True):
            tokens = list(prompt)
            for _ in range(10):
                tokens.append(int(runner.model(torch.tensor([tokens])).logits[0, -1].argmax()))
            assert state.tokens == tokens


@pytest.mark.parametrize(("draft_quant", "target_quant"),
                         [("int4", "none"), ("int8", "int4"), ("int8", "int4-w8a8-prompt"),
                          ("int4-w8a8-prompt", "w8a8"), pytest.param("w8a8-fbgemm", "w8a8-fbgemm", marks=NEEDS_FBGEMM)])
def test_quantised_engines_speculate_batched_exactly_as_alone(tiny_pair, draft_quant: str, target_quant: str) -> None:
    """Greedy and sampled sequences, drafted and verified in a batch, equal each run alone (bfloat16): a seeded
    sample does not depend on its batch when the draft's rows do not either. (`int4-w8a8`, the draft default
    with VNNI, switches format by a call's rows, so its sampled sequences may differ batched: README, "Using it".)"""
    target = TargetEngine(ModelRunner.load(str(tiny_pair[0]), dtype="bfloat16", quant=target_quant))
    draft = DraftEngine(ModelRunner.load(str(tiny_pair[1]), dtype="bfloat16", quant=draft_quant), top_m=8)
    assert speculate(target, draft, list(PROMPTS), 6, batched=True) == \
        speculate(target, draft, list(PROMPTS), 6, batched=False)


@pytest.mark.parametrize("target_quant", ["w8a8", "int4", "int4-w8a8-prompt", FBGEMM])
def test_quantised_cluster_psd_and_sd_equal_target_only(clusters, tiny_pair, target_quant: str) -> None:
    """Real processes, bfloat16: a quantised target verified in psd and sd (int8 draft) streams ar's greedy
    tokens, up to near-ties of bfloat16 rounding (tests/ties.py)."""
    config = {"dtype": "bfloat16", "target_quant": target_quant, "draft_quant": "int8", "max_batch": 4}
    booted = {mode: clusters.get(mode, tiny_pair, **config) for mode in ("ar", "sd", "psd")}
    tokens = {}
    for mode, cluster in booted.items():
        with channel_to(cluster) as channel:
            calls = [stream(channel, make_request(prompt=p, max_tokens=24), timeout=60) for p in TEXT_PROMPTS[:6]]
            results = [collect(call) for call in calls]
        tokens[mode] = [r.token_ids for r in results]
        if mode == "psd":
            assert sum(int(r.stats["drafted_tokens"]) for r in results) > 0
    model = ModelRunner.load(str(tiny_pair[0]), dtype="bfloat16", quant=target_quant, kv="dynamic").model
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    prompts = TEXT_PROMPTS[:6]
    for mode in ("sd", "psd"):
        assert_same_or_tie(model, tokenizer, prompts, tokens["ar"], tokens[mode], BF16_TIE)


def test_a_service_resolves_quant_auto_by_its_role() -> None:
    """`minedraft draft/target --quant auto` (compose.cpu.yaml, the k8s CPU overlay) resolves on the service's own
    machine, for its own role."""
    for role, add_args in (("draft", draft_main.add_args), ("target", target_main.add_args)):
        parser = argparse.ArgumentParser()
        add_args(parser)
        args = parser.parse_args(["--model", "m", "--quant", "auto"])
        assert runner_loader(args, "m").keywords["quant"] == resolve_quant("auto", role, "cpu")
