"""Overhead of the Catalyst penalty ``R = sum_i |d_i| ||W_i row||_2`` per training step.

Times every provider (eager loop, foreach, torch.compile, the C++ operators, ...) on whole-network weight
sets, in two modes, next to a memory-bandwidth floor measured in the same run:

* ``forward``: compute ``R`` with autograd enabled (the graph is built as in a training step, then
  dropped without a backward);
* ``full``: forward + backward; every ``.grad`` is set to None before each repetition (outside the
  timer), as ``optimizer.zero_grad(set_to_none=True)`` does, so backward allocates fresh gradients.
  ``cpp_inplace`` (``cf.penalty_``) *is* the fused forward+backward: it only has this mode.
  ``--grads zeros`` instead keeps every ``.grad`` and zeroes it in place outside the timer
  (``zero_grad(set_to_none=False)``, or a penalty added after ``loss.backward()`` created the gradients).
* floor: ``read`` = one read pass over a flat buffer of the weight set's size (``flat.sum()``),
  ``rmw`` = one read-modify-write pass over a gradient-sized buffer (``grad.add_(flat)``);
  floor(forward) = read, floor(full) = read + rmw.

Entries are timed in interleaved rounds (every provider runs a slice of its repetitions in each round),
so slow drifts of a shared machine hit all of them alike. Each repetition is timed on its own
(``time.perf_counter_ns``; CUDA events after a synchronize on CUDA); medians and 20th/80th percentiles
are reported. A provider whose warm-up shows it would take longer than ``--max-seconds`` for ``--reps``
repetitions gets fewer (at least ``--min-reps``); the ``reps`` column says how many were timed.

    python benchmarks/overhead.py                     # everything, appended to benchmarks/results/overhead.csv
    python benchmarks/overhead.py --quick --no-save   # CI smoke run
    python benchmarks/overhead.py --weight-sets resnet50 --providers eager,compile,cpp --modes full

Adding a provider is one entry in ``PROVIDERS`` (``api_provider("name")`` for a new ``cf.penalty``
backend, ``inplace_provider("name")`` for its ``cf.penalty_``).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import math
import os
import pathlib
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

try:
    import resource
except ImportError:  # not on Windows
    resource = None
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
# `python benchmarks/overhead.py` from a checkout: use this checkout's catalyst_fused and weight_sets.
for _path in (str(HERE), str(REPO_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import catalyst_fused as cf  # noqa: E402
from weight_sets import WEIGHT_SETS, describe, load_weight_set  # noqa: E402

MODES = ("forward", "full")
DEFAULT_OUT = HERE / "results" / "overhead.csv"
QUICK_WEIGHT_SETS = ("resnet56", "transformer_mlp")

CSV_COLUMNS = [
    "date",
    "hostname",
    "cpu",
    "threads",
    "gpu",
    "device",
    "dtype",
    "python",
    "torch",
    "triton",
    "catalyst_fused",
    "git_rev",
    "weight_set",
    "n_tensors",
    "n_params",
    "n_rows",
    "provider",
    "mode",
    "grads",
    "reps",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "floor_ms",
    "speedup_vs_eager",
    "speedup_vs_compile",
    "ratio_vs_floor",
    "cold_compile_s",
    "peak_mem_mb",
    "page_faults",
    "other_cpu_pct",
]


# --------------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """Raised by a provider's setup when it cannot run here; the message is printed as the reason."""


@dataclass
class BenchInputs:
    """One weight set on the benchmark device, shared by every provider (and a per-set scratch cache)."""

    name: str
    weights: list[torch.Tensor]
    catalysts: list[torch.Tensor]
    cache: dict = field(default_factory=dict)

    @property
    def params(self) -> list[torch.Tensor]:
        return [*self.weights, *self.catalysts]


Step = Callable[[], None]


@dataclass(frozen=True)
class Provider:
    """``setup(inputs, mode)`` returns the callable timed once per repetition (or raises Unavailable).

    ``probe(device, dtype)`` (optional) is run once per benchmark run on a tiny input; an exception there
    skips the provider everywhere with its message as the reason. ``in_quick``: run by ``--quick`` when
    ``--providers`` is not given.
    """

    setup: Callable[[BenchInputs, str], Step]
    description: str
    modes: tuple[str, ...] = MODES
    probe: Optional[Callable[[torch.device, torch.dtype], None]] = None
    in_quick: bool = True


def autograd_step(penalty_fn: Callable[[list, list], torch.Tensor], inputs: BenchInputs, mode: str) -> Step:
    """forward: build the graph and drop it; full: forward + ``backward()``."""
    weights, catalysts = inputs.weights, inputs.catalysts
    if mode == "forward":

        def step() -> None:
            penalty_fn(weights, catalysts)

    else:

        def step() -> None:
            penalty_fn(weights, catalysts).backward()

    return step


def autograd_provider(penalty_fn, description: str, **kwargs) -> Provider:
    return Provider(lambda inputs, mode: autograd_step(penalty_fn, inputs, mode), description, **kwargs)


def _tiny_probe_inputs(device, dtype):
    w = torch.randn(3, 4, device=device, dtype=dtype, requires_grad=True)
    d = torch.ones(3, device=device, dtype=dtype, requires_grad=True)
    return [w], [d]


def _describe_error(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def _check_backend_name(backend: str) -> None:
    if backend not in cf.BACKENDS:
        raise Unavailable(f"catalyst_fused has no backend {backend!r} (it has {', '.join(cf.BACKENDS)})")


def api_provider(backend: str) -> Provider:
    """``cf.penalty(weights, catalysts, backend=backend)`` under autograd."""

    def penalty_fn(weights, catalysts):
        return cf.penalty(weights, catalysts, backend=backend)

    def probe(device, dtype):
        _check_backend_name(backend)
        weights, catalysts = _tiny_probe_inputs(device, dtype)
        penalty_fn(weights, catalysts).backward()

    return autograd_provider(penalty_fn, f"cf.penalty(backend={backend!r}) + autograd", probe=probe)


def inplace_provider(backend: str) -> Provider:
    """``cf.penalty_(..., scale=1.0, backend=backend)``: value and gradients in one call, no graph."""

    def setup(inputs: BenchInputs, mode: str) -> Step:
        weights, catalysts = inputs.weights, inputs.catalysts

        def step() -> None:
            cf.penalty_(weights, catalysts, scale=1.0, backend=backend)

        return step

    def probe(device, dtype):
        _check_backend_name(backend)
        cf.penalty_(*_tiny_probe_inputs(device, dtype), scale=1.0, backend=backend)

    return Provider(setup, f"cf.penalty_(backend={backend!r}) into .grad", modes=("full",), probe=probe)


def foreach_penalty(weights: Sequence[torch.Tensor], catalysts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One ``torch._foreach_norm`` over a view of every row of every weight, then ``sum |d| * n``."""
    rows: list[torch.Tensor] = []
    for w in weights:
        rows.extend(w.reshape(w.shape[0], -1).unbind(0))
    norms = torch.stack(torch._foreach_norm(rows))
    return (torch.cat(list(catalysts)).abs() * norms).sum()


def compile_setup(inputs: BenchInputs, mode: str) -> Step:
    """``torch.compile(fullgraph=True)`` of the eager loop, compiled once per weight set (shared by both
    modes) from a reset Dynamo; the cold first forward and first backward are timed here."""
    state = inputs.cache.get("compile")
    if isinstance(state, Unavailable):  # failed for the other mode already
        raise state
    if state is None:
        try:
            torch._dynamo.reset()
            compiled = torch.compile(cf.reference.eager_penalty, fullgraph=True, dynamic=False)
            sync = _synchronizer(inputs.weights[0].device)
            t0 = time.perf_counter()
            value = compiled(inputs.weights, inputs.catalysts)
            sync()
            t1 = time.perf_counter()
            value.backward()
            sync()
            t2 = time.perf_counter()
        except Exception as error:  # no C++ compiler, no Triton for this GPU, ...
            failure = inputs.cache["compile"] = Unavailable(f"torch.compile failed: {_describe_error(error)}")
            raise failure from error
        for p in inputs.params:
            p.grad = None
        state = inputs.cache["compile"] = {"fn": compiled, "cold": {"forward": t1 - t0, "full": t2 - t0}}
    step = autograd_step(state["fn"], inputs, mode)
    step.cold_compile_s = state["cold"][mode]  # type: ignore[attr-defined]
    return step


# name -> Provider. A new backend of cf.penalty / cf.penalty_ is one line: "name": api_provider("name").
PROVIDERS: dict[str, Provider] = {
    "eager": autograd_provider(cf.reference.eager_penalty, "per-layer loop (cf.reference.eager_penalty) + autograd"),
    "foreach": autograd_provider(foreach_penalty, "torch._foreach_norm over all row views + autograd"),
    "compile": Provider(compile_setup, "torch.compile(fullgraph=True) of the eager loop", in_quick=False),
    "cpp": api_provider("cpp"),
    "cpp_inplace": inplace_provider("cpp"),
    "triton": api_provider("triton"),
    "triton_inplace": inplace_provider("triton"),
}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class Timer:
    """Times one call in milliseconds: perf_counter_ns on the CPU, CUDA events on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Step) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            return float(self.start.elapsed_time(self.end))
        t0 = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - t0) / 1e6


@dataclass
class Entry:
    """One timed thing: a (provider, mode) pair or a floor pass."""

    provider: str
    mode: str
    step: Step
    reset: Callable[[], None]
    times: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)
    reps: int = 0
    cold_compile_s: Optional[float] = None
    peak_mem_mb: Optional[float] = None


def _no_reset() -> None:
    pass


def _minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh memory; 0 where unknown)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def warm_up(entry: Entry, timer: Timer, args, device: torch.device) -> float:
    """Runs up to ``args.warmup`` untimed repetitions (fewer once they pass ``args.max_seconds``, at least
    one) and returns the estimated time of one repetition in ms."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    seen: list[float] = []
    for _ in range(max(1, args.warmup)):
        entry.reset()
        seen.append(timer(entry.step))
        if sum(seen) / 1e3 > args.max_seconds:
            break
    if cuda:
        entry.peak_mem_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    later = seen[1:] or seen
    return float(np.median(later))


def run_entries(entries: list[Entry], timer: Timer, args, device: torch.device) -> None:
    """Warm-up every entry, pick its repetition count, then time them in interleaved rounds."""
    for entry in entries:
        estimate_ms = warm_up(entry, timer, args, device)
        affordable = int(args.max_seconds * 1e3 / max(estimate_ms, 1e-6))
        entry.reps = max(args.min_reps, min(args.reps, affordable))
    rounds = max(1, args.rounds)
    for r in range(rounds):
        gc.collect()
        gc.disable()
        try:
            for entry in entries:
                # this round's share of the entry's repetitions
                n = entry.reps * (r + 1) // rounds - entry.reps * r // rounds
                for _ in range(n):
                    entry.reset()
                    faults = _minor_faults()
                    entry.times.append(timer(entry.step))
                    entry.faults.append(_minor_faults() - faults)
        finally:
            gc.enable()


def stats(times: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in ms."""
    a = np.asarray(times, dtype=np.float64)
    return float(np.median(a)), float(np.percentile(a, 20)), float(np.percentile(a, 80))


# --------------------------------------------------------------------------------------------------
# Environment and output
# --------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(name)
    except PackageNotFoundError:
        return ""


def _git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return ""
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(device: torch.device, dtype: torch.dtype) -> dict:
    gpu = ""
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device if device.type == "cuda" else 0)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "catalyst_fused": cf.__version__,
        "git_rev": _git_rev(),
    }


def _busy_cpu_seconds() -> Optional[float]:
    """CPU seconds the whole machine has spent busy (incl. hypervisor steal), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...
    values = [int(v) for v in fields[1:9]]
    busy = sum(values) - values[3] - values[4]
    return busy / os.sysconf("SC_CLK_TCK")


class ContentionMeter:
    """Share of the machine's CPU time used by *other* processes while a weight set was timed
    (busy CPU time of the machine minus this process's, over wall time x CPU count). On a shared 2-core
    machine anything above a few percent makes multi-threaded timings unreliable."""

    def __init__(self) -> None:
        self.busy0 = _busy_cpu_seconds()
        own = os.times()
        self.own0 = own.user + own.system
        self.wall0 = time.perf_counter()

    def other_percent(self) -> Optional[float]:
        busy1 = _busy_cpu_seconds()
        if self.busy0 is None or busy1 is None:
            return None
        own = os.times()
        wall = time.perf_counter() - self.wall0
        others = (busy1 - self.busy0) - (own.user + own.system - self.own0)
        return max(0.0, 100.0 * others / (wall * (os.cpu_count() or 1)))


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def append_csv(path: pathlib.Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != CSV_COLUMNS:
            raise SystemExit(
                f"{path} has a different header than this script writes; pass --out with a new file "
                f"(expected columns: {','.join(CSV_COLUMNS)})"
            )
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------------


def bench_weight_set(name: str, providers: list[str], modes: list[str], args, device, dtype, info: dict) -> list[dict]:
    weights = load_weight_set(name, device=device, dtype=dtype)
    desc = describe(name, weights)
    catalysts = cf.init_catalysts(weights, c0=1.0)
    inputs = BenchInputs(name, weights, catalysts)
    print(f"\n== {desc} | {info['device']} {info['dtype']}, {info['threads']} threads", flush=True)

    def zero_grad() -> None:  # optimizer.zero_grad(set_to_none=True)
        for p in inputs.params:
            p.grad = None

    def zero_grad_in_place() -> None:  # optimizer.zero_grad(set_to_none=False)
        for p in inputs.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()

    reset_full = zero_grad if args.grads == "none" else zero_grad_in_place

    entries: list[Entry] = []
    for provider_name in providers:
        provider = PROVIDERS[provider_name]
        for mode in modes:
            if mode not in provider.modes:
                print(f"  skip {provider_name}/{mode}: only {'/'.join(provider.modes)} (it is the fused forward+backward)")
                continue
            try:
                step = provider.setup(inputs, mode)
            except Unavailable as error:
                print(f"  skip {provider_name}/{mode}: {error}")
                continue
            entry = Entry(provider_name, mode, step, reset_full if mode == "full" else _no_reset)
            entry.cold_compile_s = getattr(step, "cold_compile_s", None)
            entries.append(entry)
    zero_grad()

    # Memory floor over a flat buffer of the same size (values of the weights, gradient-sized target).
    flat = torch.cat([w.detach().reshape(-1) for w in weights])
    grad_buffer = torch.zeros_like(flat)
    floor_read = Entry("floor", "read", lambda: flat.sum(), _no_reset)
    floor_rmw = Entry("floor", "rmw", lambda: grad_buffer.add_(flat), _no_reset)
    entries += [floor_read, floor_rmw]

    meter = ContentionMeter()
    run_entries(entries, Timer(device), args, device)
    other_cpu = meter.other_percent()
    del flat, grad_buffer

    read, rmw = stats(floor_read.times), stats(floor_rmw.times)
    floors = {"forward": read, "full": tuple(a + b for a, b in zip(read, rmw))}
    by_key = {(e.provider, e.mode): e for e in entries}

    rows: list[dict] = []
    for mode in modes:
        floor = floors[mode]
        eager = by_key.get(("eager", mode))
        compiled = by_key.get(("compile", mode))
        eager_ms = stats(eager.times)[0] if eager else None
        compile_ms = stats(compiled.times)[0] if compiled else None
        floor_faults = np.median(floor_read.faults) + (np.median(floor_rmw.faults) if mode == "full" else 0)
        floor_reps = min(floor_read.reps, floor_rmw.reps) if mode == "full" else floor_read.reps
        mode_rows = [("floor", floor, floor_reps, None, None, floor_faults)]
        for e in entries:
            if e.provider != "floor" and e.mode == mode:
                mode_rows.append((e.provider, stats(e.times), e.reps, e.cold_compile_s, e.peak_mem_mb, np.median(e.faults)))
        for provider_name, (median, p20, p80), reps, cold, peak, faults in mode_rows:
            rows.append(
                {
                    **info,
                    "weight_set": name,
                    "n_tensors": desc.n_tensors,
                    "n_params": desc.n_params,
                    "n_rows": desc.n_rows,
                    "provider": provider_name,
                    "mode": mode,
                    "grads": args.grads if mode == "full" else "",
                    "reps": reps,
                    "median_ms": f"{median:.6g}",
                    "p20_ms": f"{p20:.6g}",
                    "p80_ms": f"{p80:.6g}",
                    "floor_ms": f"{floor[0]:.6g}",
                    "speedup_vs_eager": _fmt(_ratio(eager_ms, median), ".4g"),
                    "speedup_vs_compile": _fmt(_ratio(compile_ms, median), ".4g"),
                    "ratio_vs_floor": _fmt(_ratio(median, floor[0]), ".4g"),
                    "cold_compile_s": _fmt(cold, ".3f"),
                    "peak_mem_mb": _fmt(peak, ".1f"),
                    "page_faults": _fmt(faults if resource is not None else None, ".0f"),
                    "other_cpu_pct": _fmt(other_cpu, ".1f"),
                }
            )
    print_table(rows)
    if other_cpu is not None:
        warn = "  (timings unreliable: the machine was shared)" if other_cpu > 5 else ""
        print(f"  other processes used {other_cpu:.1f}% of the machine's CPU time while this set was timed{warn}")
    return rows


def _ratio_text(row: dict, key: str) -> str:
    return f"{float(row[key]):.2f}x" if row[key] != "" else "-"


def print_table(rows: list[dict]) -> None:
    header = (
        f"  {'mode':<8} {'provider':<12} {'median ms':>10} {'p20 ms':>10} {'p80 ms':>10} {'reps':>5} "
        f"{'vs eager':>9} {'vs compile':>10} {'vs floor':>9} {'cold s':>7} {'faults':>7}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for row in rows:
        print(
            f"  {row['mode']:<8} {row['provider']:<12} {float(row['median_ms']):>10.3f} {float(row['p20_ms']):>10.3f} "
            f"{float(row['p80_ms']):>10.3f} {row['reps']:>5} {_ratio_text(row, 'speedup_vs_eager'):>9} {_ratio_text(row, 'speedup_vs_compile'):>10} "
            f"{_ratio_text(row, 'ratio_vs_floor'):>9} {row['cold_compile_s'] or '-':>7} {row['page_faults'] or '-':>7}"
        )
    sys.stdout.flush()


def print_summary(rows: list[dict], provider: str = "cpp", mode: str = "full") -> None:
    picked = [r for r in rows if r["provider"] == provider and r["mode"] == mode]
    if not picked:
        return
    print(f"\nSummary, {provider} in {mode} mode (speedup = other / {provider}; vs floor = {provider} / floor):")
    for r in picked:
        print(
            f"  {r['weight_set']:<16} {float(r['median_ms']):9.3f} ms   vs eager {_ratio_text(r, 'speedup_vs_eager'):>7}   "
            f"vs compile {_ratio_text(r, 'speedup_vs_compile'):>7}   vs floor {_ratio_text(r, 'ratio_vs_floor'):>7}"
        )


def _split_list(text: str, choices: Sequence[str], what: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise SystemExit(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from: {', '.join(choices)}")
    return list(dict.fromkeys(names))


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight-sets", help=f"comma-separated, from {','.join(WEIGHT_SETS)} (default: all; --quick: {','.join(QUICK_WEIGHT_SETS)})")
    parser.add_argument("--providers", help=f"comma-separated, from {','.join(PROVIDERS)} (default: all; --quick: all but compile)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from forward,full (default: both)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--reps", type=int, help="timed repetitions per provider and mode (default 100; --quick 10)")
    parser.add_argument("--warmup", type=int, help="untimed repetitions first (default 10; --quick 2)")
    parser.add_argument("--min-reps", type=int, help="repetitions timed however slow a provider is (default 5; --quick 2)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        help="time budget per provider and mode; slower providers get fewer reps, down to --min-reps (default 2; --quick 0.25)",
    )
    parser.add_argument(
        "--grads",
        default="none",
        choices=["none", "zeros"],
        help="full mode: .grad set to None before each rep (default) or kept and zeroed in place",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds the repetitions are split into (default 5)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--quick", action="store_true", help="CI mode: few reps, resnet56 + transformer_mlp, no compile unless asked")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"CSV to append to (default {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    parser.add_argument("--no-save", action="store_true", help="print only, write no CSV")
    args = parser.parse_args(argv)

    defaults = {"reps": (100, 10), "warmup": (10, 2), "min_reps": (5, 2), "max_seconds": (2.0, 0.25)}
    for key, (full_value, quick_value) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick_value if args.quick else full_value)
    if args.reps < 1 or args.min_reps < 1 or args.warmup < 0:
        parser.error("--reps and --min-reps must be >= 1, --warmup >= 0")
    args.min_reps = min(args.min_reps, args.reps)

    if args.weight_sets:
        args.weight_sets = _split_list(args.weight_sets, list(WEIGHT_SETS), "weight set")
    else:
        args.weight_sets = list(QUICK_WEIGHT_SETS if args.quick else WEIGHT_SETS)
    if args.providers:
        args.providers = _split_list(args.providers, list(PROVIDERS), "provider")
    else:
        args.providers = [n for n, p in PROVIDERS.items() if p.in_quick or not args.quick]
    args.modes = _split_list(args.modes, MODES, "mode")
    return args


def available_providers(names: list[str], device: torch.device, dtype: torch.dtype) -> list[str]:
    """Runs each provider's probe; prints why a provider is skipped."""
    kept = []
    for name in names:
        provider = PROVIDERS[name]
        if provider.probe is not None:
            try:
                provider.probe(device, dtype)
            except Exception as error:
                print(f"skip provider {name}: unavailable here ({_describe_error(error)})")
                continue
        kept.append(name)
    return kept


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    info = machine_info(device, dtype)
    print(
        f"catalyst penalty overhead | {info['date']} | {info['hostname']} | {info['cpu']} | "
        f"{info['threads']} threads | gpu: {info['gpu'] or '-'} | python {info['python']} torch {info['torch']} "
        f"triton {info['triton'] or '-'} | git {info['git_rev'] or '-'}"
    )
    print(
        f"reps {args.reps} (min {args.min_reps}, budget {args.max_seconds:g} s per provider and mode), "
        f"warmup {args.warmup}, rounds {args.rounds}, full-mode grads: {args.grads}"
    )
    for name in args.providers:
        print(f"  {name:<12} {PROVIDERS[name].description}")

    providers = available_providers(args.providers, device, dtype)

    # "cold" compile times mean a fresh Inductor/Triton cache, not one left by an earlier run.
    compile_cache = None
    if "compile" in providers and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        compile_cache = tempfile.mkdtemp(prefix="overhead_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(compile_cache, "triton"))

    rows: list[dict] = []
    started = time.perf_counter()
    try:
        for name in args.weight_sets:
            rows += bench_weight_set(name, providers, args.modes, args, device, dtype, info)
    finally:
        if compile_cache is not None:
            shutil.rmtree(compile_cache, ignore_errors=True)
    print_summary(rows)
    print(f"\ntotal time {time.perf_counter() - started:.1f} s")
    if not args.no_save:
        out = pathlib.Path(args.out)
        append_csv(out, rows)
        print(f"appended {len(rows)} rows to {out}")
    return rows


if __name__ == "__main__":
    main()
