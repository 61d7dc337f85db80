"""Compiles the Triton soft-threshold kernel (catalyst_fused/backends/triton_soft_threshold.py) to GPU machine
code ahead of time, without a GPU: every dtype for sm_80 and sm_90, down to a cubin (ptxas runs; no driver is
needed), and checks in the PTX that fp32 -> bf16/fp16 stores round to nearest even (``cvt.rn``), which the
CPU interpreter does not do for bf16 (it truncates; tests/test_soft_threshold.py allows for it).

    python scripts/aot_compile_soft_threshold.py            # run without TRITON_INTERPRET=1

Exits non-zero, naming the variant, if any variant fails. tests/test_soft_threshold.py runs it in a subprocess.
"""
from __future__ import annotations

import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DTYPES = {"float32": ("float32", None), "float64": ("float64", None), "float16": ("float32", "cvt.rn.f16.f32"),
          "bfloat16": ("float32", "cvt.rn.bf16.f32")}


def compile_one(dtype: str, arch: int) -> str:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from catalyst_fused.backends import triton_soft_threshold as ts

    acc, rounding = DTYPES[dtype]
    fn = ts._soft_threshold_kernel
    constexprs = {"DTYPE": getattr(tl, dtype), "ACC": getattr(tl, acc), "FIELDS": ts.FIELDS, "BLOCK": ts.BLOCK}
    signature = {"table": "*i64", "counts": "*i64", **{k: "constexpr" for k in constexprs}}
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    attrs = {(fn.arg_names.index(k),): backend.parse_attr("D") for k in ("table", "counts")}  # 16-byte aligned
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                              options={"num_warps": ts.NUM_WARPS})
    cubin = compiled.asm.get("cubin")
    if not cubin:
        raise RuntimeError("no cubin produced")
    if rounding is not None and rounding not in compiled.asm["ptx"]:
        raise RuntimeError(f"the PTX has no {rounding}: the store does not round to nearest even")
    return f"{dtype:>8} sm_{arch}: {len(cubin)} B cubin, {time.perf_counter() - start:.1f} s"


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    import triton

    failures = 0
    print(f"triton {triton.__version__}")
    for arch in (80, 90):
        for dtype in DTYPES:
            try:
                print(compile_one(dtype, arch), flush=True)
            except Exception as error:  # report every failing variant, then fail
                failures += 1
                print(f"FAILED {dtype} sm_{arch}: {type(error).__name__}: {error}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
