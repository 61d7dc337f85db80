"""The magnitude-bias claim, tested cleanly: prune a model and the same model with its channels rescaled by
random factors that leave its function unchanged, and compare the decisions.

    python experiments/rescaling_bias.py                      # quick: small CNN on digits, 3 seeds, CPU
    python experiments/rescaling_bias.py --setting smoke      # CI: seconds, figures meaningless

A channel's importance does not change when the network computes the same function, so a method without
magnitude bias decides the same way on both models. Rescaling (per seed, drawn once): for every target with
one producer, one BatchNorm and no residual coupling, BN scale and shift of channel ``i`` times ``s_i`` and the
consumers' input column ``i`` divided by ``s_i`` (exact across the ReLU, ``relu(s x) = s relu(x)`` for
``s > 0``), ``log2 s_i`` uniform in ``[-2, 2]``; other channels ``s = 1``. Every method runs from both dense models
to the same target speed-up (Catalyst by its feedback, the baselines by their ranking) with the same budgets.
Reported per method: the Spearman correlation between ``log s_i`` and the decision on the rescaled model
(0 = no bias; negative = channels made small are pruned), and the fraction of channels decided the same way
on both models (1 = invariant). Writes ``results/rescaling_bias_<setting>.{md,json}``.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import _runs
from catalyst_fused.models import build_model
from catalyst_fused.pruning import PruneConfig, find_targets
from catalyst_fused.pruning.methods import spearman
from catalyst_fused.pruning.workflow.runner import input_format


@dataclass
class BiasSetting:
    seeds: list
    dense_epochs: int
    epochs: int
    finetune_epochs: int
    target: float = 2.0
    # (label, method, mode, gamma)
    methods: list = field(default_factory=lambda: [("catalyst-group", "catalyst", "group", "auto"),
                                                   ("catalyst-bn", "catalyst", "bn", "auto"),
                                                   ("slimming", "slimming", "bn", _runs.GAMMA["slimming"]),
                                                   ("group_lasso", "group_lasso", "group", _runs.GAMMA["group_lasso"])])
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    extra: dict = field(default_factory=dict)


SETTINGS = {
    "smoke": BiasSetting([0], dense_epochs=2, epochs=3, finetune_epochs=0, target=1.5, train_limit=256, test_limit=96,
                         extra={"noise_draws": 1, "latency_batch": 4}),
    "quick": BiasSetting([0, 1, 2], dense_epochs=15, epochs=30, finetune_epochs=0),
}
LOG2_RANGE = 2.0


def rescalable(model: nn.Module, targets) -> list:
    """Targets whose channels can be rescaled without changing the function: one producer, one BN, consumers
    reached through a channel-wise positively homogeneous op (the small CNN's and VGG's ReLU; a ResNet's
    residual groups are left out)."""
    return [t for t in targets if len(t.producers) == 1 and len(t.bns) == 1 and t.consumers
            and all(p.start == 0 and p.offset == 0 and p.count == t.channels for p in (*t.producers, *t.bns))]


def rescale_(model: nn.Module, targets, seed: int) -> torch.Tensor:
    """Rescales ``model`` in place (see the module docstring); returns ``s`` per channel of every target
    (``targets`` order, 1 for channels not rescaled)."""
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(10_000 + seed)
    ok = {t.name for t in rescalable(model, targets)}
    factors = []
    with torch.no_grad():
        for t in targets:
            if t.name not in ok:
                factors.append(torch.ones(t.channels, dtype=torch.float64))
                continue
            s = 2.0 ** ((torch.rand(t.channels, generator=gen, dtype=torch.float64) * 2 - 1) * LOG2_RANGE)
            bn = modules[t.bns[0].module]
            bn.weight.mul_(s.to(bn.weight.dtype))
            bn.bias.mul_(s.to(bn.bias.dtype))
            for c in t.consumers:
                w = modules[c.module].weight
                view = [1] * w.dim()
                view[1] = c.count
                w.narrow(1, c.start, c.count).div_(s[c.offset : c.offset + c.count].to(w.dtype).view(view))
            factors.append(s)
    return torch.cat(factors)


def _rescaled_checkpoint(dense_path: str, cfg: PruneConfig, out: Path) -> tuple[str, torch.Tensor, float]:
    """Writes the rescaled dense weights next to the dense ones; returns (path, s per channel, max logit change)."""
    channels, size = input_format(cfg)
    model = build_model(cfg.model, num_classes=10, in_channels=channels)
    model.load_state_dict(torch.load(dense_path, weights_only=True))
    targets = find_targets(model, (channels, size, size))
    before = copy.deepcopy(model).eval()
    s = rescale_(model, targets, cfg.seed)
    x = torch.randn(16, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        change = float((model.eval()(x) - before(x)).abs().max())
    path = out / "rescaled_dense.pt"
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return str(path), s, change


def collect(args, log=print):
    setting = SETTINGS[args.setting]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else setting.seeds
    root = Path(args.runs_dir) / "rescaling-small_cnn-digits"
    records = []
    for seed in seeds:
        base = PruneConfig(model="small_cnn", dataset="digits", seed=seed, dense_epochs=setting.dense_epochs,
                           epochs=setting.epochs, finetune_epochs=setting.finetune_epochs, train_limit=setting.train_limit,
                           test_limit=setting.test_limit, device=args.device, progress=False, plots=False,
                           target_speedup=setting.target, **setting.extra)
        dense_cfg = replace(base, epochs=0, finetune_epochs=0, target_speedup=None)
        dense_cfg = replace(dense_cfg, out=str(root / f"seed{seed}" / f"dense-{_runs.config_key(dense_cfg)}"))
        _runs._run(dense_cfg, log)
        dense = str(Path(dense_cfg.out) / "dense_model.pt")
        scaled, s, change = _rescaled_checkpoint(dense, base, Path(dense_cfg.out))
        for label, method, mode, gamma in setting.methods:
            pruned = {}
            for which, ckpt in (("unscaled", dense), ("rescaled", scaled)):
                cfg = replace(base, method=method, mode=mode, gamma=gamma, dense_checkpoint=ckpt)
                cfg = replace(cfg, out=str(root / f"seed{seed}" / f"{label}-{which}-{_runs.config_key(cfg)}"))
                report = _runs._run(cfg, log)
                pruned[which] = (torch.tensor(report.stages.prune.channels["pruned"], dtype=torch.float64),
                                 report.cost.flops_ratio)
            scaled_idx = s != 1
            p_un, p_sc = pruned["unscaled"][0], pruned["rescaled"][0]
            records.append({"method": label, "seed": seed, "max_logit_change_of_rescaling": change,
                            "rho_log_s_vs_pruned": spearman(torch.log(s[scaled_idx]), p_sc[scaled_idx]),
                            "rho_log_s_vs_pruned_unscaled_run": spearman(torch.log(s[scaled_idx]), p_un[scaled_idx]),
                            "agreement": float((p_un == p_sc).double().mean()),
                            "pruned_unscaled": int(p_un.sum()), "pruned_rescaled": int(p_sc.sum()),
                            "flops_unscaled": pruned["unscaled"][1], "flops_rescaled": pruned["rescaled"][1],
                            "channels_rescaled": int(scaled_idx.sum())})
    return setting, records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=list(SETTINGS), default="quick")
    parser.add_argument("--seeds", default=None)
    parser.add_argument("--runs-dir", default=str(_runs.HERE / "runs"))
    parser.add_argument("--results-dir", default=str(_runs.HERE / "results"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    setting, records = collect(args)
    rows = ["| method | runs | rho(log s, pruned) on the rescaled model | same rho on the unscaled run (control) | "
            "decision agreement | pruned unscaled -> rescaled | FLOPs unscaled -> rescaled |", "|---|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == label]
        rows.append(f"| {label} | {len(rs)} | {_runs.fmt([r['rho_log_s_vs_pruned'] for r in rs])} | "
                    f"{_runs.fmt([r['rho_log_s_vs_pruned_unscaled_run'] for r in rs])} | "
                    f"{_runs.fmt([r['agreement'] for r in rs], 3)} | "
                    f"{_runs.fmt([r['pruned_unscaled'] for r in rs], 1)} -> {_runs.fmt([r['pruned_rescaled'] for r in rs], 1)} | "
                    f"{_runs.fmt([r['flops_unscaled'] for r in rs])} -> {_runs.fmt([r['flops_rescaled'] for r in rs])} |")
    worst = max(r["max_logit_change_of_rescaling"] for r in records)
    md = (f"Mean ± std over seeds. s_i = 2^U(-{LOG2_RANGE:g}, {LOG2_RANGE:g}) per channel of every rescalable target "
          f"(function unchanged: max logit change {worst:.1e}); every method pruned both models to {setting.target}x. "
          "The control column correlates the same s with the decisions of the unscaled run, which never saw s: "
          "its spread is what chance gives.\n\n" + "\n".join(rows) + "\n")
    shim = argparse.Namespace(setting=args.setting, results_dir=args.results_dir)
    desc = _runs.Setting(model="small_cnn", dataset="digits", seeds=sorted({r["seed"] for r in records}), c0s=[1.0],
                         dense_epochs=setting.dense_epochs, epochs=setting.epochs, finetune_epochs=setting.finetune_epochs,
                         train_limit=setting.train_limit)
    _runs.write_results(shim, "rescaling_bias", desc, md, {"records": records})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
