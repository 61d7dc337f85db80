#!/usr/bin/env bash
# The one prepared GPU check (issue 11). On a GPU machine, from the repository root:
#
#   bash scripts/gpu_check.sh OUT_DIR          # about 7 minutes on an H200 machine, no network needed
#
# 1. fails fast (exit 2) unless torch sees a GPU;
# 2. builds the extension in place against the machine's torch (TORCH_CUDA_ARCH_LIST=9.0, all cores)
#    while other processes compile the Triton kernels (JIT cache warm-up, from a copy of the package);
# 3. runs the GPU tests (tests/test_cuda_backend.py, -rs) for the C++ backend and the Triton backend in
#    separate processes, so that a crash in one cannot hide the other;
# 4. runs scripts/gpu_smoke.py for each backend (empty tensors, streams, sync debug mode, fp64 scale,
#    > 2^31 elements, torch.compile, opcheck, duplicates, CUDA graphs, launch counts, figures);
# 5. runs benchmarks/overhead.py --device cuda --quick with every GPU provider and the memory floor
#    (torch.compile in a second run);
# 6. runs compute-sanitizer memcheck and racecheck on a small case, where the machine supports it.
# Everything is logged under OUT_DIR (one log per step, summary.txt, smoke_*.json, overhead.csv). Each
# step has a time limit and the whole run a budget (GPU_CHECK_BUDGET seconds, default 450): steps that
# no longer fit are skipped and say so. Exit status: 0 if every step passed, 1 otherwise, 2 without GPU.
# GPU_CHECK_DRY_RUN=1 runs the plumbing without a GPU (every GPU step then fails or skips).
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
ROOT=$PWD
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-450}
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
FAILED=0

say() { echo "gpu_check [$(( $(date +%s) - START ))s]: $*" | tee -a "$SUMMARY"; }
remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run_step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with the smaller of LIMIT and the time left, output
# in OUT/NAME.log.
run_step() {
  local name=$1 limit=$2 left
  shift 2
  left=$(remaining)
  if (( left < 20 )); then
    say "SKIP $name (no time left in the ${BUDGET}s budget)"
    FAILED=1
    return
  fi
  (( limit > left )) && limit=$left
  local begin=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? took=$(( $(date +%s) - begin ))
  if (( rc == 0 )); then
    say "PASS $name (${took}s)"
  elif (( rc == 124 || rc == 137 )); then
    say "TIMEOUT $name after ${took}s (limit ${limit}s; see $name.log)"
    FAILED=1
  else
    say "FAIL $name (exit $rc, ${took}s; see $name.log)"
    FAILED=1
  fi
  tail -n 4 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
}

# 1. A GPU must be visible: fail fast and clearly.
"$PY" - > "$OUT/env.txt" 2>&1 <<'PY'
import platform, sys
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as error:
    print("triton: not importable:", error)
if not torch.cuda.is_available():
    sys.exit("no CUDA device is visible to torch")
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i), "sm_%d%d" % torch.cuda.get_device_capability(i))
PY
GPU_RC=$?
REASON=$(tail -n 1 "$OUT/env.txt")
{ echo "cores: $(nproc)"; command -v nvidia-smi > /dev/null && nvidia-smi; } >> "$OUT/env.txt" 2>&1
if (( GPU_RC != 0 )); then
  if [ "${GPU_CHECK_DRY_RUN:-0}" != 1 ]; then
    echo "gpu_check: FAILED on $(hostname) with $PY: $REASON. Nothing was run (logs: $OUT)." >&2
    echo "no GPU visible" >> "$SUMMARY"
    exit 2
  fi
  say "DRY RUN without a GPU: the GPU steps will fail or skip"
fi
say "$(head -n 2 "$OUT/env.txt" | tr '\n' ' ')"

export TRITON_INTERPRET=0  # compiled Triton on CUDA tensors (tests/conftest.py would default to the interpreter)
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda  # as scripts/setup.sh: cpp_extension may guess a wrong root from PATH
fi
export PYTHONUNBUFFERED=1
JOBS=$(nproc)

# 2. Build in place, and meanwhile warm the Triton JIT cache: one process per dtype compiles the four kernel
# variants it uses, from a copy of the package without the extension (the build replaces _C*.so).
WARM=$(mktemp -d)
mkdir -p "$WARM/src"
cp -r catalyst_fused "$WARM/src/"
find "$WARM/src" -name '*.so' -delete
warm_triton() {
  local pids=() rc=0
  for dtype in float32 float64 float16 bfloat16; do
    (cd "$WARM/src" && timeout 240 "$PY" - "$dtype" "$WARM/src" > "$OUT/warm_triton_$dtype.log" 2>&1 <<'PY'
import sys, torch, catalyst_fused as cf
assert cf.__file__.startswith(sys.argv[2]), cf.__file__  # the copy without the extension being rebuilt
dtype = getattr(torch, sys.argv[1])
w = [torch.randn(5, 7, device="cuda", dtype=dtype, requires_grad=True), torch.randn(3, device="cuda", dtype=dtype, requires_grad=True)]
d = [torch.rand(5, device="cuda", dtype=dtype, requires_grad=True), torch.rand(3, device="cuda", dtype=dtype, requires_grad=True)]
cf.penalty(w, d, backend="triton").backward()   # norm kernel, gradient kernel
cf.penalty_(w, d, scale=0.5, backend="triton")  # norm kernel with catalyst gradients, accumulating gradient kernel
torch.cuda.synchronize()
print("compiled the Triton kernels for", sys.argv[1])
PY
    ) &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  return $rc
}
WARM_BEGIN=$(date +%s)
( warm_triton; echo $? > "$OUT/warm_triton.rc" ) &
WARM_PID=$!
run_step build 300 env CATALYST_FUSED_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$JOBS" \
  "$PY" setup.py build_ext --inplace
wait "$WARM_PID"
if [ "$(cat "$OUT/warm_triton.rc" 2>/dev/null)" = 0 ]; then
  say "PASS warm_triton ($(( $(date +%s) - WARM_BEGIN ))s, in parallel with the build)"
else
  say "FAIL warm_triton (see warm_triton_*.log)"
  FAILED=1
fi
rm -rf "$WARM" "$OUT/warm_triton.rc"
"$PY" -c "import catalyst_fused as cf; print('CUDA kernels built:', cf.cuda_kernels_built(), '| Triton on CUDA:', cf.triton_available('cuda'))" 2>&1 | tee -a "$SUMMARY"

# 3. GPU tests, one backend per process.
if "$PY" -c "import pytest" 2> /dev/null; then
  for backend in cpp triton; do
    run_step "tests_$backend" 150 env GPU_BACKENDS=$backend "$PY" -m pytest tests/test_cuda_backend.py -rs -q -p no:cacheprovider
  done
else
  say "FAIL tests (pytest is not installed for $PY; bring a pytest wheel): the smoke checks below still run"
  FAILED=1
fi

# 4. Smoke checks and figures, one backend per process.
for backend in cpp triton; do
  run_step "smoke_$backend" 150 "$PY" scripts/gpu_smoke.py --backend $backend --out "$OUT"
done

# 5. Overhead benchmark, every GPU provider, memory floor measured in the same run (resnet56 and the
# transformer MLP stack). torch.compile's cold compiles are slow: it runs second, so that a timeout there
# cannot cost the other providers' rows (the CSV is written at the end of a run).
run_step benchmark 120 "$PY" benchmarks/overhead.py --device cuda --quick \
  --providers eager,foreach,cpp,cpp_inplace,triton,triton_inplace --out "$OUT/overhead.csv"
run_step benchmark_compile 150 "$PY" benchmarks/overhead.py --device cuda --quick \
  --providers eager,compile,cpp,cpp_inplace --out "$OUT/overhead.csv"

# 6. compute-sanitizer on a small case (needs a runtime that supports it; a failure to start is reported).
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$SANITIZER" ]; then
  for tool in memcheck racecheck; do
    run_step "sanitizer_$tool" 90 "$SANITIZER" --tool $tool --error-exitcode 3 --target-processes all \
      "$PY" scripts/gpu_smoke.py --backend cpp --only tiny
  done
else
  say "SKIP sanitizer (compute-sanitizer not found)"
fi

say "done in $(( $(date +%s) - START ))s; logs in $OUT"
exit $FAILED
