"""A small benchmark harness: providers, interleaved timing, a memory floor, CSV rows and tables.

It knows nothing about the Catalyst penalty; ``overhead.py`` supplies the providers and the weight sets.
What it does, for one *case* (a set of tensors) at a time:

* every (provider, mode) pair gets a callable from its :class:`Provider`'s ``setup(inputs, mode)`` and
  becomes an :class:`Entry`, next to the floor passes (``floor_entries``): over a flat buffer with as many
  elements as the case, ``read`` = one read pass (``flat.sum()``), ``rmw`` = one read-modify-write pass over
  a gradient-sized buffer (``grad.add_(flat)``);
* with ``args.cold`` (``--cold``), the last-level cache (the GPU's L2 on CUDA) is evicted before every timed
  repetition of every entry, the floor's included (:class:`CacheFlusher`: an untimed read-modify-write pass
  over a buffer of twice the cache's size), so that weights and gradients come from memory as in a training
  step whose forward and backward pass evicted them; without it, a set that fits in the cache is timed hot;
* entries are warmed up, given a repetition count that fits ``--max-seconds`` (at least ``--min-reps``), and
  timed in interleaved rounds (each entry runs a slice of its repetitions per round, so slow drifts of a
  shared machine hit all of them alike), each repetition on its own (``time.perf_counter_ns``; CUDA events
  after a synchronize on CUDA), with Python's GC off inside a round;
* results become CSV rows (:data:`CSV_COLUMNS`: machine, versions, git revision, date, median and 20th/80th
  percentiles, floor, ratios to the ``eager`` and ``compile`` providers and to the floor, page faults, and the
  CPU share other processes used meanwhile) and a printed table.

A provider is a few lines::

    def my_setup(inputs, mode):           # raise Unavailable("why") if it cannot run here
        return lambda: do_the_work(inputs)
    PROVIDERS["mine"] = Provider(my_setup, "what is timed", modes=("full",))
"""
from __future__ import annotations

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
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import numpy as np
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

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
    "cache",
]

Step = Callable[[], None]


class Unavailable(Exception):
    """Raised by a provider's setup when it cannot run here; the message is printed as the reason."""


@dataclass(frozen=True)
class Provider:
    """``setup(inputs, mode)`` returns the callable timed once per repetition (or raises Unavailable).

    ``probe(device, dtype)`` (optional) is run once per benchmark run on a tiny input; an exception there
    skips the provider everywhere with its message as the reason. ``in_quick``: run by ``--quick`` when
    ``--providers`` is not given. ``grads``: the gradient state this provider needs before each repetition
    of the ``full`` mode ("zeros": existing, zeroed gradients, whatever ``--grads`` says), or None.
    """

    setup: Callable[[Any, str], Step]
    description: str
    modes: tuple[str, ...] = ("forward", "full")
    probe: Optional[Callable[[torch.device, torch.dtype], None]] = None
    in_quick: bool = True
    grads: Optional[str] = None


def describe_error(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def synchronizer(device: torch.device) -> Callable[[], None]:
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
    grads: str = ""
    times: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)
    reps: int = 0
    cold_compile_s: Optional[float] = None
    peak_mem_mb: Optional[float] = None


def no_reset() -> None:
    pass


def minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh memory; 0 where unknown)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def warm_up(entry: Entry, timer: Timer, args, device: torch.device, flush: Optional[Callable[[], None]] = None) -> float:
    """Runs up to ``args.warmup`` untimed repetitions (fewer once they pass ``args.max_seconds``, at least
    one) and returns the estimated time of one repetition in ms."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    seen: list[float] = []
    for _ in range(max(1, args.warmup)):
        entry.reset()
        if flush is not None:
            flush()
        seen.append(timer(entry.step))
        if sum(seen) / 1e3 > args.max_seconds:
            break
    if cuda:
        entry.peak_mem_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    later = seen[1:] or seen
    return float(np.median(later))


class CacheFlusher:
    """Evicts the last-level cache (CPU) or the L2 (CUDA) between timed repetitions: an untimed
    read-modify-write pass over a buffer of twice the cache's size (ordinary stores, unlike a large
    ``fill_``/``memset``, which may bypass the cache with streaming stores)."""

    def __init__(self, device: torch.device) -> None:
        if device.type == "cuda":
            cache = torch.cuda.get_device_properties(device).L2_cache_size
        else:
            cache = last_level_cache_bytes()
        if not cache:
            raise SystemExit("--cold: the size of the last-level cache is unknown on this machine")
        self.cache_bytes = int(cache)
        self.buffer = torch.zeros(2 * self.cache_bytes // 4, dtype=torch.float32, device=device)
        self.sync = synchronizer(device)

    def __call__(self) -> None:
        self.buffer.add_(1.0)
        self.sync()


def run_entries(entries: list[Entry], timer: Timer, args, device: torch.device) -> None:
    """Warm-up every entry, pick its repetition count, then time them in interleaved rounds (with
    ``args.cold``, the cache evicted before every repetition, warm-up included)."""
    flush = CacheFlusher(device) if getattr(args, "cold", False) else None
    for entry in entries:
        estimate_ms = warm_up(entry, timer, args, device, flush)
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
                    if flush is not None:
                        flush()
                    faults = minor_faults()
                    entry.times.append(timer(entry.step))
                    entry.faults.append(minor_faults() - faults)
        finally:
            gc.enable()


def stats(times: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in ms."""
    a = np.asarray(times, dtype=np.float64)
    return float(np.median(a)), float(np.percentile(a, 20)), float(np.percentile(a, 80))


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes() -> Optional[int]:
    """Size of the CPU's largest cache (sysfs), or None where unknown."""
    best = None
    root = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")
    for index in root.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        value = int(text[:-1] if text[-1:] in "KMG" else text) * scale
        best = value if best is None else max(best, value)
    return best


def package_version(name: str) -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(name)
    except PackageNotFoundError:
        return ""


def git_rev() -> str:
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


def machine_info(device: torch.device, dtype: torch.dtype, package_version_string: str = "") -> dict:
    gpu = ""
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device if device.type == "cuda" else 0)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "catalyst_fused": package_version_string,
        "git_rev": git_rev(),
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
    """Share of the machine's CPU time used by *other* processes while a case was timed (busy CPU time of
    the machine minus this process's, over wall time x CPU count). On a shared 2-core machine anything
    above a few percent makes multi-threaded timings unreliable."""

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


# --------------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """What is timed: a name, its size (for the CSV) and the tensors whose gradients the ``full`` mode
    resets before each repetition."""

    name: str
    n_tensors: int
    n_params: int
    n_rows: int
    params: list = field(default_factory=list)
    floor_source: Optional[Sequence[torch.Tensor]] = None  # the floor buffer holds these values


# The floor of each mode: the passes over the case's elements it must make at least.
FLOORS = {"forward": ("read",), "full": ("read", "rmw")}


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def bench_case(case: Case, inputs, providers: dict, names: Sequence[str], modes: Sequence[str], args,
               device: torch.device, info: dict) -> list[dict]:
    """Times ``names`` (keys of ``providers``) in ``modes`` on ``inputs`` next to the floor; returns CSV rows."""

    def zero_grad() -> None:  # optimizer.zero_grad(set_to_none=True)
        for p in case.params:
            p.grad = None

    def zero_grad_in_place() -> None:  # optimizer.zero_grad(set_to_none=False)
        for p in case.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()

    resets = {"none": zero_grad, "zeros": zero_grad_in_place}
    entries: list[Entry] = []
    for provider_name in names:
        provider = providers[provider_name]
        for mode in modes:
            if mode not in provider.modes:
                print(f"  skip {provider_name}/{mode}: only {'/'.join(provider.modes)}")
                continue
            try:
                step = provider.setup(inputs, mode)
            except Unavailable as error:
                print(f"  skip {provider_name}/{mode}: {error}")
                continue
            grads = (provider.grads or args.grads) if mode == "full" else ""
            entry = Entry(provider_name, mode, step, resets[grads] if mode == "full" else no_reset, grads)
            entry.cold_compile_s = getattr(step, "cold_compile_s", None)
            entries.append(entry)
    zero_grad()

    # Memory floor over a flat buffer of the same size (the case's values, a gradient-sized target).
    source = case.floor_source if case.floor_source is not None else case.params
    flat = torch.cat([t.detach().reshape(-1) for t in source])
    grad_buffer = torch.zeros_like(flat)
    floor_read = Entry("floor", "read", lambda: flat.sum(), no_reset)
    floor_rmw = Entry("floor", "rmw", lambda: grad_buffer.add_(flat), no_reset)
    entries += [floor_read, floor_rmw]
    llc = last_level_cache_bytes()
    fits = llc is not None and device.type == "cpu" and 2 * flat.numel() * flat.element_size() <= llc
    cold_cache = bool(getattr(args, "cold", False))

    meter = ContentionMeter()
    run_entries(entries, Timer(device), args, device)
    other_cpu = meter.other_percent()
    del flat, grad_buffer

    passes = {"read": stats(floor_read.times), "rmw": stats(floor_rmw.times)}
    floors = {mode: tuple(sum(vals) for vals in zip(*(passes[p] for p in FLOORS[mode]))) for mode in modes}
    floor_faults = {
        mode: sum(float(np.median((floor_read if p == "read" else floor_rmw).faults)) for p in FLOORS[mode])
        for mode in modes
    }
    floor_reps = {mode: min((floor_read if p == "read" else floor_rmw).reps for p in FLOORS[mode]) for mode in modes}
    by_key = {(e.provider, e.mode): e for e in entries}

    rows: list[dict] = []
    for mode in modes:
        floor = floors[mode]
        eager = by_key.get(("eager", mode))
        compiled = by_key.get(("compile", mode))
        eager_ms = stats(eager.times)[0] if eager else None
        compile_ms = stats(compiled.times)[0] if compiled else None
        mode_rows = [("floor", floor, floor_reps[mode], None, None, floor_faults[mode], args.grads if mode == "full" else "")]
        for e in entries:
            if e.provider != "floor" and e.mode == mode:
                mode_rows.append(
                    (e.provider, stats(e.times), e.reps, e.cold_compile_s, e.peak_mem_mb, np.median(e.faults), e.grads)
                )
        for provider_name, (median, p20, p80), reps, cold, peak, faults, grads in mode_rows:
            rows.append(
                {
                    **info,
                    "weight_set": case.name,
                    "n_tensors": case.n_tensors,
                    "n_params": case.n_params,
                    "n_rows": case.n_rows,
                    "provider": provider_name,
                    "mode": mode,
                    "grads": grads,
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
                    "cache": "cold" if cold_cache else "hot",
                }
            )
    print_table(rows)
    if cold_cache:
        print("  cache: cold (the last-level cache was evicted before every repetition, the floor's included)")
    elif fits:
        print(
            f"  note: weights + gradient buffer ({2 * case.n_params * info_itemsize(info) / 2**20:.0f} MiB) fit in the "
            f"last-level cache ({llc / 2**20:.0f} MiB): the floor flatters (it is measured hot in cache)"
        )
    if other_cpu is not None:
        warn = "  (timings unreliable: the machine was shared)" if other_cpu > 5 else ""
        print(f"  other processes used {other_cpu:.1f}% of the machine's CPU time while this set was timed{warn}")
    return rows


def info_itemsize(info: dict) -> int:
    return torch.empty((), dtype=getattr(torch, info["dtype"])).element_size()


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


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


def _ratio_text(row: dict, key: str) -> str:
    return f"{float(row[key]):.2f}x" if row[key] != "" else "-"


def print_table(rows: list[dict]) -> None:
    header = (
        f"  {'mode':<8} {'provider':<14} {'grads':<6} {'median ms':>10} {'p20 ms':>10} {'p80 ms':>10} {'reps':>5} "
        f"{'vs eager':>9} {'vs compile':>10} {'vs floor':>9} {'cold s':>7} {'faults':>7}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for row in rows:
        print(
            f"  {row['mode']:<8} {row['provider']:<14} {row['grads'] or '-':<6} {float(row['median_ms']):>10.3f} "
            f"{float(row['p20_ms']):>10.3f} {float(row['p80_ms']):>10.3f} {row['reps']:>5} "
            f"{_ratio_text(row, 'speedup_vs_eager'):>9} {_ratio_text(row, 'speedup_vs_compile'):>10} "
            f"{_ratio_text(row, 'ratio_vs_floor'):>9} {row['cold_compile_s'] or '-':>7} {row['page_faults'] or '-':>7}"
        )
    sys.stdout.flush()


def print_summary(rows: list[dict], provider: str, mode: str = "full") -> None:
    picked = [r for r in rows if r["provider"] == provider and r["mode"] == mode]
    if not picked:
        return
    print(f"\nSummary, {provider} in {mode} mode (speedup = other / {provider}; vs floor = {provider} / floor):")
    for r in picked:
        print(
            f"  {r['weight_set']:<22} {float(r['median_ms']):9.3f} ms   vs eager {_ratio_text(r, 'speedup_vs_eager'):>7}   "
            f"vs compile {_ratio_text(r, 'speedup_vs_compile'):>7}   vs floor {_ratio_text(r, 'ratio_vs_floor'):>7}"
        )


def split_list(text: str, choices: Sequence[str], what: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise SystemExit(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from: {', '.join(choices)}")
    return list(dict.fromkeys(names))
