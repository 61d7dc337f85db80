"""Compiles every variant of the Triton kernels to GPU machine code ahead of time, without a GPU.

    python scripts/aot_compile_triton.py                 # sm_80 and sm_90, every dtype and flag
    python scripts/aot_compile_triton.py --arch 90 --jobs 2

Each (kernel, dtype, flag, arch) variant goes through ``triton.compile`` with an explicit ``GPUTarget``, down
to a cubin (ptxas runs; no driver is needed). The interpreter must be off: run it without
TRITON_INTERPRET=1 (tests/test_triton_aot.py runs it in a subprocess). Exits non-zero, naming the variant,
if any variant fails or produces no cubin. Prints one line per variant with its compile time and the
registers and shared memory ptxas reports.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DTYPES = ("float32", "float64", "float16", "bfloat16")


def variants(archs):
    for arch in archs:
        for dtype in DTYPES:
            for flag in (False, True):
                yield ("norm", dtype, flag, arch)
                yield ("grad", dtype, flag, arch)


def compile_one(variant):
    kernel_name, dtype_name, flag, arch = variant
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter does not compile")
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from catalyst_fused.backends import triton_penalty as tp
    from catalyst_fused.reference import accumulation_dtype

    dtype = getattr(torch, dtype_name)
    acc = accumulation_dtype(dtype)
    tl_names = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}
    a = tl_names[acc]
    if kernel_name == "norm":
        fn = tp._norm_kernel
        pointers = {"table": "*i64", "ptrs": "*i64", "partials": f"*{a}", "counters": "*i32", "terms": f"*{a}",
                    "norms": f"*{a}", "ratios": f"*{a}", "penalty": f"*{a}"}
        constexprs = {"DTYPE": tp._TL_DTYPES[dtype], "ACC": tp._TL_DTYPES[acc], "CATALYST_GRAD": flag, "BLOCK": tp.BLOCK}
    else:
        fn = tp._grad_kernel
        pointers = {"table": "*i64", "ptrs": "*i64", "norms": f"*{a}", "grad_penalty": f"*{a}"}
        constexprs = {"DTYPE": tp._TL_DTYPES[dtype], "ACC": tp._TL_DTYPES[acc], "ACCUMULATE": flag, "BLOCK": tp.BLOCK,
                      "CATALYST_BLOCK": tp.CATALYST_BLOCK}
    signature = dict(pointers)
    signature["scale_bits"] = "i64"
    signature.update({k: "constexpr" for k in constexprs})
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # Pointers from the caching allocator are 16-byte aligned: what a launch would specialise on.
    attrs = {(fn.arg_names.index(k),): backend.parse_attr("D") for k in pointers}
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options={"num_warps": tp.NUM_WARPS})
    seconds = time.perf_counter() - start
    cubin = compiled.asm.get("cubin")
    if not cubin:
        raise RuntimeError("no cubin produced")
    meta = compiled.metadata
    return f"{kernel_name:>4} {dtype_name:>8} {'flag' if flag else 'plain':>5} sm_{arch}: {len(cubin):>7} B cubin, " \
           f"{getattr(meta, 'shared', '?')} B shared, {seconds:5.1f} s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", type=int, help="compute capability x 10 (default: 80 and 90)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    archs = args.arch or [80, 90]
    todo = list(variants(archs))
    import triton

    print(f"triton {triton.__version__}: {len(todo)} variants for sm_{', sm_'.join(map(str, archs))}", flush=True)
    start = time.perf_counter()
    failures = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [(v, pool.submit(compile_one, v)) for v in todo]
        for variant, future in futures:
            try:
                print(future.result(), flush=True)
            except Exception as error:  # report every failing variant, then fail
                failures.append(variant)
                print(f"FAILED {variant}: {type(error).__name__}: {error}", flush=True)
    print(f"{len(todo) - len(failures)}/{len(todo)} variants compiled in {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
