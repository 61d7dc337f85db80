"""Latency of the dense and the pruned model where they are deployed: eager PyTorch, ``torch.compile`` and
onnxruntime on the CPU, per batch size and thread count, with the machine's load beside every figure.

    table = cf.pruning.compare_latency(dense, pruned, (1, 8, 8), batches=(1, 64), threads=(1, 2),
                                       flops_ratio=13.2)
    for row in table.rows: print(row.runtime, row.batch_size, row.threads, row.speedup, row.gain_per_flops_gain)

How each figure is taken (so that the dense / pruned ratio is fair on a shared, noisy machine):

* The two models are timed **interleaved**: sample ``r`` times dense then pruned (pruned then dense on odd
  ``r``), so a burst of load hits both alike. A sample is ``n`` back-to-back calls on the same input with
  ``n`` chosen in the warm-up so that a sample lasts about 5 ms (many calls for a tiny model at batch 1);
  the figure is the **median** per-call time over ``repeats`` samples, with the 20th and 80th percentiles.
* ``threads``: ``torch.set_num_threads`` for eager and compile (and Inductor's ``cpp.threads``: compiled
  kernels fix their OpenMP thread count when they are generated, so every thread count is compiled anew),
  ``intra_op_num_threads`` for onnxruntime.
* ``eager``: ``model(x)`` under ``torch.inference_mode()``. ``compile``: ``torch.compile(model,
  dynamic=False)`` (Inductor's defaults; one compilation per batch size, not timed). ``onnxruntime``: the
  model exported to ONNX (:func:`~catalyst_fused.pruning.export.export_model`, dynamic batch, checked against
  eager) and run by an ``InferenceSession`` with the CPU provider and default graph optimisations.
* Load: ``others_cpu_percent`` is the share of the machine's CPU time that *other* processes used while the
  row was measured (busy time from ``/proc/stat`` less this process's own); ``load_1min`` is the load
  average when the row started. On a 2-core machine any other busy process distorts 2-thread figures
  most: compare rows whose load is near 0.
* ``speedup = dense_ms / pruned_ms``; ``gain_per_flops_gain = speedup / flops_ratio``: 1.0 means the FLOPs
  reduction turned fully into speed, 0.25 that a quarter of it did.

A runtime that cannot run here (onnxruntime not installed, a compile failure) is listed in ``skipped`` with
the reason, and the others are still measured.
"""
from __future__ import annotations

import copy
import datetime
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .._validation import check_choices, comma_items

__all__ = ["RUNTIMES", "LatencyRow", "LatencyTable", "compare_latency", "parse_runtimes", "parse_threads",
           "CpuLoadMeter", "machine_info"]

RUNTIMES = ("eager", "compile", "onnxruntime")
_SAMPLE_S = 0.005  # aim of one timed sample (several calls for tiny models)


@dataclass
class LatencyRow:
    """Dense and pruned latency for one (runtime, batch size, thread count); times in milliseconds per call."""

    runtime: str
    batch_size: int
    threads: int
    dense_ms: float
    pruned_ms: float
    dense_p20_ms: float
    dense_p80_ms: float
    pruned_p20_ms: float
    pruned_p80_ms: float
    speedup: float  # dense_ms / pruned_ms
    gain_per_flops_gain: Optional[float]  # speedup / flops_ratio
    samples: int
    calls_per_sample: dict  # {"dense": n, "pruned": n}
    others_cpu_percent: Optional[float]  # other processes' share of the machine's CPU time during the row
    load_1min: Optional[float]  # load average when the row started


@dataclass
class LatencyTable:
    """What :func:`compare_latency` measured: the rows, what was skipped and why, and the machine."""

    rows: list = field(default_factory=list)  # LatencyRow
    flops_ratio: Optional[float] = None
    skipped: dict = field(default_factory=dict)  # runtime -> reason
    machine: dict = field(default_factory=dict)
    definition: str = ("per-call median over interleaved dense/pruned samples (p20/p80 beside it); speedup = dense_ms / "
                       "pruned_ms; gain_per_flops_gain = speedup / flops_ratio (1 = the FLOPs reduction fully became speed); "
                       "others_cpu_percent = other processes' share of the machine's CPU time while the row was measured")

    def row(self, runtime: str, batch_size: int, threads: int) -> Optional[LatencyRow]:
        return next((r for r in self.rows if (r.runtime, r.batch_size, r.threads) == (runtime, batch_size, threads)), None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["LatencyTable"]:
        if d is None:
            return None
        names = {f.name for f in fields(cls)}
        row_names = {f.name for f in fields(LatencyRow)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["rows"] = [LatencyRow(**{k: v for k, v in r.items() if k in row_names}) for r in d.get("rows", [])]
        return cls(**kw)


def parse_runtimes(text: Union[str, Sequence[str]], where: str = "--latency") -> tuple[str, ...]:
    """``"eager,compile,onnxruntime"`` -> a tuple (``eager`` is always measured and put first).

    Raises:
        ValueError: naming ``where`` for an unknown runtime.
    """
    items = comma_items(text)
    check_choices(items, RUNTIMES, where, "runtime", "; eager is always measured")
    return tuple(r for r in RUNTIMES if r == "eager" or r in items)


def parse_threads(text: Union[str, Sequence[int]], where: str = "--latency-threads") -> tuple[int, ...]:
    """``"1,2"`` -> ``(1, 2)``.

    Raises:
        ValueError: naming ``where`` for an empty list or a count that is not a positive integer.
    """
    items = comma_items(text)
    try:
        values = [int(s) for s in items]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values) or any(str(v) != str(s).strip() for v, s in zip(values, items)):
        raise ValueError(f"{where}: expected comma-separated positive integers, got {text!r}")
    return tuple(dict.fromkeys(values))


def _busy_cpu_seconds() -> Optional[float]:
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    if not parts or parts[0] != "cpu":
        return None
    values = [int(v) for v in parts[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


class CpuLoadMeter:
    """Other processes' share of the machine's CPU time since construction (percent of all cores); None
    where ``/proc/stat`` is not available."""

    def __init__(self) -> None:
        self.busy0 = _busy_cpu_seconds()
        own = os.times()
        self.own0, self.wall0 = own.user + own.system, time.perf_counter()
        self.load_1min = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    def others_percent(self) -> Optional[float]:
        busy1 = _busy_cpu_seconds()
        if self.busy0 is None or busy1 is None:
            return None
        own = os.times()
        wall = max(time.perf_counter() - self.wall0, 1e-9)
        others = (busy1 - self.busy0) - (own.user + own.system - self.own0)
        return max(0.0, 100.0 * others / (wall * (os.cpu_count() or 1)))


def cpu_model() -> str:
    """The CPU's name (``platform.processor()`` is empty on Linux; /proc/cpuinfo names it)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def machine_info() -> dict:
    """CPU model, core count, versions and the date, for the record beside latency figures."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def _percentile(sorted_values: list, q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _time_interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """``{name: sorted per-call ms}`` and ``{name: calls per sample}`` for callables timed in turn."""
    inner = {}
    for name, fn in fns.items():
        fn(), fn()  # warm-up (and compilation, for compiled models)
        t0 = time.perf_counter()
        fn()
        inner[name] = max(1, min(1000, int(_SAMPLE_S / max(time.perf_counter() - t0, 1e-7))))
    samples = {name: [] for name in fns}
    order = list(fns)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            fn, n = fns[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) * 1e3 / n)
    return {k: sorted(v) for k, v in samples.items()}, inner


def _torch_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return model(x)

    return run


def _prepare(runtime: str, models: dict, threads: int, workdir: Path, example: torch.Tensor, log) -> Callable:
    """``make(name, x) -> callable`` for ``runtime`` at ``threads`` (compiles / exports / opens sessions)."""
    torch.set_num_threads(threads)
    if runtime == "eager":
        return lambda name, x: _torch_runner(models[name], x)
    if runtime == "compile":
        torch._dynamo.reset()  # compiled kernels keep the thread count they were generated for
        compiled = {name: torch.compile(m, dynamic=False, options={"cpp.threads": threads}) for name, m in models.items()}
        return lambda name, x: _torch_runner(compiled[name], x)
    if runtime == "onnxruntime":
        import onnxruntime as ort

        sessions = {}
        for name in models:
            path = workdir / f"{name}.onnx"
            if not path.exists():
                from .export import export_model

                export_model(models[name], example, workdir / name, formats=("onnx",), strict=True)
                log(f"  latency: exported the {name} model to ONNX for onnxruntime")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        def make(name, x):
            session = sessions[name]
            feed = {session.get_inputs()[0].name: x.numpy()}
            return lambda: session.run(None, feed)

        return make
    raise ValueError(f"unknown runtime {runtime!r}")


def compare_latency(dense: nn.Module, pruned: nn.Module, sample_shape: Sequence[int], *,
                    batches: Sequence[int] = (1, 64), threads: Sequence[int] = (1, 2),
                    runtimes: Union[str, Sequence[str]] = RUNTIMES, repeats: int = 15, flops_ratio: Optional[float] = None,
                    seed: int = 0, log: Optional[Callable[[str], None]] = None) -> LatencyTable:
    """Times ``dense`` and ``pruned`` (CPU, fp32, eval mode) in every runtime x batch size x thread count; see
    the module docstring for the method. The models are not changed (copies are moved to the CPU); the thread
    count is restored afterwards, and with ``"compile"`` dynamo's caches are reset (``torch._dynamo.reset()``).

    Args:
        sample_shape: one input sample's shape, e.g. ``(3, 32, 32)``; inputs are seeded random normals.
        runtimes: names from :data:`RUNTIMES` (or ``"eager,compile"``); eager is always included.
        flops_ratio: the dense / pruned FLOPs ratio, for ``gain_per_flops_gain``.

    Raises:
        ValueError: for bad batches, threads, runtimes or repeats (named).
    """
    runtimes = parse_runtimes(runtimes, "compare_latency: runtimes")
    threads = parse_threads(threads, "compare_latency: threads")
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise ValueError(f"compare_latency: batches must be positive integers, got {batches!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 3:
        raise ValueError(f"compare_latency: repeats must be an integer >= 3, got {repeats!r}")
    log = log or (lambda _msg: None)
    models = {"dense": copy.deepcopy(dense).cpu().float().eval(), "pruned": copy.deepcopy(pruned).cpu().float().eval()}
    gen = torch.Generator().manual_seed(seed)
    inputs = {b: torch.randn(b, *sample_shape, generator=gen) for b in dict.fromkeys(batches)}
    example = torch.randn(max(2, min(batches)), *sample_shape, generator=gen)
    table = LatencyTable(flops_ratio=flops_ratio, machine=machine_info())
    saved_threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="cf_latency_") as tmp:
            for runtime in runtimes:
                if runtime == "onnxruntime":
                    try:
                        from .export import require_export_extra

                        require_export_extra("latency in onnxruntime")
                    except ImportError as exc:
                        table.skipped[runtime] = str(exc)
                        log(f"  latency: {runtime} skipped: {exc}")
                        continue
                for th in threads:
                    try:
                        make = _prepare(runtime, models, th, Path(tmp), example, log)
                        for b in inputs:
                            meter = CpuLoadMeter()
                            samples, inner = _time_interleaved({n: make(n, inputs[b]) for n in models}, repeats)
                            d, p = samples["dense"], samples["pruned"]
                            dm, pm = statistics.median(d), statistics.median(p)
                            row = LatencyRow(runtime, b, th, dm, pm, _percentile(d, 0.2), _percentile(d, 0.8),
                                             _percentile(p, 0.2), _percentile(p, 0.8), dm / pm,
                                             None if not flops_ratio else dm / pm / flops_ratio, repeats, inner,
                                             meter.others_percent(), meter.load_1min)
                            table.rows.append(row)
                            log(f"  latency {runtime:<11} batch {b:>3} threads {th}: dense {dm:.3f} ms, pruned {pm:.3f} ms "
                                f"({row.speedup:.2f}x; other processes {row.others_cpu_percent or 0:.0f}% CPU)")
                    except Exception as exc:  # a runtime that fails here (compiler, exporter) is reported, not fatal
                        if runtime == "eager":
                            raise
                        table.skipped[runtime] = f"{type(exc).__name__}: {exc}"
                        table.rows = [r for r in table.rows if r.runtime != runtime]
                        log(f"  latency: {runtime} skipped: {type(exc).__name__}: {exc}")
                        break
    finally:
        torch.set_num_threads(saved_threads)
        if "compile" in runtimes:
            torch._dynamo.reset()
    return table
