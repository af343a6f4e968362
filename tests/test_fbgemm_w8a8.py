"""`--quant w8a8-fbgemm` (the CPU default without VNNI): fbgemm's int8 linear, whose dynamic quantisation spans the
whole call, must give every row the numbers it gets alone — or a verify batch could change a token — and its
integer GEMM must be exact at full-scale codes (no int16 saturation on AVX2)."""

from __future__ import annotations

import pytest
import torch

from minedraft.engine.fbgemm_w8a8 import INPUT_SCALE, INPUT_ZERO_POINT, TINY, FbgemmW8A8Linear, fixed_scale_linear
from minedraft.engine.precision import SATURATION_FREE_WEIGHT
from tests.formats import NEEDS_FBGEMM

pytestmark = NEEDS_FBGEMM


def packed(linear: torch.nn.Linear) -> FbgemmW8A8Linear:
    layer = FbgemmW8A8Linear(linear)
    layer.pack()
    return layer


def mixed_rows(features: int) -> torch.Tensor:
    """Rows whose ranges differ wildly: one call's shared quantisation would round each differently."""
    torch.manual_seed(0)
    rows = torch.randn(6, features)
    rows[1] *= 300.0
    rows[2] = -rows[2].abs()  # all negative: alone, its range would not reach +1
    rows[3] = 0.0
    rows[4] *= 1e-4
    return rows


@pytest.mark.parametrize("threads", [1, 2])
def test_each_row_equals_itself_alone_in_any_batch(threads: int) -> None:
    """Across fbgemm's blocks (12-row kernels, 120-row blocks, 512-input and 8-output blocks, tails of each)
    and thread counts (a service's workers change them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layer, rows = packed(torch.nn.Linear(1100, 97)), mixed_rows(1100)
        alone = torch.cat([layer(rows[i:i + 1]) for i in range(len(rows))])
        assert torch.equal(layer(rows), alone)
        assert torch.equal(layer(rows.flip(0)), alone.flip(0))
        assert torch.equal(layer(rows[None, 1:4])[0], alone[1:4])  # [batch, width, features] as a model feeds it
        for others in (7, 115, 244):  # the rows land in the first, second and third 120-row blocks
            batch = torch.cat([torch.randn(others, 1100) * 7, rows])
            assert torch.equal(layer(batch)[others:], alone)
    finally:
        torch.set_num_threads(before)
    plain = torch.ops.quantized.linear_dynamic(rows, layer.weight_fbgemm, False)
    lone = torch.ops.quantized.linear_dynamic(rows[:1], layer.weight_fbgemm, False)
    assert not torch.equal(plain[:1], lone), "fbgemm's dynamic linear: a row would depend on its batch"


def test_each_row_is_scaled_by_its_own_largest_magnitude() -> None:
    """y = q(x / m) · w · m + b with m the row's largest |x| (its infinity norm), bit for bit: rows whose largest
    value is negative, zero rows and tiny rows included."""
    layer, rows = packed(torch.nn.Linear(1100, 97)), mixed_rows(1100)
    norm = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).clamp(min=TINY)
    expected = fixed_scale_linear(rows / norm, layer.weight_fbgemm) * norm + layer.bias
    assert torch.equal(layer(rows), expected)


def test_a_non_finite_row_spoils_itself_alone() -> None:
    """A NaN or inf must not reach the other rows (fbgemm's dynamic linear would take it as the call's range)."""
    layer, rows = packed(torch.nn.Linear(64, 16)), mixed_rows(64)
    alone = torch.cat([layer(rows[i:i + 1]) for i in range(len(rows))])
    for bad in (0, 2):
        for value in (float("nan"), float("inf")):
            spoilt = rows.clone()
            spoilt[bad, 5 * bad] = value
            out = layer(spoilt)
            kept = [i for i in range(len(rows)) if i != bad]
            assert torch.equal(out[kept], alone[kept])
            assert not out[bad].isfinite().all()


def test_results_are_the_exact_integer_gemm_at_full_scale_codes() -> None:
    """Every weight at the 7-bit limit and every input at the u8 ends (a row scaled to ±1): the pair sums AVX2
    adds in int16 would saturate at 8-bit weights; here the result must be the float64 product of the codes."""
    features, outputs = 512, 32
    linear = torch.nn.Linear(features, outputs, bias=False)
    signs = torch.randint(0, 2, (outputs, features)) * 2 - 1
    with torch.no_grad():
        linear.weight.copy_(signs * 0.01)
    layer = packed(linear)
    x = torch.ones(3, features)
    x[1] = -1.0
    x[2, ::2] = -1.0
    codes_x = torch.clamp(torch.round(x.double() / INPUT_SCALE) + INPUT_ZERO_POINT, 0, 255) - INPUT_ZERO_POINT
    assert codes_x.abs().max() == 127
    weights = signs.double() * SATURATION_FREE_WEIGHT * (0.01 / SATURATION_FREE_WEIGHT)
    expected = (codes_x * INPUT_SCALE) @ weights.T
    assert torch.allclose(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_close_to_the_float_linear_with_bias_and_dtype_kept() -> None:
    torch.manual_seed(1)
    linear = torch.nn.Linear(320, 64).to(torch.bfloat16)
    layer, x = packed(linear), torch.randn(2, 5, 320, dtype=torch.bfloat16)
    exact = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
    out = layer(x)
    assert out.shape == exact.shape and out.dtype == torch.bfloat16
    assert (out.float() - exact).norm() < 0.03 * exact.norm()


def test_an_unpacked_layer_refuses_to_run() -> None:
    with pytest.raises(RuntimeError, match="before pack"):
        FbgemmW8A8Linear(torch.nn.Linear(64, 16))(torch.randn(1, 64))
