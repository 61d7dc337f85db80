"""Benchmark of LATS's per-step update: ``w = sign(theta) * max(|theta| - t, 0)`` for every weight of a model,
plus the zero count, by provider (timed by the generic harness, ``benchmarks/harness.py``):

* ``eager``: the per-tensor loop a user writes (``catalyst_fused.reference_sparsity.eager_soft_threshold_``:
  ``sign * clamp`` into ``w`` and a ``(w == 0).sum()`` per tensor);
* ``compile``: ``torch.compile(fullgraph=True)`` of that loop (its cold compile time is reported);
* ``cpp``: ``cf.soft_threshold_(..., backend="cpp")``, one fused call (CUDA C++ for CUDA tensors);
* ``triton``: ``cf.soft_threshold_(..., backend="triton")`` (CUDA only; the CPU interpreter is not timed).

    python benchmarks/soft_threshold.py                          # resnet56, resnet50, vgg19_bn, transformer_mlp
    python benchmarks/soft_threshold.py --weight-sets resnet56 --threads 1 --device cuda

The harness interleaves the providers' repetitions in rounds and appends medians with 20th/80th percentiles,
machine, versions, git revision, date and the CPU share other processes used meanwhile to
``benchmarks/results/soft_threshold.csv`` (mode ``update``). Its floor is one read pass over ``theta``: a lower
bound (the update also writes ``w``, so the best possible ratio to the floor is about 2). Thresholds are the
per-tensor values giving 90% sparsity, so the count and both branches are exercised.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

import torch

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout: this checkout's package
    sys.path.insert(0, str(HERE.parent))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import catalyst_fused as cf  # noqa: E402
from catalyst_fused.reference_sparsity import eager_soft_threshold_  # noqa: E402
from harness import (  # noqa: E402
    FLOORS, Case, Provider, Unavailable, append_csv, bench_case, machine_info, print_summary, split_list,
)
from weight_sets import WEIGHT_SETS, load_weight_set  # noqa: E402

DEFAULT_OUT = HERE / "results" / "soft_threshold.csv"
MODE = "update"
FLOORS.setdefault(MODE, ("read",))  # the harness's floor for this mode: one read pass over theta


class Inputs:
    """One weight set: the parameters ``theta``, the weights ``w`` written, per-tensor thresholds."""

    def __init__(self, thetas: list[torch.Tensor], sparsity: float = 0.9) -> None:
        self.thetas = thetas
        self.weights = [torch.empty_like(t) for t in thetas]
        self.thresholds = [float(t.abs().flatten().float().cpu().kthvalue(max(1, int(sparsity * t.numel()))).values)
                           for t in thetas]


def _eager(inputs: Inputs, mode: str):
    return lambda: eager_soft_threshold_(inputs.weights, inputs.thetas, inputs.thresholds)


def _compile(inputs: Inputs, mode: str):
    fn = torch.compile(eager_soft_threshold_, fullgraph=True)
    t0 = time.perf_counter()
    fn(inputs.weights, inputs.thetas, inputs.thresholds)
    if inputs.thetas[0].is_cuda:
        torch.cuda.synchronize()

    def step():
        return fn(inputs.weights, inputs.thetas, inputs.thresholds)

    step.cold_compile_s = time.perf_counter() - t0  # read by the harness
    return step


def _fused(backend: str):
    def setup(inputs: Inputs, mode: str):
        if backend == "cpp" and not cf.cpp_available():
            raise Unavailable("the compiled extension is not built")
        if backend == "triton" and not inputs.thetas[0].is_cuda:
            raise Unavailable("the Triton backend is timed on CUDA only (the CPU interpreter is ~10^4x slower)")
        return lambda: cf.soft_threshold_(inputs.weights, inputs.thresholds, sources=inputs.thetas, backend=backend)
    return setup


PROVIDERS = {
    "eager": Provider(_eager, "per-tensor loop: sign * clamp into w, (w == 0).sum() per tensor", modes=(MODE,)),
    "compile": Provider(_compile, "torch.compile(fullgraph=True) of the eager loop", modes=(MODE,)),
    "cpp": Provider(_fused("cpp"), "cf.soft_threshold_(backend='cpp'): one fused call", modes=(MODE,)),
    "triton": Provider(_fused("triton"), "cf.soft_threshold_(backend='triton'): one fused call", modes=(MODE,)),
}


def bench(name: str, providers: Sequence[str], args, device, dtype, info: dict) -> list[dict]:
    inputs = Inputs([t.detach().contiguous() for t in load_weight_set(name, device=device, dtype=dtype)])
    n = sum(t.numel() for t in inputs.thetas)
    print(f"\n== {name}: {len(inputs.thetas)} tensors, {n:,} params | {info['device']} {info['dtype']}, "
          f"{info['threads']} threads", flush=True)
    case = Case(name, len(inputs.thetas), n, 0, params=[], floor_source=inputs.thetas)
    return bench_case(case, inputs, PROVIDERS, providers, (MODE,), args, device, info)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weight-sets", default="resnet56,resnet50,vgg19_bn,transformer_mlp",
                        help="comma-separated: " + ", ".join(WEIGHT_SETS))
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated: " + ", ".join(PROVIDERS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reps", type=int, default=200, help="timed repetitions per provider (at most)")
    parser.add_argument("--min-reps", type=int, default=5, help="repetitions timed however slow a provider is")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=3.0, help="time budget per provider and weight set")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="CSV to append to ('' for none)")
    args = parser.parse_args(argv)
    args.grads = ""  # the update touches no gradient
    sets = split_list(args.weight_sets, list(WEIGHT_SETS), "weight set")
    providers = split_list(args.providers, list(PROVIDERS), "provider")
    if args.reps < 1 or args.min_reps < 1 or args.warmup < 0:
        parser.error("--reps and --min-reps must be >= 1, --warmup >= 0")
    args.min_reps = min(args.min_reps, args.reps)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    info = machine_info(device, dtype, cf.__version__)
    for name in providers:
        print(f"  {name:<8} {PROVIDERS[name].description}")
    # "cold" compile times mean a fresh Inductor cache, not one left by an earlier run
    cache = None
    if "compile" in providers and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        cache = tempfile.mkdtemp(prefix="soft_threshold_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    rows: list[dict] = []
    try:
        for name in sets:
            rows += bench(name, providers, args, device, dtype, info)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    print_summary(rows, "cpp", MODE)
    if args.out and rows:
        append_csv(pathlib.Path(args.out), rows)
        print(f"appended {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    main()
