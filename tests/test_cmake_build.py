"""The standalone CMake build (CMakeLists.txt) produces an operator library that torch can load by itself.

Configures and builds libcatalyst_fused_ops.so out of tree, then loads it with torch.ops.load_library in
a fresh interpreter that never imports catalyst_fused, and checks penalty_forward against plain torch.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import catalyst_fused as cf
from _helpers import cuda_toolkit_root

ROOT = Path(__file__).resolve().parents[1]
MARKER = "CATALYST_CMAKE_OPS_OK"

CONFIGURE_TIMEOUT_S = 300
BUILD_TIMEOUT_S = 900
RUN_TIMEOUT_S = 300

_CHECK_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch

    torch.ops.load_library(sys.argv[1])
    assert "catalyst_fused" not in sys.modules, "the test must not import the catalyst_fused package"

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 9, dtype=torch.float64, generator=g)
    d = torch.randn(6, dtype=torch.float64, generator=g)
    penalty, norms, ratios = torch.ops.catalyst_fused.penalty_forward([w], [d], None)

    ref_norms = w.norm(dim=1)
    ref_penalty = (d.abs() * ref_norms).sum()
    torch.testing.assert_close(penalty.reshape(()), ref_penalty, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norms.reshape(-1), ref_norms, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ratios.reshape(-1), d.abs() / ref_norms, rtol=1e-12, atol=1e-12)
    print("%s penalty=%.17g expected=%.17g" % (sys.argv[2], penalty.item(), ref_penalty.item()))
    print("CUDA_KERNELS=%d" % torch._C._dispatch_has_kernel_for_dispatch_key("catalyst_fused::penalty_forward", "CUDA"))
    """
)


def _find_ninja():
    found = shutil.which("ninja")
    if found:
        return found
    candidate = Path(sys.executable).parent / "ninja"
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _run(cmd, timeout, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, (
        f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
        f"--- stdout ---\n{proc.stdout[-8000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
    )
    return proc


@pytest.mark.slow
def test_cmake_build_loads_standalone(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found on PATH; the standalone CMake build cannot be tested")

    build_dir = tmp_path / "build"
    configure = [cmake, "-S", str(ROOT), "-B", str(build_dir), f"-DPYTHON_EXECUTABLE={sys.executable}",
                 "-DCMAKE_BUILD_TYPE=Release"]
    ninja = _find_ninja()
    if ninja is not None:
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    env = dict(os.environ)
    toolkit = cuda_toolkit_root()
    if toolkit is not None:
        env["CUDA_HOME"] = toolkit  # as scripts/setup.sh does for setup.py
    _run(configure, CONFIGURE_TIMEOUT_S, env=env)
    _run([cmake, "--build", str(build_dir), "-j", "2"], BUILD_TIMEOUT_S)

    libs = sorted(build_dir.glob("libcatalyst_fused_ops*.so"))
    assert len(libs) == 1, f"expected one libcatalyst_fused_ops*.so in {build_dir}, found {libs}"

    # Torch's libraries must come from the library's RPATH, not from the environment.
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    proc = _run([sys.executable, "-c", _CHECK_SCRIPT, str(libs[0]), MARKER], RUN_TIMEOUT_S,
                cwd=tmp_path, env=env)
    marker_lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    assert len(marker_lines) == 1, f"no result line in the output:\n{proc.stdout}\n{proc.stderr}"
    # CMake and setup.py agree on whether the CUDA kernels are part of the library.
    cuda_lines = [line for line in proc.stdout.splitlines() if line.startswith("CUDA_KERNELS=")]
    assert cuda_lines == [f"CUDA_KERNELS={int(cf.cuda_kernels_built())}"], proc.stdout
