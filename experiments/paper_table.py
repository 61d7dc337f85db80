"""The paper's table on digits at 32x32: Catalyst at a target speed-up against random pruning and network
slimming at the FLOPs ratio Catalyst reached, per model, target, mode and seed.

    python experiments/paper_table.py --setting resnet56_2x            # ResNet-56 at 2x, group and BN mode, 3 seeds
    python experiments/paper_table.py --setting full                   # + ResNet-56 at 3x and VGG-19-BN at 3x
    python experiments/paper_table.py --setting vgg19_bn_3x            # the VGG-19-BN row of "full" alone
    python experiments/paper_table.py --setting small_cnn              # the protocol on the small CNN at 2x and 3x
    python experiments/paper_table.py --setting targets                # achieved / target at 1.5x, 2x, 3x (Catalyst)
    python experiments/paper_table.py --setting smoke                  # CI: seconds, figures meaningless

Protocol (every run is ``run_pipeline``, cached and resumable like the other experiments, see ``_runs.py``):

* per (model, seed) one dense model, trained once (``dense_epochs``) by a dense-only run or read from
  ``--dense-checkpoints DIR/<model>_seed<k>.pt``; every run of that seed starts from it;
* Catalyst (``--gamma auto``, ``--target-speedup T``, the mode of the row): opt1 for at most ``epochs`` epochs
  with its stop rule, removal, ``finetune_epochs`` of fine-tuning;
* network slimming (L1 on BN scales, gamma 0.01 as chosen in ``_runs.GAMMA``) and random pruning (the same
  opt1 epochs of plain training, then a random order) with ``--target-speedup`` = the FLOPs ratio that Catalyst
  run reached, the same budgets and fine-tuning. Slimming regularises BN scales whatever the row's mode.

Every accuracy is measured with BatchNorm statistics re-estimated on 8 training batches. Writes
``results/paper_table_<setting>.{md,json}``.

The full table costs more CPU time than one machine session gives (a VGG-19-BN run is 20-50 min on one core
of the 2-core machine, depending on load), and a runs directory does not outlive its machine. So every finished run's report is also filed in a ledger,
``results/ledger/`` (committed with the tables; ``--ledger DIR|none``), and read back from there: a later
session makes only what is missing (``--methods`` picks the baselines to make; Catalyst's run, which fixes their
target, is read back). The ledger keeps no weights: a run that must be made from a dense model known only to
the ledger remakes it first, checks its weights' SHA-256 against the one filed, and the table marks a seed whose
runs did not all start from the same weights.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import _runs
from catalyst_fused.pruning import PruneConfig


# epochs (dense, opt1 budget, fine-tuning) per model
BUDGETS = {"small_cnn": (15, 30, 5), "resnet56": (15, 30, 5), "vgg19_bn": (15, 30, 5)}  # the CLI defaults


@dataclass
class TableSetting:
    rows: list  # (model, target speed-up)
    modes: list
    seeds: dict  # model -> seeds
    methods: list = field(default_factory=lambda: ["catalyst", "slimming", "random"])
    budgets: dict = field(default_factory=lambda: dict(BUDGETS))
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    extra: dict = field(default_factory=dict)


SETTINGS = {
    "smoke": TableSetting([("small_cnn", 1.5)], ["group", "bn"], {"small_cnn": [0]}, budgets={"small_cnn": (2, 3, 1)},
                          train_limit=256, test_limit=96, extra={"noise_draws": 1, "latency_batch": 4}),
    "resnet56_2x": TableSetting([("resnet56", 2.0)], ["group", "bn"], {"resnet56": [0, 1, 2]}),
    "full": TableSetting([("resnet56", 2.0), ("resnet56", 3.0), ("vgg19_bn", 3.0)], ["group", "bn"],
                         {"resnet56": [0, 1, 2], "vgg19_bn": [0, 1, 2]}),
    # the VGG-19-BN row of "full" alone (the same runs, cached under the same keys): its own table file
    "vgg19_bn_3x": TableSetting([("vgg19_bn", 3.0)], ["group", "bn"], {"vgg19_bn": [0, 1, 2]}),
    # the same protocol on the small CNN (minutes per run on 2 CPU cores, where ResNet-56 takes most of an hour)
    "small_cnn": TableSetting([("small_cnn", 2.0), ("small_cnn", 3.0)], ["group", "bn"], {"small_cnn": [0, 1, 2]}),
    "targets": TableSetting([(m, t) for m in ("small_cnn", "resnet56") for t in (1.5, 2.0, 3.0)], ["group"],
                            {"small_cnn": [0, 1, 2], "resnet56": [0]}, methods=["catalyst"]),
}
BASELINE_GAMMA = {"slimming": _runs.GAMMA["slimming"], "random": 0.0}


def _base(setting: TableSetting, model: str, seed: int, args) -> PruneConfig:
    dense_epochs, epochs, finetune_epochs = setting.budgets[model]
    return PruneConfig(model=model, dataset="digits", seed=seed, dense_epochs=dense_epochs, epochs=epochs,
                       finetune_epochs=finetune_epochs, train_limit=setting.train_limit, test_limit=setting.test_limit,
                       device=args.device, progress=False, plots=False, latency="eager",
                       **dict(setting.extra, prune_pull=not args.no_prune_pull))


class _Dense:
    """The dense model of (model, seed): its weights file for runs that must be made (trained on first need, or
    read from ``--dense-checkpoints``), and the SHA-256 of its weights for the runs' provenance."""

    def __init__(self, setting, model, seed, args, root: Path, log):
        self.args, self.log, self.ledger = args, log, args.ledger
        self.given = Path(args.dense_checkpoints) / f"{model}_seed{seed}.pt" if args.dense_checkpoints else None
        cfg = replace(_base(setting, model, seed, args), epochs=0, finetune_epochs=0)
        self.cfg = replace(cfg, out=str(root / f"seed{seed}" / f"dense-{_runs.config_key(cfg)}"))

    @property
    def path(self) -> str:
        """What the runs of this seed name as their ``dense_checkpoint`` (their keys use its folder's name)."""
        return str(self.given) if self.given is not None and self.given.is_file() else str(Path(self.cfg.out) / "dense_model.pt")

    def known(self) -> bool:
        """Whether the dense model exists here, was given, or is filed in the ledger."""
        return Path(self.path).is_file() or _runs._run(self.cfg, self.log, make=False, ledger=self.ledger) is not None

    def ensure(self) -> None:
        """Makes the weights file if it is not here (the ledger keeps reports, not weights), and says so when the
        remade weights differ from those the ledger's runs of this seed started from."""
        if Path(self.path).is_file():
            return
        _runs._run(self.cfg, self.log, make=True)  # no ledger: the weights themselves are needed
        provenance = _runs.ledger_provenance(self.cfg, self.ledger)
        filed = provenance.get("weights_sha256")
        if filed and filed != _runs.weights_sha256(self.path):
            env = provenance.get("environment", {})
            where = ", ".join(str(v) for v in (env.get("processor"), env.get("cpu_capability"),
                                               env.get("threads") and f"threads {env['threads']}") if v)
            self.log(f"WARNING: the dense model remade in {self.cfg.out} differs from the one the ledger's runs of this "
                     f"seed started from (weights SHA-256 {filed[:12]}, made on {where or 'an unrecorded machine'}; "
                     f"here: {_runs.cpu_model()}, {_runs.torch.backends.cpu.get_cpu_capability()}, "
                     f"threads {_runs.torch.get_num_threads()}); runs made from it are marked in the table")
        elif filed:
            self.log(f"dense model remade bit for bit (weights SHA-256 {filed[:12]})")
        if self.ledger is not None:
            _runs.file_in_ledger(self.cfg, _runs.Report.load(Path(self.cfg.out) / "report.json"), self.ledger)

    def weights_sha256(self) -> Optional[str]:
        filed = _runs.ledger_provenance(self.cfg, self.ledger).get("weights_sha256")
        return filed or (_runs.weights_sha256(self.path) if Path(self.path).is_file() else None)


def _record(report, row: dict) -> dict:
    st, acc, cost = report.stages, report.accuracy, report.cost
    op = st.opt1
    pruned = st.prune
    return dict(row, flops_ratio=cost.flops_ratio, params_ratio=cost.params_ratio,
                acc_dense=acc.dense, acc_prune_step=acc.regularized, acc_after_removal=acc.after_removal,
                acc_finetuned=acc.after_finetune, channels_pruned=pruned.channels_pruned, channels=pruned.channels_total,
                decided_fraction=None if op.final_catalysts is None else op.final_catalysts["fraction_decided"],
                undecided=pruned.undecided_total, stop_rule_fired=op.stop_rule_fired, opt1_epochs=op.epochs_run,
                margin=pruned.margin_log10c, function_err=pruned.verification["function_max_abs_err"],
                max_abs_logit=pruned.verification["max_abs_logit"], wall_s=report.runtime_s["total"],
                gamma=op.gamma, dense_weights_sha256=getattr(report, "dense_weights_sha256", None))


def collect(args, log=print) -> tuple[TableSetting, list, list]:
    """The setting, the records of the runs made or read back, and the runs not made yet (with --finished-only)."""
    setting = SETTINGS[args.setting]
    modes = args.modes.split(",") if args.modes else setting.modes
    methods = args.methods.split(",") if args.methods else setting.methods
    unknown = set(methods) - set(setting.methods)
    if unknown:
        raise SystemExit(f"--methods: {sorted(unknown)} not in the setting's methods {setting.methods}")
    make = not args.finished_only
    records, missing = [], []

    def not_made(what):
        missing.append(what)
        log(f"not made yet: {what}")

    for model, target in setting.rows:
        if args.models and model not in args.models.split(","):
            continue
        root = Path(args.runs_dir) / f"table-{model}-digits"
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else setting.seeds[model]
        for seed in seeds:
            dense = _Dense(setting, model, seed, args, root, log)
            if not make and not dense.known():
                not_made(f"{model} seed {seed} (dense)")
                continue

            def run(cfg, dense=dense):
                report = _runs._run(cfg, log, make=make, ledger=args.ledger, prepare=dense.ensure)
                if report is not None:
                    # the dense weights this run started from: filed with it, or the ones here
                    started = _runs.ledger_provenance(cfg, args.ledger).get("dense_weights_sha256")
                    report.dense_weights_sha256 = started or dense.weights_sha256()
                return report

            for mode in modes:
                base = replace(_base(setting, model, seed, args), mode=mode, dense_checkpoint=dense.path)
                cat = replace(base, method="catalyst", gamma="auto", target_speedup=target)
                cat = replace(cat, out=str(root / f"seed{seed}" / f"catalyst-{mode}-{target}x-{_runs.config_key(cat)}"))
                # Catalyst fixes its baselines' target, so it is made (or read) even when only baselines are asked for
                report = run(cat)
                if report is None:
                    not_made(f"{model} {target}x {mode} seed {seed} (catalyst and its baselines)")
                    continue
                row = {"model": model, "target": target, "mode": mode, "seed": seed}
                if "catalyst" in methods:
                    records.append(_record(report, dict(row, method="catalyst")))
                for method in methods:
                    if method == "catalyst":
                        continue
                    b = replace(base, method=method, gamma=BASELINE_GAMMA[method],
                                target_speedup=report.cost.flops_ratio)
                    b = replace(b, out=str(root / f"seed{seed}" / f"{method}-{mode}-{target}x-{_runs.config_key(b)}"))
                    done = run(b)
                    if done is None:
                        not_made(f"{model} {target}x {mode} seed {seed} ({method})")
                        continue
                    records.append(_record(done, dict(row, method=method)))
    return setting, records, missing


def dense_mismatches(records: list) -> list:
    """(model, seed) whose runs did not all start from the same dense weights."""
    by_seed = {}
    for r in records:
        by_seed.setdefault((r["model"], r["seed"]), set()).add(r.get("dense_weights_sha256"))
    return [k for k, v in by_seed.items() if len(v) > 1]


def _cell(records, key, digits=2):
    return _runs.fmt([r[key] for r in records], digits)


def table(records: list) -> str:
    lines = ["| model | target | mode | method | runs | FLOPs ratio | acc. dense | at prune step | after removal | "
             "after fine-tune | decided | stop rule fired | margin (decades) | opt1 epochs | wall (min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["model"], r["target"], r["mode"], r["method"]) for r in records))
    for model, target, mode, method in keys:
        rs = [r for r in records if (r["model"], r["target"], r["mode"], r["method"]) == (model, target, mode, method)]
        fired = [r["stop_rule_fired"] for r in rs]
        fired_text = "-" if all(f is None for f in fired) else f"{sum(bool(f) for f in fired)}/{len(fired)}"
        decided = "-" if method != "catalyst" else _cell(rs, "decided_fraction")
        margin = "-" if method != "catalyst" else _cell(rs, "margin")
        lines.append(f"| {model} | {target}x | {mode} | {method} | {len(rs)} | {_cell(rs, 'flops_ratio')}x | "
                     f"{_cell(rs, 'acc_dense')} | {_cell(rs, 'acc_prune_step')} | {_cell(rs, 'acc_after_removal')} | "
                     f"{_cell(rs, 'acc_finetuned')} | {decided} | {fired_text} | {margin} | {_cell(rs, 'opt1_epochs', 1)} | "
                     f"{_runs.fmt([r['wall_s'] / 60 for r in rs], 1)} |")
    return "\n".join(lines) + "\n"


def target_table(records: list) -> str:
    lines = ["| model | mode | target | runs | achieved | achieved / target | stop rule fired | acc. at prune step -> after removal |",
             "|---|---|---|---|---|---|---|---|"]
    cat = [r for r in records if r["method"] == "catalyst"]
    for model, mode, target in dict.fromkeys((r["model"], r["mode"], r["target"]) for r in cat):
        rs = [r for r in cat if (r["model"], r["mode"], r["target"]) == (model, mode, target)]
        lines.append(f"| {model} | {mode} | {target}x | {len(rs)} | {_cell(rs, 'flops_ratio')}x | "
                     f"{_runs.fmt([r['flops_ratio'] / target for r in rs], 3)} | "
                     f"{sum(bool(r['stop_rule_fired']) for r in rs)}/{len(rs)} | {_cell(rs, 'acc_prune_step')} -> "
                     f"{_cell(rs, 'acc_after_removal')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=list(SETTINGS), default="resnet56_2x")
    parser.add_argument("--seeds", default=None, help="comma-separated subset of the setting's seeds")
    parser.add_argument("--models", default=None, help="comma-separated subset of the setting's models")
    parser.add_argument("--modes", default=None, help="comma-separated subset of the setting's modes")
    parser.add_argument("--dense-checkpoints", default=None,
                        help="a directory with <model>_seed<k>.pt dense weights to start from instead of training them")
    parser.add_argument("--runs-dir", default=str(_runs.HERE / "runs"))
    parser.add_argument("--results-dir", default=str(_runs.HERE / "results"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-write", action="store_true", help="make the runs only (a partial launch); no tables")
    parser.add_argument("--no-prune-pull", action="store_true",
                        help="Catalyst without the prune side's pull (the control before it; its runs stay cached)")
    parser.add_argument("--finished-only", action="store_true",
                        help="make no run: the tables of the runs that have finished (the rest are listed as not made)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of the setting's methods to make and tabulate (Catalyst's run is "
                             "made or read anyway: it fixes the baselines' target)")
    parser.add_argument("--ledger", default=None,
                        help="where finished runs' reports are filed and read back (default: <results-dir>/ledger; "
                             "'none': no ledger)")
    args = parser.parse_args(argv)
    args.ledger = (Path(args.results_dir) / "ledger" if args.ledger is None
                   else None if args.ledger.lower() == "none" else Path(args.ledger))
    setting, records, missing = collect(args)
    if args.no_write:
        return 0
    md = ("Mean ± std over seeds. Accuracies (%) with BatchNorm statistics re-estimated; 'at prune step' is the "
          "regularized model right before removal, 'after removal' the physically smaller model before fine-tuning. "
          "Baselines are pruned to the FLOPs ratio of the Catalyst run of the same seed and mode. 'decided': fraction "
          "of channels Catalyst decided by itself or at the end of its budget (every other channel is kept). Wall "
          "time on a shared 2-core CPU.\n\n" + table(records))
    mismatched = dense_mismatches(records)
    if mismatched:
        md += ("\n**Not comparable**: the runs of " + ", ".join(f"{m} seed {k}" for m, k in mismatched) + " did not all "
               "start from the same dense weights (a dense model remade on another machine differed from the one "
               "filed in the ledger); see `dense_weights_sha256` in the JSON.\n")
    if args.setting == "targets" or len({r["target"] for r in records}) > 1:
        md += "\nAchieved / target FLOPs ratio (Catalyst):\n\n" + target_table(records)
    models = sorted({m for m, _ in setting.rows})
    header = (f"<!-- generated by experiments/paper_table.py --setting {args.setting}; do not edit -->\n"
              f"Setting `{args.setting}` on digits: " + "; ".join(
                  f"{m} seeds {setting.seeds[m]}, epochs dense/opt1 budget/fine-tune {'/'.join(map(str, setting.budgets[m]))}"
                  for m in models)
              + ("" if setting.train_limit is None else f", first {setting.train_limit} training samples")
              + f". {_runs.environment()['date']}, torch {_runs.torch.__version__}."
              + (" **Partial**, not made yet: " + "; ".join(missing) + " (the 'runs' column counts the runs tabulated)."
                 if missing else "") + "\n\n")
    if args.no_prune_pull:
        header = header.replace("\n\n", " Catalyst **without the prune side's pull** (`--no-prune-pull`).\n\n", 1)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"paper_table_{args.setting}" + ("_no_pull" if args.no_prune_pull else "")
    (out / f"{name}.md").write_text(header + md)
    (out / f"{name}.json").write_text(_runs.json.dumps(
        {"environment": _runs.environment(), "setting": args.setting, "records": records}, indent=1, default=float))
    print(header + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
