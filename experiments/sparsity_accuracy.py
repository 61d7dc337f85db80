"""Accuracy against unstructured sparsity: LATS, S-LATS and magnitude pruning at the same target sparsities,
on the small CNN and ResNet-56 on sklearn digits, over seeds; the real sparsity reached against the target.

    python experiments/sparsity_accuracy.py                           # quick: both models, 5 targets, 3 seeds (hours)
    python experiments/sparsity_accuracy.py --setting smoke           # CI: seconds, figures meaningless
    python experiments/sparsity_accuracy.py --models small_cnn --threads 1   # one model per process

Protocol: per (model, seed) one dense model, trained by the first run and loaded by every other
(``--dense-checkpoint``); every run then has the same sparsify budget (``--epochs``, cosine learning rate
from ``--lr`` stepped per epoch, the same data order) and the same fine-tuning with its masks kept
(``--finetune-epochs``). LATS and S-LATS are ``--method lats`` with ``--schedule lats`` / ``slats`` (the
threshold reaches the target by feedback, exact at the last step); magnitude zeroes the smallest weights once
at the start of the same budget and trains with its masks. Global scope (one threshold over all sparsified
tensors), first layer and classifier dense (the defaults). Runs are cached by a hash of their whole
configuration under ``experiments/runs/`` (an interrupted run is resumed), so a rerun costs nothing and a
longer setting reuses what it shares.

Writes ``results/sparsity_accuracy_<setting>.{md,json,png}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

import _runs  # noqa: E402  (puts this checkout's package first on sys.path)
from catalyst_fused.pruning import PruneConfig  # noqa: E402

HERE = Path(__file__).resolve().parent

# name -> (method, schedule)
METHODS = {"lats": ("lats", "lats"), "slats": ("lats", "slats"), "continuation": ("lats", "continuation"),
           "magnitude": ("magnitude", "lats")}
DEFAULT_METHODS = ("lats", "slats", "magnitude")


@dataclass
class Budget:
    dense_epochs: int
    epochs: int
    finetune_epochs: int
    lr: float = 0.05
    finetune_lr: float = 0.01
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    extra: dict = field(default_factory=dict)


@dataclass
class Setting:
    models: dict  # model name -> Budget
    sparsities: list
    seeds: list


SETTINGS = {
    # CI: checks that every path runs and the files are written (figures meaningless)
    "smoke": Setting({"small_cnn": Budget(1, 2, 1, train_limit=256, test_limit=128, extra={"latency_batch": 8})},
                     [0.9], [0, 1]),
    # the README's figures: both models, 5 targets, 3 seeds. ResNet-56 sees the 8x8 digits upsampled to 16x16
    # (not 32x32: 4x less compute, no information lost) with a smaller budget: CPU time on shared cores
    "quick": Setting({"small_cnn": Budget(15, 20, 5),
                      "resnet56": Budget(6, 4, 1, extra={"image_size": 16, "latency_batch": 8})},
                     [0.5, 0.7, 0.8, 0.9, 0.95], [0, 1, 2]),
}


def _config(model: str, budget: Budget, method: str, sparsity: float, seed: int, device: str) -> PruneConfig:
    algo, schedule = METHODS[method]
    return PruneConfig(model=model, dataset="digits", method=algo, schedule=schedule, sparsity=sparsity, seed=seed,
                       dense_epochs=budget.dense_epochs, epochs=budget.epochs, finetune_epochs=budget.finetune_epochs,
                       lr=budget.lr, finetune_lr=budget.finetune_lr, train_limit=budget.train_limit,
                       test_limit=budget.test_limit, device=device, progress=False, plots=False, **budget.extra)


def collect(args, setting: Setting, log=print) -> list[dict]:
    """Makes (or reads back) every run; with ``args.cached_only`` only finished runs are read (none is made)."""
    records = []
    for model in args.models:
        budget = setting.models[model]
        for seed in args.seeds:
            dense = None
            for sparsity in setting.sparsities:
                for method in args.methods:
                    cfg = _config(model, budget, method, sparsity, seed, args.device)
                    if dense is not None:
                        cfg = replace(cfg, dense_checkpoint=dense)
                    cfg = replace(cfg, out=str(Path(args.runs_dir) / f"sparsity-{model}-digits" / f"seed{seed}" /
                                               f"{method}_s{sparsity}-{_runs.config_key(cfg)}"))
                    if args.cached_only:
                        report = _finished(cfg)
                        if report is None:
                            continue
                    else:
                        report = _runs._run(cfg, log)
                    dense = dense or str(Path(cfg.out) / "dense_model.pt")
                    records.append(_record(report, model, method, sparsity, seed))
    return records


def _finished(cfg: PruneConfig):
    path = Path(cfg.out) / "report.json"
    if not path.exists():
        return None
    report = _runs.Report.load(path)
    return report if report.status == "done" else None


def _record(report, model: str, method: str, sparsity: float, seed: int) -> dict:
    sp, m, acc = report.stages.sparsify, report.stages.masks, report.accuracy
    return {"model": model, "method": method, "target": sparsity, "seed": seed, "sparsity": m.sparsity,
            "abs_error_points": m.abs_error_points, "sparsity_after_finetune": m.sparsity_after_finetune,
            "model_sparsity": m.model_sparsity, "nonzero_macs_fraction": m.nonzero_macs / m.dense_macs,
            "acc_dense": acc.dense, "acc_sparsified": sp.accuracy, "acc_finetuned": acc.after_finetune,
            "final_threshold": m.final_threshold, "runtime_s": report.runtime_s["total"]}


def table(records: list[dict], setting: Setting, methods) -> tuple[str, list[dict]]:
    rows = ["| model | target | method | real sparsity (%) | acc. after sparsify | acc. after fine-tune | delta vs dense | "
            "dense acc. | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    points = []
    for model in dict.fromkeys(r["model"] for r in records):
        for target in setting.sparsities:
            for method in methods:
                rs = [r for r in records if r["model"] == model and r["target"] == target and r["method"] == method]
                if not rs:
                    continue
                delta = [r["acc_finetuned"] - r["acc_dense"] for r in rs]
                points.append({"model": model, "target": target, "method": method, "seeds": [r["seed"] for r in rs],
                               "sparsity": _runs.mean_std([100 * r["sparsity"] for r in rs]),
                               "max_abs_error_points": max(r["abs_error_points"] for r in rs),
                               "acc_sparsified": _runs.mean_std([r["acc_sparsified"] for r in rs]),
                               "acc_finetuned": _runs.mean_std([r["acc_finetuned"] for r in rs]),
                               "delta": _runs.mean_std(delta), "acc_dense": _runs.mean_std([r["acc_dense"] for r in rs])})
                rows.append(f"| {model} | {100 * target:g}% | {method} | {_runs.fmt([100 * r['sparsity'] for r in rs], 3)} | "
                            f"{_runs.fmt([r['acc_sparsified'] for r in rs])} | {_runs.fmt([r['acc_finetuned'] for r in rs])} | "
                            f"{_runs.fmt(delta)} | {_runs.fmt([r['acc_dense'] for r in rs])} | "
                            f"{','.join(str(r['seed']) for r in rs)} |")
    return "\n".join(rows) + "\n", points


def plot(args, points: list[dict], methods) -> Path:
    plt = _runs.pyplot()
    models = list(dict.fromkeys(p["model"] for p in points))
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in methods:
            ps = sorted((p for p in points if p["model"] == model and p["method"] == method), key=lambda p: p["target"])
            if ps:
                ax.errorbar([p["sparsity"][0] for p in ps], [p["acc_finetuned"][0] for p in ps],
                            yerr=[p["acc_finetuned"][1] for p in ps], marker="o", capsize=3, label=method)
        dense = [p["acc_dense"][0] for p in points if p["model"] == model]
        if dense:
            ax.axhline(sum(dense) / len(dense), color="gray", lw=0.8, ls="--", label="dense")
        ax.set_title(f"{model} on digits (after fine-tuning)", fontsize=9)
        ax.set_xlabel("real sparsity of the pruned tensors (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7)
    path = Path(args.results_dir) / f"sparsity_accuracy_{args.setting}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=list(SETTINGS), default="quick")
    parser.add_argument("--models", default=None, help="comma-separated subset of the setting's models")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--seeds", default=None, help="comma-separated (default: the setting's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--runs-dir", default=str(HERE / "runs"))
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-results", action="store_true", help="make the runs only (e.g. one model per process)")
    parser.add_argument("--cached-only", action="store_true",
                        help="tables and plot from the runs that finished (none is made; the seeds per row are listed)")
    args = parser.parse_args(argv)
    setting = SETTINGS[args.setting]
    args.models = [m.strip() for m in (args.models or ",".join(setting.models)).split(",") if m.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else setting.seeds
    for what, names, allowed in (("--models", args.models, setting.models), ("--methods", args.methods, METHODS)):
        bad = [n for n in names if n not in allowed]
        if bad:
            parser.error(f"{what}: unknown {bad}; choose from {', '.join(allowed)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    records = collect(args, setting)
    if args.no_results:
        return 0
    if not records:
        parser.error("no finished run to tabulate (run without --cached-only first)")
    md, points = table(records, setting, args.methods)
    worst = max(r["abs_error_points"] for r in records)
    budgets = "; ".join(f"{m}: dense/sparsify/fine-tune epochs {b.dense_epochs}/{b.epochs}/{b.finetune_epochs}, lr "
                        f"{b.lr}/{b.finetune_lr}" + ("" if b.train_limit is None else f", first {b.train_limit} training "
                        "samples") for m, b in setting.models.items() if m in args.models)
    env = _runs.environment()
    header = (f"<!-- generated by experiments/sparsity_accuracy.py --setting {args.setting}; do not edit -->\n"
              f"Setting `{args.setting}`: sklearn digits, seeds {args.seeds}, targets {setting.sparsities}, methods "
              f"{', '.join(args.methods)}; {budgets}. {env['date']}, torch {env['torch']}, {env['threads']} threads. "
              f"Mean ± std over seeds; real sparsity over the sparsified tensors (first layer and classifier dense).\n\n")
    md += (f"\nReal sparsity against the target: at most {worst:.3f} percentage points off over all {len(records)} runs "
           f"(the masks are fixed at the exact target threshold); fine-tuning kept every mask "
           f"({'yes' if all(r['sparsity_after_finetune'] == r['sparsity'] for r in records) else 'NO'}).\n")
    path = plot(args, points, args.methods)
    md += f"\n![accuracy vs sparsity]({path.name})\n"
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sparsity_accuracy_{args.setting}.md").write_text(header + md)
    (out / f"sparsity_accuracy_{args.setting}.json").write_text(json.dumps(
        {"environment": env, "setting": args.setting, "points": points, "records": records}, indent=1, default=float))
    print(header + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
