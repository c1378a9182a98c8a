"""The fused CPU kernels build wherever a compiler exists. Kept out of test_kernels.py, whose autouse
fixture skips the fused parametrization when the extension is missing: there this check could
never fail."""

import os
import shutil

import pytest

from baton.kernels import cpu_ext


@pytest.mark.skipif(shutil.which("c++") is None or os.environ.get("BATON_CPU_EXT") == "0",
                    reason="no compiler here, or the extension is switched off")
def test_fused_kernels_build_where_a_compiler_exists():
    """Guards against silently serving from the slower torch fallback."""
    assert cpu_ext.available()
