"""W8A8 on fbgemm's int8 linear (`--quant w8a8-fbgemm`), made row-exact.

fbgemm multiplies u8 activations by s8 weights at the memory's pace even on AVX2 (one 1536 x 8960 linear,
2 cores: 0.7 ms a row against 1.5 for torch's int4 kernel and 4.0 for oneDNN's int8 GEMM, and as fast as
oneDNN from 40 rows on). Its dynamic linear quantises the input with one scale and zero point for the whole
call, so a row's numbers would depend on the other rows in its batch, and speculation (which verifies a
sequence in batches of any make-up) could change a token. So each row is divided by its own largest
magnitude and quantised with one fixed scale and zero point (±1 to the u8 codes 128 ± 127) by fbgemm's
`linear_with_input_q_dq_qweight_dq_output_fp32`: every code, and so every row's result, depends on that row
alone, and no call-wide scan of the input runs. Weights keep 7 bits (`precision.SATURATION_FREE_WEIGHT`) so
the u8·s8 pair sums of AVX2's vpmaddubsw never saturate: the integer GEMM is exact on every x86 CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from minedraft.engine.precision import SATURATION_FREE_WEIGHT, W8A8Linear, reshaped_with_bias

INPUT_ZERO_POINT = 128  # the code of 0: ±1 map to 1 and 255, both in u8
INPUT_SCALE = 1 / 127  # a row scaled into [-1, 1] uses 255 of the 256 codes
TINY = torch.finfo(torch.float32).tiny  # an all-zero row's scale: its zeros stay zeros


def fbgemm_available() -> bool:
    """Whether this torch has fbgemm's quantised kernels (every x86-64 build)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


@contextmanager
def _quantized_engine(name: str) -> Iterator[None]:
    """Packs with this engine's layout (the packed weight then picks its own kernel whatever the global one)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def fixed_scale_linear(unit_rows: torch.Tensor, packed_weight: torch.ScriptObject) -> torch.Tensor:
    """float32 rows in [-1, 1] times the packed int8 weight, the rows quantised with the fixed parameters."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        unit_rows, INPUT_SCALE, INPUT_ZERO_POINT, packed_weight)


class FbgemmW8A8Linear(W8A8Linear):
    """y = dequant(q(x / m) · w_qᵀ) · m + b per row, m = the row's largest |x| (module docstring)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        if not fbgemm_available():
            raise ValueError("--quant w8a8-fbgemm needs a torch built with fbgemm (x86-64)")
        super().__init__(linear, packed=False, weight_max=SATURATION_FREE_WEIGHT)
        self.weight_fbgemm = None

    def pack(self) -> None:
        if self.weight_codes is None:
            return
        codes, self.weight_codes = self.weight_codes, None
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings(), _quantized_engine("fbgemm"):
            warnings.simplefilter("ignore", UserWarning)  # quantised tensors are deprecated for new front ends
            weight = torch._make_per_channel_quantized_tensor(codes, self.scales.double(), zeros, 0)
            self.weight_fbgemm = torch.ops.quantized.linear_prepack(weight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_fbgemm is None:
            raise RuntimeError("FbgemmW8A8Linear used before pack() (precision.pack_int8)")
        flat = x.reshape(-1, self.in_features).float()
        # abs().amax, not vector_norm(inf): the same exact maximum (NaN too), 6-10x faster from 5 rows up (15 against
        # 100 us for 5 x 8960, 2 threads): a 5-token 1.5B verify's row maxima 5.9 -> 2.5 ms (profiler), one row alike.
        row_max = flat.abs().amax(dim=1, keepdim=True).clamp_(min=TINY)
        # A NaN or inf row's codes are garbage, but times its non-finite scale they come out non-finite, alone.
        out = fixed_scale_linear(flat / row_max, self.weight_fbgemm).mul_(row_max)
        return reshaped_with_bias(out, x, self)
