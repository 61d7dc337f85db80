"""Benchmark of LATS's per-step update: ``w = sign(theta) * max(|theta| - t, 0)`` for every weight of a model,
plus the zero count, by provider:

* ``eager``: the per-tensor loop a user writes (``catalyst_fused.reference_sparsity.eager_soft_threshold_``:
  ``sign * clamp`` into ``w`` and a ``(w == 0).sum()`` per tensor);
* ``compile``: ``torch.compile(fullgraph=True)`` of that loop (its cold compile time is reported);
* ``cpp``: ``cf.soft_threshold_(..., backend="cpp")``, one fused call (CUDA C++ for CUDA tensors);
* ``triton``: ``cf.soft_threshold_(..., backend="triton")`` (CUDA only; the CPU interpreter is not timed);
* ``floor``: one read pass over ``theta`` and one write pass over ``w`` (``w.copy_(theta)`` over flat
  buffers of the same size): the memory traffic the update cannot avoid.

    python benchmarks/soft_threshold.py                          # resnet56, resnet50, vgg19_bn, transformer_mlp
    python benchmarks/soft_threshold.py --weight-sets resnet56 --threads 1 --device cuda

Repetitions of every provider are interleaved in rounds (a shared machine's drifts hit all alike); medians
with 20th/80th percentiles are printed and appended, with machine, versions, git revision, date and the CPU
share other processes used meanwhile, to ``benchmarks/results/soft_threshold.csv``. Thresholds are the
per-tensor values giving 90% sparsity, so the count and both branches are exercised.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import pathlib
import platform
import socket
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout: this checkout's package
    sys.path.insert(0, str(HERE.parent))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import catalyst_fused as cf  # noqa: E402
from catalyst_fused.reference_sparsity import eager_soft_threshold_  # noqa: E402
from weight_sets import WEIGHT_SETS, load_weight_set  # noqa: E402

PROVIDERS = ("eager", "compile", "cpp", "triton")
DEFAULT_OUT = HERE / "results" / "soft_threshold.csv"
COLUMNS = ["date", "hostname", "cpu", "threads", "device", "dtype", "torch", "git_rev", "weight_set", "n_tensors",
           "n_params", "provider", "reps", "median_ms", "p20_ms", "p80_ms", "floor_ms", "speedup_vs_eager",
           "speedup_vs_compile", "ratio_vs_floor", "cold_compile_s", "other_cpu_pct"]


def _thresholds(thetas: Sequence[torch.Tensor], sparsity: float = 0.9) -> list[float]:
    return [float(t.detach().abs().flatten().float().cpu().kthvalue(max(1, int(sparsity * t.numel()))).values)
            for t in thetas]


def setup(provider: str, thetas, weights, thresholds, device) -> tuple[Callable[[], object], Optional[float]]:
    """The callable timed once per repetition, and the cold compile time (compile only)."""
    if provider == "eager":
        return (lambda: eager_soft_threshold_(weights, thetas, thresholds)), None
    if provider == "compile":
        fn = torch.compile(eager_soft_threshold_, fullgraph=True)
        t0 = time.perf_counter()
        fn(weights, thetas, thresholds)
        _sync(device)
        return (lambda: fn(weights, thetas, thresholds)), time.perf_counter() - t0
    if provider in ("cpp", "triton"):
        if provider == "triton" and device.type != "cuda":
            raise RuntimeError("the Triton backend is timed on CUDA only (the CPU interpreter is ~10^4x slower)")
        return (lambda: cf.soft_threshold_(weights, thresholds, sources=thetas, backend=provider)), None
    raise ValueError(f"unknown provider {provider!r}")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter_ns()
    fn()
    _sync(device)
    return (time.perf_counter_ns() - t0) / 1e6


def run(entries: dict, device, reps: int, rounds: int, max_seconds: float) -> dict:
    """Warms every entry up, fits its repetitions into ``max_seconds``, then times them interleaved."""
    counts = {}
    for name, fn in entries.items():
        seen = [_time(fn, device) for _ in range(3)]
        counts[name] = max(5, min(reps, int(max_seconds * 1e3 / max(np.median(seen[1:]), 1e-6))))
    times: dict = {name: [] for name in entries}
    for r in range(rounds):
        gc.collect()
        gc.disable()
        try:
            for name, fn in entries.items():
                n = counts[name] * (r + 1) // rounds - counts[name] * r // rounds
                times[name] += [_time(fn, device) for _ in range(n)]
        finally:
            gc.enable()
    return times


def _busy_seconds() -> Optional[float]:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    values = [int(v) for v in fields[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def _git_rev() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE.parent,
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def bench(name: str, providers: Sequence[str], args, device, dtype) -> list[dict]:
    thetas = [t.detach().contiguous() for t in load_weight_set(name, device=device, dtype=dtype)]
    weights = [torch.empty_like(t) for t in thetas]
    thresholds = _thresholds(thetas)
    n = sum(t.numel() for t in thetas)
    src, dst = torch.empty(n, device=device, dtype=dtype).normal_(), torch.empty(n, device=device, dtype=dtype)
    entries = {"floor": lambda: dst.copy_(src)}
    cold = {}
    for p in providers:
        try:
            entries[p], cold[p] = setup(p, thetas, weights, thresholds, device)
        except Exception as error:  # a provider that cannot run here is reported, not fatal
            print(f"  {name}: {p} skipped: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
    busy0, own0, wall0 = _busy_seconds(), sum(os.times()[:2]), time.perf_counter()
    times = run(entries, device, args.reps, args.rounds, args.max_seconds)
    other = None
    if busy0 is not None:
        wall = time.perf_counter() - wall0
        other = max(0.0, 100 * ((_busy_seconds() - busy0) - (sum(os.times()[:2]) - own0)) / (wall * (os.cpu_count() or 1)))
    med = {k: float(np.median(v)) for k, v in times.items()}
    base = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "hostname": socket.gethostname(),
            "cpu": _cpu(), "threads": torch.get_num_threads(), "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, "git_rev": _git_rev(),
            "weight_set": name, "n_tensors": len(thetas), "n_params": n, "other_cpu_pct": None if other is None else round(other, 1)}
    rows = []
    for p, ts in times.items():
        if p == "floor":
            continue
        rows.append({**base, "provider": p, "reps": len(ts), "median_ms": med[p], "p20_ms": float(np.percentile(ts, 20)),
                     "p80_ms": float(np.percentile(ts, 80)), "floor_ms": med["floor"],
                     "speedup_vs_eager": med["eager"] / med[p] if "eager" in med else None,
                     "speedup_vs_compile": med["compile"] / med[p] if "compile" in med else None,
                     "ratio_vs_floor": med[p] / med["floor"], "cold_compile_s": cold.get(p)})
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weight-sets", default="resnet56,resnet50,vgg19_bn,transformer_mlp",
                        help="comma-separated: " + ", ".join(WEIGHT_SETS))
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated: " + ", ".join(PROVIDERS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=3.0, help="time budget per provider and weight set")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="CSV to append to ('' for none)")
    args = parser.parse_args(argv)
    sets = [s.strip() for s in args.weight_sets.split(",") if s.strip()]
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    for what, names, allowed in (("--weight-sets", sets, WEIGHT_SETS), ("--providers", providers, PROVIDERS)):
        bad = [v for v in names if v not in allowed]
        if bad:
            parser.error(f"{what}: unknown {bad}; choose from {', '.join(allowed)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for name in sets:
        got = bench(name, providers, args, device, dtype)
        rows += got
        floor = got[0]["floor_ms"] if got else float("nan")
        print(f"{name} ({got[0]['n_tensors'] if got else '?'} tensors, {got[0]['n_params'] if got else '?'} params, "
              f"{torch.get_num_threads()} threads, floor {floor:.3f} ms, other processes {got[0]['other_cpu_pct'] if got else '?'}% CPU)")
        for r in got:
            extra = "".join(f", {v:.2f}x {k.split('_')[-1]}" for k, v in r.items()
                            if k.startswith("speedup_vs") and v is not None and not k.endswith(r["provider"]))
            print(f"  {r['provider']:>8}: {r['median_ms']:.3f} ms (p20 {r['p20_ms']:.3f}, p80 {r['p80_ms']:.3f}; "
                  f"{r['ratio_vs_floor']:.2f}x floor{extra})")
    if args.out and rows:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        new = not out.exists()
        with open(out, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
