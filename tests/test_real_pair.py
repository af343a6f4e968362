"""The test that matters most: on the real default pair, in its default configuration (bfloat16 where the
CPU multiplies it natively, W8A8 target on oneDNN or fbgemm as the CPU has it, int4/W8A8 draft), speculative
output equals target-only output, token for token, exact ties included.

On the CPU's in-place attention a position's logits are the same bits whether it is decoded or verified (and,
in bfloat16, prefilled: W8A8 accumulates in integers; slot_attention.KEY_BLOCK says how the attention does), so no
tolerance is needed here, on AMX CPUs too (oneDNN's AMX kernels give a row the same bits whatever the call's
row count: tests/test_static_kv.py runs on them).
"""

from __future__ import annotations

import pytest

from minedraft.app.client import collect, make_request, stream
from minedraft.app.launcher import Cluster
from services.router.drafting import DRAFT_STOP_BELOW
from tests.conftest import channel_to, cluster_args
from tests.test_models import needs_default_pair

PROMPTS = ["def is_prime(n: int) -> bool:\n", "Explain in one sentence what a hash map is.",
           "from typing import List\n\ndef mean(xs: List[float]) -> float:\n"]
MAX_TOKENS = 24


def generate(mode: str) -> list:
    args = cluster_args(mode, "default-target", "default-draft", max_batch=4, dtype="auto", draft_quant="auto",
                        target_quant="auto", draft_stop_below=DRAFT_STOP_BELOW)
    with Cluster(args) as cluster:
        cluster.wait_ready(timeout_s=300)
        with channel_to(cluster) as channel:
            calls = [stream(channel, make_request(prompt=p, max_tokens=MAX_TOKENS), timeout=600) for p in PROMPTS]
            return [collect(call) for call in calls]


@pytest.mark.slow
@needs_default_pair
def test_psd_on_real_pair_equals_target_only() -> None:
    target_only, speculative = generate("ar"), generate("psd")
    drafted = sum(int(r.stats["drafted_tokens"]) for r in speculative)
    accepted = sum(int(r.stats["accepted_tokens"]) for r in speculative)
    assert drafted > 0 and accepted / drafted > 0.3, "a real pair should agree often"
    expected, actual = [r.token_ids for r in target_only], [r.token_ids for r in speculative]
    # Bit-exact on every CPU class measured: AVX2 (float32), AVX-512 BF16 with VNNI (oneDNN's and, since session
    # 39, fbgemm's W8A8 target), and AMX (bfloat16).
    assert actual == expected
