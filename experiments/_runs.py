"""The pruning runs the three experiments share, made once and cached.

Every run goes through the one interface, :func:`catalyst_fused.pruning.run_pipeline`, with the same model,
data, dense weights, epoch budgets and fine-tuning; only ``method`` (and its strength ``gamma``) differs:

* per seed, Catalyst runs first at each ``c0`` of the setting with its own decision rule (``c > 1``, decided
  channels only); the first of these trains the dense model, whose weights every other run of that seed
  starts from (``--dense-checkpoint``);
* each baseline then runs once per Catalyst run with ``target_speedup`` = the FLOPs ratio Catalyst reached,
  removing channels in the order of its own statistic until that ratio is reached: the speed-ups are
  matched by construction (up to one channel's worth of FLOPs).

A run lives in a folder named by a hash of its whole configuration (:func:`config_key`), checked again on
reuse; a run whose ``report.json`` already exists is read back instead of re-run (an interrupted one is
resumed), so the three scripts together cost the runs once, settings that share runs (``quick`` is part of
``full``) share them, and a changed option (a baseline's gamma, a budget) makes a new run. Results (tables, plots, JSON) go to ``experiments/results/`` by default.

A runs directory lives on one machine and its checkpoints are large; a finished run's report is small. With a
*ledger* (``paper_table.py`` keeps one under ``results/ledger/``, committed with the tables) every finished run's
report is also filed there under the same folder names, and a run found in the ledger is read back instead of
made again: a table that needs more CPU time than one machine session gives grows over several sessions. A run
that must still be made from a dense model known only to the ledger remakes that dense run first, and every
entry records the SHA-256 of the dense weights its run started from, so a remade dense model that differs
(another CPU, another torch) is caught instead of silently mixed into the same row.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import json
import math
import os
import platform
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import sys

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # `python experiments/x.py` from a checkout uses this checkout's package
    sys.path.insert(0, str(HERE.parent))

from catalyst_fused.pruning import PruneConfig, Report, run_pipeline  # noqa: E402
from catalyst_fused.pruning.workflow.config import RUN_ONLY_FIELDS  # noqa: E402
from catalyst_fused.pruning.methods import METHODS  # noqa: E402
from catalyst_fused.pruning.latency import cpu_model  # noqa: E402

# Strength of each method's sparsity term. Catalyst's is the pipeline default (gamma from the opt1 budget). Each
# baseline's was picked from {0.003, 0.01, 0.03} on the quick digits setting (seed 0, 4x target) as the one with
# the best accuracy right after removal (the table is in experiments/README.md); random pruning has none.
GAMMA = {"catalyst": "auto", "group_lasso": 0.01, "slimming": 0.01, "lats_channel": 0.01, "lats_group": 0.03,
         "random": 0.0}


@dataclass
class Setting:
    model: str
    dataset: str
    seeds: list
    c0s: list
    dense_epochs: int
    epochs: int
    finetune_epochs: int
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    batch_size: int = 64
    extra: dict = field(default_factory=dict)


SETTINGS = {
    # CI: seconds per run, checks that everything is produced (figures meaningless)
    # (c0 1.3 with kappa 0.1 decides at once, so that something is pruned and every code path runs)
    "smoke": Setting("small_cnn", "digits", [0, 1], [1.3], dense_epochs=2, epochs=3, finetune_epochs=1,
                     train_limit=320, test_limit=128, extra={"kappa": 0.1, "noise_draws": 2}),
    # default: the pipeline's digits defaults, 3 seeds, one Catalyst operating point (c0 1 gave 3.2x in a
    # trial run; ~10 min on 2 cores)
    "quick": Setting("small_cnn", "digits", [0, 1, 2], [1.0], dense_epochs=15, epochs=50, finetune_epochs=5),
    # two operating points on digits (c0 1.0 / 1.2 gave 3.2x / 13x in trial runs; 0.9 gave 1.9x); shares
    # the c0 = 1 runs with "quick"
    "full": Setting("small_cnn", "digits", [0, 1, 2], [1.0, 1.2], dense_epochs=15, epochs=50, finetune_epochs=5),
    # CIFAR-10 from a local copy (--data-root): ResNet-56 in BN mode, as in the paper's first table row
    "cifar10": Setting("resnet56", "cifar10", [0, 1, 2], [1.0, 1.2], dense_epochs=160, epochs=60, finetune_epochs=40,
                       batch_size=128, extra={"lr": 0.1, "mode": "bn"}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--setting", choices=list(SETTINGS), default="quick")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the setting's)")
    parser.add_argument("--data-root", default=None, help="dataset directory for the cifar10 setting")
    parser.add_argument("--runs-dir", default=str(HERE / "runs"), help="where runs are made and cached")
    parser.add_argument("--results-dir", default=str(HERE / "results"), help="where tables and plots go")
    parser.add_argument("--device", default="cpu")


def _methods(args) -> list[str]:
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if "catalyst" not in names:
        names.insert(0, "catalyst")  # Catalyst's runs fix the matched speed-ups
    return names


def _run(cfg: PruneConfig, log, make: bool = True, ledger: Optional[Path] = None,
         prepare=None) -> Optional[Report]:
    """The run of ``cfg``: read back if it finished before with the same configuration (in its folder, or in
    ``ledger``), else made (an interrupted one is resumed; with ``make=False``: None). ``prepare()`` is called
    before a run is made (e.g. to remake the dense model it starts from). A cached run made with another
    configuration is refused, not reused."""
    out = Path(cfg.out)
    key = config_key(cfg)
    identity = json.loads(json.dumps(_identity(cfg), default=str))
    key_file = out / "config_key.json"
    if key_file.exists():  # the folder's name is the key; the file inside must agree (no stale reuse)
        _check_key(key_file, key, identity)
    path = out / "report.json"
    if path.exists():
        report = Report.load(path)
        if report.status == "done":
            if ledger is not None:
                file_in_ledger(cfg, report, ledger)
            return report
    if ledger is not None:
        report = read_ledger(cfg, ledger)
        if report is not None:
            return report
    if not make:
        return None
    if prepare is not None:
        prepare()
    out.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps({"key": key, "config": _identity(cfg)}, indent=1, default=str))
    log(f"run: {cfg.method} seed {cfg.seed} -> {cfg.out}")
    report = run_pipeline(cfg, resume=(out / "checkpoint.pt").exists(), log=lambda msg: log(f"  {msg}"))
    if report.status != "done":
        raise RuntimeError(f"run {cfg.out} did not finish: {report}")
    if ledger is not None:
        file_in_ledger(cfg, report, ledger)
    return report


def _check_key(key_file: Path, key: str, identity: dict) -> None:
    saved = json.loads(key_file.read_text())
    if saved.get("key") != key or saved.get("config") != identity:
        raise SystemExit(f"{key_file.parent}: this cached run was made with another configuration "
                         f"({saved.get('config')}); delete it or use another --runs-dir")


# ------------------------------------------------------------------------------------------ the ledger
def ledger_entry(cfg: PruneConfig, ledger: Path) -> Path:
    """A run's folder in the ledger: the last three parts of its run folder (``<group>/seed<k>/<name>-<key>``)."""
    out = Path(cfg.out)
    return Path(ledger) / out.parent.parent.name / out.parent.name / out.name


def weights_sha256(path) -> str:
    """SHA-256 of a state dict's tensors (names, dtypes, shapes and bytes, in name order): equal for the same
    weights whatever the file's container bytes."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not torch.is_tensor(t):
            continue
        t = t.detach().cpu().reshape(-1)  # 1-d: a 0-d tensor cannot be viewed as bytes
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_in_ledger(cfg: PruneConfig, report: Report, ledger: Path) -> Path:
    """Files a finished run's report (gzipped) and its provenance in the ledger; an entry already there is kept
    (the ledger holds the run the tables were made from, not a remake)."""
    entry = ledger_entry(cfg, ledger)
    if (entry / "provenance.json").exists():
        return entry
    entry.mkdir(parents=True, exist_ok=True)
    out = Path(cfg.out)
    provenance = {"key": config_key(cfg), "config": _identity(cfg), "environment": environment(),
                  "weights_sha256": (weights_sha256(out / "dense_model.pt") if not cfg.epochs
                                     and (out / "dense_model.pt").exists() else None),
                  "dense_weights_sha256": (weights_sha256(cfg.dense_checkpoint) if cfg.dense_checkpoint
                                           and Path(cfg.dense_checkpoint).exists() else None)}
    _write_atomic(entry / "report.json.gz", gzip.compress(json.dumps(report.to_dict(), allow_nan=False).encode(), mtime=0))
    _write_atomic(entry / "provenance.json", json.dumps(provenance, indent=1, default=str).encode())  # last: marks it complete
    return entry


def read_ledger(cfg: PruneConfig, ledger: Path) -> Optional[Report]:
    """The report filed in the ledger for exactly this configuration, or None."""
    entry = ledger_entry(cfg, ledger)
    if not (entry / "provenance.json").exists():
        return None
    _check_key(entry / "provenance.json", config_key(cfg), json.loads(json.dumps(_identity(cfg), default=str)))
    try:
        return Report.from_dict(json.loads(gzip.decompress((entry / "report.json.gz").read_bytes())))
    except (OSError, EOFError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"{entry}: this ledger entry's report.json.gz cannot be read ({type(error).__name__}: "
                         f"{error}); restore it from git, or delete the entry to make the run again") from error


def ledger_provenance(cfg: PruneConfig, ledger: Optional[Path]) -> dict:
    """The provenance filed with a run (empty without a ledger or an entry)."""
    if ledger is None or not (ledger_entry(cfg, ledger) / "provenance.json").exists():
        return {}
    return json.loads((ledger_entry(cfg, ledger) / "provenance.json").read_text())


def _identity(cfg: PruneConfig) -> dict:
    """What makes a run: its whole configuration except where it is written and how it is shown."""
    d = cfg.to_dict()
    for k in RUN_ONLY_FIELDS:
        d.pop(k)
    if d.get("dense_checkpoint"):  # the dense weights are identified by the run that made them, not the path
        d["dense_checkpoint"] = Path(d["dense_checkpoint"]).parent.name
    # the prune side's pull came later: runs without it keep the keys they were cached under, and runs it
    # cannot change (other methods, no opt1) are not made again
    if not d.get("prune_pull", False) or d["method"] != "catalyst" or not d["epochs"]:
        d.pop("prune_pull", None)
    # the width floor came later still: a dense-only run (no opt1) keeps its key, every other run is made again
    if not d["epochs"]:
        d.pop("max_prune_fraction", None)
    return d


def config_key(cfg: PruneConfig) -> str:
    """A hash of the whole configuration of a run (:func:`_identity`)."""
    return hashlib.sha256(json.dumps(_identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _record(report: Report, seed: int, c0: float) -> dict:
    prune, acc, cost = report.stages.prune, report.accuracy, report.cost
    return {
        "method": report.method, "seed": seed, "catalyst_c0": c0,
        "target_speedup": report.config.target_speedup, "flops_ratio": cost.flops_ratio,
        "params_ratio": cost.params_ratio, "channels_pruned": prune.channels_pruned,
        "channels_total": prune.channels_total, "undecided": prune.undecided_total,
        "acc_dense": acc.dense, "acc_regularized": acc.regularized, "acc_after_removal": acc.after_removal,
        "acc_finetuned": acc.after_finetune, "margin": prune.margin_log10c, "statistic": prune.statistic,
        "flips": prune.robustness, "bias": prune.magnitude_bias, "channels": prune.channels,
        "gamma": report.config.gamma, "runtime_s": report.runtime_s["total"],
    }


def collect(args, log=print) -> tuple[Setting, list[dict]]:
    """Makes (or reads back) every run the experiments need; one record per run."""
    setting = SETTINGS[args.setting]
    if args.seeds:
        setting = replace(setting, seeds=[int(s) for s in args.seeds.split(",")])
    if setting.dataset != "digits" and args.data_root is None:
        raise SystemExit(f"--setting {args.setting} needs --data-root (a local {setting.dataset} copy)")
    methods = _methods(args)
    base = PruneConfig(model=setting.model, dataset=setting.dataset, data_root=args.data_root,
                       dense_epochs=setting.dense_epochs, epochs=setting.epochs, finetune_epochs=setting.finetune_epochs,
                       train_limit=setting.train_limit, test_limit=setting.test_limit, batch_size=setting.batch_size,
                       device=args.device, progress=False, plots=False, latency="eager", **setting.extra)
    # Every run's folder is named by the hash of its whole configuration (config_key), so a changed gamma,
    # budget or option makes a new run instead of reusing a stale one; settings that share runs share them.
    root = Path(args.runs_dir) / f"{setting.model}-{setting.dataset}"

    def located(cfg: PruneConfig, name: str) -> PruneConfig:
        return replace(cfg, out=str(root / f"seed{cfg.seed}" / f"{name}-{config_key(cfg)}"))

    records = []
    for seed in setting.seeds:
        dense = None
        for c0 in setting.c0s:
            cfg = located(replace(base, method="catalyst", seed=seed, c0=c0, gamma=GAMMA["catalyst"], dense_checkpoint=dense),
                          f"catalyst_c0{c0}")
            report = _run(cfg, log)
            dense = dense or str(Path(cfg.out) / "dense_model.pt")
            records.append(_record(report, seed, c0))
            target = report.cost.flops_ratio
            for method in methods:
                if method == "catalyst":
                    continue
                cfg_b = located(replace(base, method=method, seed=seed, gamma=GAMMA[method], dense_checkpoint=dense,
                                        target_speedup=target), f"{method}_at_c0{c0}")
                records.append(_record(_run(cfg_b, log), seed, c0))
    return setting, records


# ------------------------------------------------------------------------------------------ formatting
def mean_std(values) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values, digits: int = 2) -> str:
    m, s = mean_std(values)
    return "n/a" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def environment() -> dict:
    # the CPU and the vector ISA torch dispatches to change float reduction orders, so a run remade on another
    # machine can differ in its last bits; recorded so that a ledger entry says where it was made
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "processor": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def write_results(args, name: str, setting: Setting, markdown: str, data: dict) -> Path:
    """``<results>/<name>_<setting>.md`` and ``.json`` (the markdown is also printed)."""
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"<!-- generated by experiments/{name}.py --setting {args.setting}; do not edit -->\n"
              f"Setting `{args.setting}`: {setting.model} on {setting.dataset}, seeds {setting.seeds}, Catalyst c0 "
              f"{setting.c0s}, epochs dense/opt1/fine-tune {setting.dense_epochs}/{setting.epochs}/{setting.finetune_epochs}"
              f"{'' if setting.train_limit is None else f', first {setting.train_limit} training samples'}; "
              f"gamma {', '.join(f'{k} {v}' for k, v in GAMMA.items())}. {environment()['date']}, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads.\n\n")
    path = out / f"{name}_{args.setting}.md"
    path.write_text(header + markdown)
    (out / f"{name}_{args.setting}.json").write_text(json.dumps({"environment": environment(), "setting": args.setting,
                                                                 **data}, indent=1, default=float))
    print(header + markdown)
    return path


def start(doc: str, argv=None):
    """Parses a script's arguments and collects its runs: ``(args, setting, records, methods in order)``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    setting, records = collect(args)
    return args, setting, records, list(dict.fromkeys(r["method"] for r in records))


def first_run_per_method(records: list, methods: list) -> list:
    return [next(r for r in records if r["method"] == m) for m in methods]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, args, name: str) -> Path:
    """Saves ``fig`` as ``<results>/<name>_<setting>.png`` and closes it."""
    path = Path(args.results_dir) / f"{name}_{args.setting}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path
