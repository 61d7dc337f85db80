"""What unstructured sparsity buys at inference on this machine: a linear layer's product with its weight
stored dense, as ``torch.sparse`` CSR, and as 2:4 semi-structured sparsity where torch supports it.

    python benchmarks/sparse_inference.py                     # [3072, 768] weight (a transformer MLP), 128 tokens
    python benchmarks/sparse_inference.py --out-features 512 --in-features 512 --tokens 64 --threads 1

For every sparsity (unstructured: the smallest magnitudes zeroed) it times ``x @ W.T`` with

* ``dense``: ``torch.nn.functional.linear`` on the masked dense weight (what a pruned model runs: the zeros are
  multiplied like any other value, so the time does not depend on the sparsity);
* ``csr``: ``torch.sparse.mm(W_csr, x.T)`` with ``W`` in compressed sparse row format (``to_sparse_csr``);
* ``semi_structured_2_4``: ``torch.sparse.to_sparse_semi_structured`` (2 zeros in every 4 weights, a pattern
  magnitude pruning then enforces); it is only implemented for CUDA tensors, so on a CPU the script records
  why it cannot run.

and the storage of the weight (dense bytes against CSR values + column indices + row pointers). Medians over
interleaved repetitions; results are printed and appended, with machine, versions and date, to
``benchmarks/results/sparse_inference.csv``. Convolutions have no sparse kernel in torch on the CPU at all.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import pathlib
import platform
import socket
import time

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "sparse_inference.csv"
COLUMNS = ["date", "hostname", "cpu", "threads", "torch", "out_features", "in_features", "tokens", "sparsity", "kernel",
           "median_ms", "p20_ms", "p80_ms", "speedup_vs_dense", "weight_bytes", "max_abs_error", "note"]


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(round(sparsity * w.numel()))
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    return w.abs() > w.abs().flatten().kthvalue(k).values


def two_four_mask(w: torch.Tensor) -> torch.Tensor:
    """Keeps the 2 largest magnitudes of every 4 consecutive weights of a row."""
    groups = w.abs().reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(2, dim=1).indices, True)
    return keep.reshape(w.shape)


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def measure(out_f: int, in_f: int, tokens: int, sparsities, reps: int, rounds: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5
    x = torch.randn(tokens, in_f, generator=gen)
    xt = x.t().contiguous()
    base = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "hostname": socket.gethostname(),
            "cpu": _cpu(), "threads": torch.get_num_threads(), "torch": torch.__version__, "out_features": out_f,
            "in_features": in_f, "tokens": tokens}
    rows = []
    for s in sparsities:
        w = w0 * magnitude_mask(w0, s)
        expected = torch.nn.functional.linear(x, w)
        csr = w.to_sparse_csr()
        entries = {"dense": lambda w=w: torch.nn.functional.linear(x, w),
                   "csr": lambda csr=csr: torch.sparse.mm(csr, xt)}
        errors = {"dense": 0.0, "csr": float((torch.sparse.mm(csr, xt).t() - expected).abs().max())}
        sizes = {"dense": w.numel() * w.element_size(),
                 "csr": sum(t.numel() * t.element_size() for t in (csr.values(), csr.col_indices(), csr.crow_indices()))}
        times = {k: [] for k in entries}
        for fn in entries.values():
            _time(fn, 3)  # warm-up
        for _ in range(rounds):
            for k, fn in entries.items():
                times[k] += _time(fn, max(1, reps // rounds))
        dense_ms = float(np.median(times["dense"]))
        for k, ts in times.items():
            med = float(np.median(ts))
            rows.append({**base, "sparsity": s, "kernel": k, "median_ms": med, "p20_ms": float(np.percentile(ts, 20)),
                         "p80_ms": float(np.percentile(ts, 80)), "speedup_vs_dense": dense_ms / med,
                         "weight_bytes": sizes[k], "max_abs_error": errors[k], "note": ""})
    # 2:4 semi-structured (50% sparsity in a fixed pattern)
    try:
        from torch.sparse import to_sparse_semi_structured

        w24 = (w0 * two_four_mask(w0)).half()
        to_sparse_semi_structured(w24)
        note = "converted"  # pragma: no cover - not reached on a CPU
    except Exception as error:  # what a user gets on this machine
        note = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    rows.append({**base, "sparsity": 0.5, "kernel": "semi_structured_2_4", "median_ms": None, "p20_ms": None,
                 "p80_ms": None, "speedup_vs_dense": None, "weight_bytes": None, "max_abs_error": None, "note": note})
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-features", type=int, default=3072)
    parser.add_argument("--in-features", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--sparsities", default="0,0.5,0.7,0.8,0.9,0.95,0.99")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="CSV to append to ('' for none)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if any(not 0 <= s < 1 for s in sparsities):
        parser.error(f"--sparsities: every value must be in [0, 1), got {sparsities}")
    rows = measure(args.out_features, args.in_features, args.tokens, sparsities, args.reps, args.rounds)
    print(f"x[{args.tokens}, {args.in_features}] @ W[{args.out_features}, {args.in_features}].T, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for r in rows:
        if r["median_ms"] is None:
            print(f"  2:4 semi-structured: {r['note']}")
            continue
        print(f"  sparsity {r['sparsity']:.2f} {r['kernel']:>6}: {r['median_ms']:.3f} ms (p20 {r['p20_ms']:.3f}, p80 "
              f"{r['p80_ms']:.3f}), {r['speedup_vs_dense']:.2f}x dense, weight {r['weight_bytes'] / 2**20:.2f} MiB")
    if args.out:
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
