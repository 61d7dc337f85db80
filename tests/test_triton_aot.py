"""Every Triton kernel variant (both kernels x 4 dtypes x their flag) compiles to a cubin for sm_80 and
sm_90, without a GPU: scripts/aot_compile_triton.py in a subprocess without TRITON_INTERPRET (the
interpreter, which conftest.py turns on, compiles nothing). About 3 minutes on 2 cores."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_all_variants_compile_to_cubin():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "aot_compile_triton.py"), "--arch", "80", "--arch", "90", "--jobs", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    assert "32/32 variants compiled" in result.stdout, result.stdout
