"""Is the pruned model faster where it is deployed? Latency of finished pruning runs (dense vs pruned) in eager
PyTorch, torch.compile and onnxruntime on the CPU, batch 1 and 64, 1 and 2 threads, beside the FLOPs ratio; and
what rounding the kept widths to a multiple of 8 or 16 (``--round-to``) changes, timed against the unrounded
pruned model.

    python experiments/deployment_latency.py --name digits --runs runs/digits \\
        --rounded runs/digits:runs/digits_r8 runs/digits:runs/digits_r16

Each run directory is a finished ``python -m catalyst_fused.prune`` run; its dense model is ``dense_model.pt``
on the architecture recorded in ``pruned_model.json``, its pruned model comes from :func:`load_pruned`. The
figures come from :func:`catalyst_fused.pruning.compare_latency` (interleaved samples, medians, the load of the
machine beside every row). The machine is shared: before every measurement the script waits (up to
``--max-wait`` seconds) until other processes use less than ``--quiet`` percent of the CPU, and retakes rows
measured above that (up to ``--retakes`` times; the last take is kept and its load recorded either way).

``--ranked MODEL:WEIGHTS:SPEEDUP`` times a model that has no finished pruning run (ResNet-56: the Catalyst
run does not fit a CPU session): the named architecture with saved dense weights, pruned in one shot by the
pruner's ranking of the group L2 norms of the trained weights (``method="group_lasso"`` without its
training) to the FLOPs target ``SPEEDUP``, exact and with ``--round-to 8`` and ``16``. This measures what
such widths do to latency; it is not a Catalyst result and has no accuracy (nothing is fine-tuned).

Writes results/deployment_latency_<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # `python experiments/x.py` from a checkout uses this checkout's package
    sys.path.insert(0, str(HERE.parent))

from catalyst_fused.models import build_model  # noqa: E402
from catalyst_fused.pruning import Pruner, Report, compare_latency, load_pruned, read_pruned_spec  # noqa: E402
from catalyst_fused.pruning.metrics import count_flops  # noqa: E402
from catalyst_fused.pruning.latency import CpuLoadMeter, parse_runtimes, parse_threads  # noqa: E402
from catalyst_fused.pruning.workflow.report import write_json_atomic  # noqa: E402


def wait_until_quiet(threshold: float, max_wait: float, log) -> float:
    """Waits until other processes use less than ``threshold`` percent of the CPU over a 3 s window (or
    ``max_wait`` seconds passed); returns the last window's figure."""
    t0 = time.time()
    while True:
        meter = CpuLoadMeter()
        time.sleep(3)
        others = meter.others_percent() or 0.0
        if others < threshold or time.time() - t0 > max_wait:
            return others
        log(f"  waiting for a quiet machine: other processes use {others:.0f}% of the CPU")


def load_run(path: Path):
    """(report, dense model with the run's dense weights, pruned model) of a finished run."""
    report = Report.load(path / "report.json")
    builder = read_pruned_spec(path)["architecture"]["builder"]
    if not builder:
        raise SystemExit(f"{path}: the run's model was not built by name; this script rebuilds named models only")
    dense = build_model(builder["name"], num_classes=builder["num_classes"], in_channels=builder["in_channels"])
    dense.load_state_dict(torch.load(path / "dense_model.pt", map_location="cpu", weights_only=True))
    return report, dense, load_pruned(builder["name"], path)


def measure(a, b, shape, args, flops_ratio, log):
    """compare_latency of ``a`` (in the dense slot) against ``b``, rows over ``--quiet`` retaken."""
    kw = dict(batches=args.batches, repeats=args.repeats, flops_ratio=flops_ratio, log=log)
    wait_until_quiet(args.quiet, args.max_wait, log)
    table = compare_latency(a, b, shape, threads=args.threads, runtimes=args.runtimes, **kw)
    for _ in range(args.retakes):
        loud = [r for r in table.rows if (r.others_cpu_percent or 0) > args.quiet]
        if not loud:
            break
        log(f"  retaking {len(loud)} rows measured with other processes above {args.quiet:.0f}% CPU")
        for r in loud:
            wait_until_quiet(args.quiet, args.max_wait, log)
            again = compare_latency(a, b, shape, threads=(r.threads,), runtimes=(r.runtime,), **dict(kw, batches=(r.batch_size,)))
            new = again.row(r.runtime, r.batch_size, r.threads)
            if new is not None:
                table.rows[table.rows.index(r)] = new
    return table


def ranked_models(spec: str) -> tuple[str, tuple, nn.Module, dict]:
    """(model name, sample shape, dense model, {round_to: (pruned model, widths, FLOPs ratio)}) for ``--ranked``."""
    try:
        name, weights, speedup = spec.split(":")
        speedup = float(speedup)
    except ValueError:
        raise SystemExit(f"--ranked: expected MODEL:WEIGHTS:SPEEDUP, got {spec!r}") from None
    state = torch.load(weights, map_location="cpu", weights_only=True)
    first = next(v for v in state.values() if v.dim() == 4)  # the first conv's weight: in_channels
    last = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2][-1]  # the classifier
    dense = build_model(name, num_classes=last.shape[0], in_channels=first.shape[1])
    dense.load_state_dict(state)
    shape = (first.shape[1], 8, 8) if name == "small_cnn" else (first.shape[1], 32, 32)
    x = torch.zeros(2, *shape)
    pruned = {}
    for round_to in (1, 8, 16):
        model = copy.deepcopy(dense).eval()
        pruner = Pruner(model, x, method="group_lasso", target_speedup=speedup, round_to=round_to)
        with warnings.catch_warnings():  # no optimizer: nothing is trained after the prune
            warnings.simplefilter("ignore", UserWarning)
            summary = pruner.prune()
        kept = {t: v["kept"] for t, v in summary.per_target.items()}
        pruned[round_to] = (model, kept, count_flops(dense, shape)["macs"] / count_flops(model, shape)["macs"])
    return name, shape, dense, pruned


def widths(report) -> str:
    return ", ".join(str(v) for v in report.per_layer_kept.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="results/deployment_latency_<name>.{json,md}")
    p.add_argument("--runs", nargs="+", default=[], help="finished run directories: dense vs pruned")
    p.add_argument("--rounded", nargs="*", default=[], help="UNROUNDED:ROUNDED run directory pairs: pruned vs pruned")
    p.add_argument("--ranked", nargs="*", default=[], help="MODEL:WEIGHTS:SPEEDUP: dense vs one-shot norm-ranked "
                   "widths (exact, rounded to 8 and 16), latency only")
    p.add_argument("--runtimes", default="eager,compile,onnxruntime")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--quiet", type=float, default=10.0, help="percent of the CPU other processes may use")
    p.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for a quiet machine per measurement")
    p.add_argument("--retakes", type=int, default=2)
    p.add_argument("--results-dir", default=str(HERE / "results"))
    args = p.parse_args(argv)
    args.runtimes, args.threads = parse_runtimes(args.runtimes), parse_threads(args.threads)
    args.batches = parse_threads(args.batches, "--batches")

    def log(msg):
        print(msg, flush=True)

    command = "python experiments/deployment_latency.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    out = {"command": command, "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "runs": [], "rounded": []}
    md = [f"Command: `{command}`", ""]
    head = ("| runtime | batch | threads | dense ms | pruned ms | speed-up | speed-up / FLOPs ratio | other processes' CPU |\n"
            "|---|---|---|---|---|---|---|---|")
    for run in map(Path, args.runs):
        report, dense, pruned = load_run(run)
        cost = report.cost
        log(f"{run}: dense vs pruned (FLOPs {cost.flops_ratio:.2f}x, params {cost.params_ratio:.2f}x)")
        table = measure(dense, pruned, tuple(report.input_shape), args, cost.flops_ratio, log)
        out["runs"].append({"run": str(run), "model": report.config.model, "flops_ratio": cost.flops_ratio,
                            "params_ratio": cost.params_ratio, "kept_widths": report.per_layer_kept,
                            "accuracy": report.accuracy.to_dict(), "latency": table.to_dict()})
        md += [f"### {run} ({report.config.model}): FLOPs {cost.flops_ratio:.2f}x, params {cost.params_ratio:.2f}x, "
               f"accuracy {report.accuracy.dense:.2f}% dense -> {report.accuracy.after_finetune:.2f}% pruned", "",
               f"Kept widths: {widths(report)}. Machine: {table.machine['cpu']}, {table.machine['cores']} cores, torch "
               f"{table.machine['torch']}, onnxruntime {table.machine.get('onnxruntime', '-')}, {table.machine['date_utc']} UTC.",
               "", head]
        md += [f"| {r.runtime} | {r.batch_size} | {r.threads} | {r.dense_ms:.3f} | {r.pruned_ms:.3f} | {r.speedup:.2f}x | "
               f"{r.gain_per_flops_gain:.2f} | {r.others_cpu_percent:.0f}% |" for r in table.rows]
        if table.skipped:
            md.append(f"\nSkipped: {table.skipped}")
        md.append("")
    for pair in args.rounded:
        base_dir, rounded_dir = map(Path, pair.split(":"))
        base, _, base_model = load_run(base_dir)
        rounded, _, rounded_model = load_run(rounded_dir)
        ratio = base.cost.flops_ratio / rounded.cost.flops_ratio  # FLOPs of the rounded model / the unrounded one
        log(f"{rounded_dir} (round-to {rounded.config.round_to}) vs {base_dir}: rounded model has {ratio:.3f}x the FLOPs")
        table = measure(base_model, rounded_model, tuple(base.input_shape), args, 1.0 / ratio, log)
        out["rounded"].append({"unrounded": str(base_dir), "rounded": str(rounded_dir), "round_to": rounded.config.round_to,
                               "widths": [base.per_layer_kept, rounded.per_layer_kept], "flops_ratio": [
                                   base.cost.flops_ratio, rounded.cost.flops_ratio],
                               "accuracy_after_finetune": [base.accuracy.after_finetune, rounded.accuracy.after_finetune],
                               "latency": table.to_dict()})
        md += [f"### --round-to {rounded.config.round_to}: {rounded_dir} against {base_dir}", "",
               f"Widths {widths(base)} -> {widths(rounded)}; FLOPs ratio to dense {base.cost.flops_ratio:.2f}x -> "
               f"{rounded.cost.flops_ratio:.2f}x (the rounded model has {ratio:.3f}x the FLOPs); accuracy after fine-tuning "
               f"{base.accuracy.after_finetune:.2f}% -> {rounded.accuracy.after_finetune:.2f}%.", "",
               "| runtime | batch | threads | unrounded ms | rounded ms | unrounded / rounded time | other processes' CPU |",
               "|---|---|---|---|---|---|---|"]
        md += [f"| {r.runtime} | {r.batch_size} | {r.threads} | {r.dense_ms:.3f} | {r.pruned_ms:.3f} | {r.speedup:.2f}x | "
               f"{r.others_cpu_percent:.0f}% |" for r in table.rows]
        md.append("")
    for spec in args.ranked:
        name, shape, dense, pruned = ranked_models(spec)
        rows = []
        for round_to, (model, kept, flops_ratio) in pruned.items():
            log(f"{name}: dense vs one-shot ranked widths, round-to {round_to} (FLOPs {flops_ratio:.2f}x)")
            table = measure(dense, model, shape, args, flops_ratio, log)
            rows.append((round_to, kept, flops_ratio, table))
            out["rounded"].append({"ranked": spec, "model": name, "round_to": round_to, "kept_widths": kept,
                                   "flops_ratio": flops_ratio, "latency": table.to_dict()})
        md += [f"### {name}, one-shot norm ranking to {spec.split(':')[-1]}x FLOPs (latency only, no accuracy)", ""]
        for round_to, kept, flops_ratio, table in rows:
            md += [f"round-to {round_to}: FLOPs {flops_ratio:.2f}x, kept widths {', '.join(map(str, kept.values()))}. "
                   f"Machine: {table.machine['cpu']}, {table.machine['cores']} cores, {table.machine['date_utc']} UTC.",
                   "", head]
            md += [f"| {r.runtime} | {r.batch_size} | {r.threads} | {r.dense_ms:.3f} | {r.pruned_ms:.3f} | {r.speedup:.2f}x | "
                   f"{r.gain_per_flops_gain:.2f} | {r.others_cpu_percent:.0f}% |" for r in table.rows]
            md.append("")
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results / f"deployment_latency_{args.name}.json", out)
    (results / f"deployment_latency_{args.name}.md").write_text("\n".join(md) + "\n")
    log(f"wrote {results / f'deployment_latency_{args.name}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
