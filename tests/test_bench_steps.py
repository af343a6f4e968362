"""`minedraft bench-steps` on CPU: every layout but graphs measured against a positive floor, graphs skipped;
the bytes a step moves (`step_bytes`): weights as the runner holds them, and each KV layout's traffic."""

import argparse
import json
from types import SimpleNamespace

import torch

from minedraft.app.bench import gpu_summary, step_bytes, steps
from minedraft.app.bench.step_bytes import KVGeometry, weight_bytes
from minedraft.engine.model_runner import ModelRunner
from minedraft.engine.precision import use_onednn_linears
from minedraft.models.random_shapes import random_config
from tests.formats import NEEDS_FBGEMM


def test_step_bench_measures_layouts_and_skips_graphs_without_cuda(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    steps.add_args(parser)
    args = parser.parse_args(["--models", "random:tiny-draft", "--device", "cpu", "--dtype", "float32",
                              "--batches", "1,2", "--context", "16", "--repeats", "1", "--out", str(tmp_path)])
    assert steps.run(args) == 0
    result = json.loads((tmp_path / "steps.json").read_text())
    assert "skipping CUDA graphs" in capsys.readouterr().out
    assert {(r["layout"], r["op"], r["batch"]) for r in result["rows"]} == {
        (layout, op, batch) for layout in ("dynamic", "static", "gather") for op in ("decode", "verify k+1=5")
        for batch in (1, 2)}
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 and r["x_floor"] == r["ms"] / r["floor_ms"] for r in result["rows"])
    table = "\n".join(gpu_summary.step_lines(result))
    assert "| random:tiny-draft | static | decode |" in table
    assert "MB moved" in table
    for r in result["rows"]:
        assert r["bytes_moved"] == r["weight_bytes"] + r["kv_bytes"]
        assert r["weight_bytes"] > 39_000_000  # the tied 151936 x 64 float32 table alone is 38.9 MB
    # One floor for every layout of a model/op/batch (weights + KV read once); the layouts' copies show in x_floor.
    floors = {(r["op"], r["batch"], r["layout"]): r["floor_ms"] for r in result["rows"]}
    assert all(floors[op, batch, "static"] == floors[op, batch, "dynamic"] for op, batch, _ in floors)
    # Attention reading slots in place moves just the KV it must read; the gathered cache moves more.
    moved = {(r["op"], r["batch"], r["layout"]): r["kv_bytes"] for r in result["rows"]}
    assert all(moved[op, batch, "static"] < moved[op, batch, "gather"] for op, batch, _ in moved)


def tiny_target(dtype: str, **kwargs) -> torch.nn.Module:
    return ModelRunner.load("random:tiny-target", device="cpu", dtype=dtype, kv="dynamic", **kwargs).model


def test_onednn_float32_weights_count_as_much_as_plain_float32() -> None:
    """The bug: a float32 runner's oneDNN linears hold their weights in opaque buffers, and the floor counted
    only the embeddings. Swapping every linear must keep the bytes, up to what oneDNN really adds."""
    model = tiny_target("float32", cpu_linear="none")
    plain = weight_bytes(model, rows=5)
    params = {id(p): p for p in model.parameters()}.values()  # tied table and head once
    assert plain == 4 * (sum(p.numel() for p in params) + sum(b.numel() for b in model.buffers()))
    zero_biases = sum(m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is None)
    assert use_onednn_linears(model, min_params=0) == 29  # 7 per layer and the head
    # The head now holds its own (oneDNN) copy of the table, so the table counts the 5 rows looked up; and
    # MkldnnLinear stores a zero bias where a linear had none.
    assert weight_bytes(model, rows=5) == plain + 5 * 128 * 4 + 4 * zero_biases


def test_int8_weights_are_half_bfloat16_and_a_quarter_float32() -> None:
    int8 = weight_bytes(tiny_target("bfloat16", quant="int8"))
    bf16, fp32 = weight_bytes(tiny_target("bfloat16")), weight_bytes(tiny_target("float32", cpu_linear="none"))
    # int8 codes plus a bfloat16 scale per output channel (1/64 of a 128-input row) and the norms and biases
    assert 0.5 < int8 / bf16 < 0.51
    assert 0.25 < int8 / fp32 < 0.255


@NEEDS_FBGEMM
def test_fbgemm_packed_weights_count_their_int8_codes() -> None:
    """fbgemm's packed weight is not a tensor; its codes still count, as int8."""
    fbgemm = weight_bytes(tiny_target("float32", quant="w8a8-fbgemm"))
    int8 = weight_bytes(tiny_target("float32", quant="int8"))  # codes as a tensor, a scale per output channel
    assert 0.98 < fbgemm / int8 < 1.02


def test_int4_w8a8_counts_the_form_a_step_runs() -> None:
    switched = tiny_target("bfloat16", quant="int4-w8a8")
    assert weight_bytes(switched, rows=1) == weight_bytes(tiny_target("bfloat16", quant="int4"), rows=1)
    assert weight_bytes(switched, rows=40) == weight_bytes(tiny_target("bfloat16", quant="w8a8"), rows=40)


def test_kv_bytes_per_layout() -> None:
    geo = KVGeometry.of(random_config("random:tiny-target"), torch.float32)
    per_token = 2 * 4 * 2 * 32 * 4  # keys and values x layers x kv heads x head_dim (128 / 4 heads) x float32
    assert geo.per_token == per_token and geo.groups == 2
    kv_lens = [10, 20]
    real = (10 + 5 + 20 + 5) * per_token
    assert step_bytes.real_kv_bytes(geo, kv_lens, 5) == real == 81920
    assert step_bytes.layout_kv_bytes("static", geo, kv_lens, 5, SimpleNamespace(paged=True)) == real
    # Unpaged static, verify of 5: new tokens written (2 x 5), gather of 2 rows x width 25 read and written,
    # then repeat_kv reads it and writes and reads it twice over (2 query heads per KV head).
    static = step_bytes.layout_kv_bytes("static", geo, kv_lens, 5)
    assert static == (2 * 5 + 2 * 2 * 25 + 2 * 25 * (1 + 2 * 2)) * per_token == 737280 > real
    # One query: no repeat_kv (pack_gqa), the gathered batch read once.
    assert step_bytes.layout_kv_bytes("static", geo, kv_lens, 1) == (2 * 1 + 3 * 2 * 21) * per_token
    # CUDA graphs pad the step: 3 rows to 4, width 25 to the smallest bucket (256).
    graphs = SimpleNamespace(pad_shapes=True, max_seqs=8, min_width=256, max_context=1024)
    assert step_bytes.layout_kv_bytes("graphs", geo, [10, 20, 15], 1, graphs) == (4 * 1 + 3 * 4 * 256) * per_token
    dynamic = step_bytes.layout_kv_bytes("dynamic", geo, kv_lens, 5)
    assert dynamic == ((30 + 40) + (40 + 50) + 2 * 50 + 2 * 40 + 50 * 5) * per_token > static
