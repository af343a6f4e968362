"""W8A8 on fbgemm's dynamic int8 linear (`--quant w8a8-fbgemm`), made row-exact.

fbgemm multiplies u8 activations by s8 weights at the memory's pace even on AVX2 (one 1536 x 8960 linear,
2 cores: 0.7 ms a row against 1.5 for torch's int4 kernel and 4.0 for oneDNN's int8 GEMM, and as fast as
oneDNN from 40 rows on), but it quantises its input with one scale and zero point for the whole call: a row's
numbers would then depend on the other rows in its batch, and speculation (which verifies a sequence in
batches of any make-up) could change a token. So each row is first divided by its own largest magnitude,
and every call carries two anchor inputs, +1 and -1, that multiply zero weight columns: the call's range is
then [-1, 1] whatever its rows, so its quantisation parameters are always the same and every row's result
depends on that row alone. Weights keep 7 bits (`precision.SATURATION_FREE_WEIGHT`) so the u8·s8 pair sums
of AVX2's vpmaddubsw never saturate: the integer GEMM is exact on every x86 CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from minedraft.engine.precision import SATURATION_FREE_WEIGHT, W8A8Linear, reshaped_with_bias

ANCHORS = (1.0, -1.0)  # one input at each end of the range the rows are scaled into
ANCHOR_ROW = torch.tensor([ANCHORS])  # a constant, not a buffer: the quantised cache saves every buffer
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
        padded = torch.cat([codes, codes.new_zeros(codes.shape[0], len(ANCHORS))], dim=1)  # the anchors' columns
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings(), _quantized_engine("fbgemm"):
            warnings.simplefilter("ignore", UserWarning)  # quantised tensors are deprecated for new front ends
            weight = torch._make_per_channel_quantized_tensor(padded, self.scales.double(), zeros, 0)
            self.weight_fbgemm = torch.ops.quantized.linear_prepack(weight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_fbgemm is None:
            raise RuntimeError("FbgemmW8A8Linear used before pack() (precision.pack_int8)")
        flat = x.reshape(-1, self.in_features).float()
        row_max = torch.linalg.vector_norm(flat, float("inf"), dim=1, keepdim=True).clamp_(min=TINY)
        # A NaN would become the call's min or max (fbgemm scans from the first element) and fail every row
        # in it: as zeros here, a bad row still comes out non-finite (times its NaN scale), alone.
        unit = torch.cat([flat / row_max, ANCHOR_ROW.expand(flat.shape[0], -1)], dim=1).nan_to_num_(0.0, 1.0, -1.0)
        out = torch.ops.quantized.linear_dynamic(unit, self.weight_fbgemm, False).mul_(row_max)  # 8-bit inputs
        return reshaped_with_bias(out, x, self)
