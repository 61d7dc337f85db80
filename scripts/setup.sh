#!/usr/bin/env bash
# Creates ./.venv with the pinned dependencies and builds catalyst_fused into it (editable, so the
# compiled operator library lands next to the sources). Safe to run again: it only redoes what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
. scripts/_disk.sh
# Measured on a fresh 2-core machine (2026-12-04): 8.1 GiB at the peak of the install (the downloaded wheels
# beside what is unpacked from them), 5.4 GiB after.
require_free_space_for_env .venv 9 4 "a fresh ./.venv (the CUDA build of torch and the pinned dependencies)"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi

# --isolated ignores machine-wide pip settings (a local CPU-only torch wheel, version caps), so every
# machine resolves the same packages from the registry.
pip_install() { .venv/bin/python -m pip install --isolated --disable-pip-version-check -q "$@"; }

pip_install -r requirements.txt
# The CUDA build of torch plus nvcc means the CUDA kernels are compiled and linked too (no GPU needed).
# Name the toolkit root explicitly: torch otherwise guesses it from the nvcc wrapper on PATH.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# --no-build-isolation: build against the torch installed above, not a second copy.
MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation --no-deps -e .
.venv/bin/python - <<'PY'
import torch, torchvision, catalyst_fused as cf
assert cf.cpp_available(), f"the C++ extension did not load: {cf.operators.CPP_IMPORT_ERROR}"
print(f"catalyst_fused {cf.__version__} | torch {torch.__version__} | torchvision {torchvision.__version__} | "
      f"CUDA kernels built: {cf.cuda_kernels_built()} | GPU: {torch.cuda.is_available()}")
PY
