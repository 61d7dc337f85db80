#!/usr/bin/env bash
# CI step: the GPU machines run torch 2.11 (CUDA 13) with triton 3.6, and nothing can be installed there,
# so the package must build against that torch. This builds the extension -- C++ and CUDA, for sm_90 --
# against torch 2.11.0 in a second virtual environment, runs the tests that need neither torchvision nor
# torch-pruning, and compiles every Triton kernel variant for sm_90 with triton 3.6.
#
#   bash scripts/check_torch211.sh            # from the repository root; about 8 minutes on 2 cores
#
# The build happens in a copy of the sources under build/ (an in-place build would replace the main
# environment's catalyst_fused/_C*.so, which has the same file name). Needs nvcc (CUDA_HOME, else
# /usr/local/cuda) and the package registry; safe to run again (it reuses the environment).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${TORCH211_VENV:-$ROOT/build/venv-torch211}
SRC=${TORCH211_SRC:-$ROOT/build/torch211-src}
PYTHON=${PYTHON:-python3}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

step() { echo "== check_torch211: $* ($(date -u +%H:%M:%S))"; }

step "environment with torch 2.11.0 in $VENV"
. "$ROOT/scripts/_disk.sh"
# Measured on a fresh 2-core machine (2026-12-04): 7.2 GiB at the peak of the install, 4.9 GiB after.
require_free_space_for_env "$VENV" 8 3 "the torch 2.11 environment (the CUDA build of torch 2.11.0)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# --isolated: the CUDA build of torch from the registry, whatever the machine's pip settings (see setup.sh)
"$VENV/bin/python" -m pip install --isolated --disable-pip-version-check -q \
  torch==2.11.0 numpy ninja pytest "setuptools>=64" wheel
"$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| triton', triton.__version__)"

step "copy of the sources in $SRC"
rm -rf "$SRC"
mkdir -p "$SRC"
git ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && xargs -0 cp --parents -t "$SRC")

step "build (C++ and CUDA sm_90) against torch 2.11"
cd "$SRC"
CATALYST_FUSED_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace
"$VENV/bin/python" -c "import catalyst_fused as cf; assert cf.cuda_kernels_built(), 'CUDA kernels missing'; print('built', cf.__file__)"

step "tests against torch 2.11"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_penalty_cpu.py tests/test_operator.py tests/test_layout.py \
  tests/test_reference.py tests/test_inplace.py tests/test_bad_input.py tests/test_cuda_backend.py tests/test_triton_backend.py

step "Triton kernels compiled for sm_90 with triton 3.6"
env -u TRITON_INTERPRET "$VENV/bin/python" scripts/aot_compile_triton.py --arch 90 --jobs "${MAX_JOBS:-2}"
step "done"
