"""Overhead of the Catalyst penalty ``R = sum_i |d_i| ||F_i||_2`` per training step.

Times every provider (eager loop, foreach, torch.compile, the C++ operators, Torch-Pruning's regularizer,
...) on whole-network weight sets, per-row (every row of every weight is a group) and group-layout (the
groups the pruning workflow uses: conv rows, BN entries and the next layers' input columns together), in
two modes, next to a memory-bandwidth floor measured in the same run (``harness.py`` does the timing):

* ``forward``: compute ``R`` with autograd enabled (the graph is built as in a training step, then
  dropped without a backward);
* ``full``: forward + backward; every ``.grad`` is set to None before each repetition (outside the
  timer), as ``optimizer.zero_grad(set_to_none=True)`` does, so backward allocates fresh gradients.
  ``cpp_inplace`` (``cf.penalty_``) *is* the fused forward+backward: it only has this mode.
  ``--grads zeros`` instead keeps every ``.grad`` and zeroes it in place outside the timer
  (``zero_grad(set_to_none=False)``, or a penalty added after ``loss.backward()`` created the gradients).
  ``torch_pruning`` adds into existing gradients only (it skips layers whose ``.grad`` is None), so it
  always runs with zeroed gradients (its ``grads`` column says ``zeros``).
* floor: ``read`` = one read pass over a flat buffer of the weight set's size (``flat.sum()``),
  ``rmw`` = one read-modify-write pass over a gradient-sized buffer (``grad.add_(flat)``);
  floor(forward) = read, floor(full) = read + rmw. When both buffers fit in the last-level cache the
  run says so: the floor is then measured hot in cache and flatters. ``--cold`` evicts the last-level cache
  before every timed repetition of every provider and of the floor alike (CSV column ``cache``).

    python benchmarks/overhead.py                     # everything, appended to benchmarks/results/overhead.csv
    python benchmarks/overhead.py --quick --no-save   # CI smoke run
    python benchmarks/overhead.py --weight-sets resnet50 --providers eager,compile,cpp --modes full
    python benchmarks/overhead.py --weight-sets groups --providers cpp_inplace,torch_pruning --modes full

Adding a provider is one entry in ``PROVIDERS`` (``api_provider("name")`` for a new ``cf.penalty``
backend, ``inplace_provider("name")`` for its ``cf.penalty_``). A provider that works on the model (as
Torch-Pruning's does, or the library's pruner object, ``pruner_setup`` below) takes ``inputs.model``,
``inputs.example_inputs`` and ``inputs.ignored_layers`` of a group set.
"""
from __future__ import annotations

import argparse
import functools
import os
import pathlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
# `python benchmarks/overhead.py` from a checkout: use this checkout's catalyst_fused and the modules here.
for _path in (str(HERE), str(REPO_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

import catalyst_fused as cf  # noqa: E402
from harness import (  # noqa: E402
    Case,
    Provider,
    Step,
    Unavailable,
    append_csv,
    bench_case,
    describe_error,
    machine_info,
    print_summary,
    split_list,
    synchronizer,
)
from weight_sets import GROUP_SETS, WEIGHT_SETS, describe, load_bench_set  # noqa: E402

MODES = ("forward", "full")
DEFAULT_OUT = HERE / "results" / "overhead.csv"
QUICK_WEIGHT_SETS = ("resnet56", "transformer_mlp")
ALL_SETS = (*WEIGHT_SETS, *GROUP_SETS)
# --weight-sets aliases
SET_ALIASES = {"rows": tuple(WEIGHT_SETS), "groups": GROUP_SETS, "all": ALL_SETS}


# --------------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------------


@dataclass
class BenchInputs:
    """One weight set on the benchmark device, shared by every provider (and a per-set scratch cache).

    ``layout`` is None for the per-row sets; ``model`` (the module whose parameters the weights are),
    ``example_inputs`` and ``ignored_layers`` exist for the group sets."""

    name: str
    weights: list[torch.Tensor]
    catalysts: list[torch.Tensor]
    layout: Optional[cf.GroupLayout] = None
    model: Optional[torch.nn.Module] = None
    example_inputs: Optional[torch.Tensor] = None
    ignored_layers: tuple = ()
    cache: dict = field(default_factory=dict)

    @property
    def params(self) -> list[torch.Tensor]:
        return [*self.weights, *self.catalysts]


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


def eager_fn(inputs: BenchInputs) -> Callable[[list, list], torch.Tensor]:
    """The loop a user writes: per layer (per-row sets), per segment of the layout (group sets)."""
    if inputs.layout is None:
        return cf.reference.eager_penalty
    return functools.partial(cf.reference.eager_group_penalty, layout=inputs.layout)


def _tiny_probe_inputs(device, dtype):
    w = torch.randn(3, 4, device=device, dtype=dtype, requires_grad=True)
    d = torch.ones(3, device=device, dtype=dtype, requires_grad=True)
    return [w], [d]


def _check_backend_name(backend: str) -> None:
    if backend not in cf.BACKENDS:
        raise Unavailable(f"catalyst_fused has no backend {backend!r} (it has {', '.join(cf.BACKENDS)})")


def api_provider(backend: str) -> Provider:
    """``cf.penalty(weights, catalysts, layout=..., backend=backend)`` under autograd."""

    def setup(inputs: BenchInputs, mode: str) -> Step:
        layout = inputs.layout
        return autograd_step(lambda w, d: cf.penalty(w, d, layout=layout, backend=backend), inputs, mode)

    def probe(device, dtype):
        _check_backend_name(backend)
        weights, catalysts = _tiny_probe_inputs(device, dtype)
        cf.penalty(weights, catalysts, backend=backend).backward()

    return Provider(setup, f"cf.penalty(backend={backend!r}) + autograd", probe=probe)


def inplace_provider(backend: str) -> Provider:
    """``cf.penalty_(..., scale=1.0, layout=..., backend=backend)``: value and gradients in one call, no graph."""

    def setup(inputs: BenchInputs, mode: str) -> Step:
        weights, catalysts, layout = inputs.weights, inputs.catalysts, inputs.layout

        def step() -> None:
            cf.penalty_(weights, catalysts, scale=1.0, layout=layout, backend=backend)

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


def foreach_setup(inputs: BenchInputs, mode: str) -> Step:
    if inputs.layout is not None:
        raise Unavailable("per-row sets only (row views cannot express column groups)")
    return autograd_step(foreach_penalty, inputs, mode)


# Group layouts with more members than this are not compiled (the cold compile of the per-member loop grows
# with the member count; see compile_setup).
COMPILE_MAX_MEMBERS = 400


def compile_setup(inputs: BenchInputs, mode: str) -> Step:
    """``torch.compile(fullgraph=True)`` of the eager loop, compiled once per weight set (shared by both
    modes) from a reset Dynamo; the cold first forward and first backward are timed here."""
    state = inputs.cache.get("compile")
    if isinstance(state, Unavailable):  # failed for the other mode already
        raise state
    if inputs.layout is not None and len(inputs.layout.members) > COMPILE_MAX_MEMBERS:
        raise Unavailable(
            f"the layout has {len(inputs.layout.members)} members (> {COMPILE_MAX_MEMBERS}): compiling its loop takes "
            "too long (DenseNet-121's 2,087 members: 1,387 s cold, then 341 ms per call, 2 threads, 2026-12-01)"
        )
    if state is None:
        try:
            torch._dynamo.reset()
            compiled = torch.compile(eager_fn(inputs), fullgraph=True, dynamic=False)
            sync = synchronizer(inputs.weights[0].device)
            t0 = time.perf_counter()
            value = compiled(inputs.weights, inputs.catalysts)
            sync()
            t1 = time.perf_counter()
            value.backward()
            sync()
            t2 = time.perf_counter()
        except Exception as error:  # no C++ compiler, no Triton for this GPU, ...
            failure = inputs.cache["compile"] = Unavailable(f"torch.compile failed: {describe_error(error)}")
            raise failure from error
        for p in inputs.params:
            p.grad = None
        state = inputs.cache["compile"] = {"fn": compiled, "cold": {"forward": t1 - t0, "full": t2 - t0}}
    step = autograd_step(state["fn"], inputs, mode)
    step.cold_compile_s = state["cold"][mode]  # type: ignore[attr-defined]
    return step


def torch_pruning_setup(inputs: BenchInputs, mode: str) -> Step:
    """Torch-Pruning's ``GroupNormPruner.regularize(model)``, as its users call it between ``backward()`` and
    ``optimizer.step()``: the group-lasso-style gradient of every coupled group of the model, added into the
    existing ``.grad`` from Python loops over groups. The pruner (DepGraph tracing) is built once per set,
    outside the timer, with the set's classifier ignored, so its groups are the set's groups."""
    if inputs.model is None:
        raise Unavailable("needs the model (group sets only)")
    try:
        import torch_pruning as tp
    except ImportError as error:
        raise Unavailable(f"torch_pruning is not installed ({error})") from error
    pruner = inputs.cache.get("torch_pruning")
    if pruner is None:
        pruner = inputs.cache["torch_pruning"] = tp.pruner.GroupNormPruner(
            inputs.model,
            inputs.example_inputs,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            ignored_layers=list(inputs.ignored_layers),
        )
    model = inputs.model

    def step() -> None:
        pruner.regularize(model)

    return step


def pruner_setup(inputs: BenchInputs, mode: str) -> Step:
    """``cf.Pruner(model, example_inputs, mode="group").regularize()``: what a user of the pruner object calls
    between ``backward()`` and ``optimizer.step()``, with its own targets and catalysts (the same groups as
    the set's layout), on existing gradients. Built once per set, outside the timer."""
    if inputs.model is None:
        raise Unavailable("needs the model (group sets only)")
    try:
        from catalyst_fused.pruning import Pruner
    except ImportError as error:
        raise Unavailable(f"the [pruning] extra is not installed ({error})") from error
    pruner = inputs.cache.get("pruner")
    if pruner is None:
        pruner = inputs.cache["pruner"] = Pruner(inputs.model, inputs.example_inputs, mode="group", c0=1.0,
                                                 gamma=1e-4, ignored_layers=list(inputs.ignored_layers))
        for d in pruner.catalysts:  # existing, zeroed gradients like the model's (the harness resets those)
            d.grad = torch.zeros_like(d)
    return pruner.regularize


# name -> Provider. A new backend of cf.penalty / cf.penalty_ is one line: "name": api_provider("name").
PROVIDERS: dict[str, Provider] = {
    "eager": Provider(lambda inputs, mode: autograd_step(eager_fn(inputs), inputs, mode),
                      "the loop a user writes (cf.reference.eager_penalty / eager_group_penalty) + autograd"),
    "foreach": Provider(foreach_setup, "torch._foreach_norm over all row views + autograd (per-row sets)"),
    "compile": Provider(compile_setup, "torch.compile(fullgraph=True) of the eager loop", in_quick=False),
    "cpp": api_provider("cpp"),
    "cpp_inplace": inplace_provider("cpp"),
    "triton": api_provider("triton"),
    "triton_inplace": inplace_provider("triton"),
    "pruner": Provider(pruner_setup, "cf.Pruner(model, mode='group').regularize() (group sets)", modes=("full",),
                       grads="zeros"),
    "torch_pruning": Provider(torch_pruning_setup, "Torch-Pruning 1.6 GroupNormPruner.regularize(model) (group sets)",
                              modes=("full",), in_quick=False, grads="zeros"),
}


# --------------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------------


def bench_weight_set(name: str, providers: list[str], modes: list[str], args, device, dtype, info: dict) -> list[dict]:
    bench = load_bench_set(name, device=device, dtype=dtype)
    desc = describe(name, bench.weights, bench.layout)
    catalysts = cf.init_catalysts(bench.weights, c0=1.0, layout=bench.layout)
    inputs = BenchInputs(name, bench.weights, catalysts, bench.layout, bench.model, bench.example_inputs, bench.ignored_layers)
    print(f"\n== {desc} | {info['device']} {info['dtype']}, {info['threads']} threads", flush=True)
    if bench.note:
        print(f"  ({bench.note})")
    # Every parameter of the model gets its gradient reset (Torch-Pruning touches only existing ones).
    params = inputs.params if bench.model is None else [*bench.model.parameters(), *catalysts]
    case = Case(name, desc.n_tensors, desc.n_params, desc.n_rows, params=params, floor_source=bench.weights)
    return bench_case(case, inputs, PROVIDERS, providers, modes, args, device, info)


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--weight-sets",
        help=f"comma-separated, from {','.join(ALL_SETS)}, or rows / groups / all (default: all; "
        f"--quick: {','.join(QUICK_WEIGHT_SETS)})",
    )
    parser.add_argument("--providers", help=f"comma-separated, from {','.join(PROVIDERS)} (default: all; --quick: all but compile and torch_pruning)")
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
    parser.add_argument(
        "--cold",
        action="store_true",
        help="evict the last-level cache (CUDA: the L2) before every timed repetition of every provider and of the "
        "floor (untimed), as a training step's forward and backward would; CSV column cache = cold",
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
        names = [n for part in args.weight_sets.split(",") for n in SET_ALIASES.get(part.strip(), (part,))]
        args.weight_sets = split_list(",".join(names), list(ALL_SETS), "weight set")
    else:
        args.weight_sets = list(QUICK_WEIGHT_SETS if args.quick else ALL_SETS)
    if args.providers:
        args.providers = split_list(args.providers, list(PROVIDERS), "provider")
    else:
        args.providers = [n for n, p in PROVIDERS.items() if p.in_quick or not args.quick]
    args.modes = split_list(args.modes, MODES, "mode")
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
                print(f"skip provider {name}: unavailable here ({describe_error(error)})")
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
    info = machine_info(device, dtype, cf.__version__)
    print(
        f"catalyst penalty overhead | {info['date']} | {info['hostname']} | {info['cpu']} | "
        f"{info['threads']} threads | gpu: {info['gpu'] or '-'} | python {info['python']} torch {info['torch']} "
        f"triton {info['triton'] or '-'} | git {info['git_rev'] or '-'}"
    )
    print(
        f"reps {args.reps} (min {args.min_reps}, budget {args.max_seconds:g} s per provider and mode), "
        f"warmup {args.warmup}, rounds {args.rounds}, full-mode grads: {args.grads}, "
        f"cache: {'cold (evicted before every repetition)' if args.cold else 'hot (not evicted)'}"
    )
    for name in args.providers:
        print(f"  {name:<14} {PROVIDERS[name].description}")

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
    print_summary(rows, "cpp")
    print_summary(rows, "cpp_inplace")
    print(f"\ntotal time {time.perf_counter() - started:.1f} s")
    if not args.no_save:
        out = pathlib.Path(args.out)
        append_csv(out, rows)
        print(f"appended {len(rows)} rows to {out}")
    return rows


if __name__ == "__main__":
    main()
