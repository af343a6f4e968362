"""The `w8a8-fbgemm` format as a test parameter: skipped where torch has no fbgemm (non-x86 builds)."""

import pytest

from minedraft.engine.fbgemm_w8a8 import fbgemm_available

NEEDS_FBGEMM = pytest.mark.skipif(not fbgemm_available(), reason="torch built without fbgemm")
FBGEMM = pytest.param("w8a8-fbgemm", marks=NEEDS_FBGEMM)
