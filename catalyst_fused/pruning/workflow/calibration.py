"""The pruner a run attaches, its gamma and what the catalysts' dynamics predict for the run (the
``calibrate`` stage), and the hooks of an opt1 epoch.

A target speed-up is no longer searched for by bisection over whole opt1 runs: Catalyst reaches it within
the one opt1 run, by the pruner's feedback on the undecided catalysts (:mod:`..control`). What this stage
calibrates is the sparsity strength: with ``gamma="auto"`` the pruner picks the gamma whose no-loss flow
decides a channel 2% off the threshold within half of the opt1 step budget (:mod:`..dynamics`), and the run
logs and reports the predicted decision time, the end-of-budget step and any warning (budget too short,
``kappa`` out of reach).
"""
from __future__ import annotations

import math
from typing import Callable

from ..pruner import Pruner
from .config import PruneConfig
from .report import Calibration

__all__ = ["opt1_hooks", "gamma_t", "make_pruner", "opt1_steps", "calibrate"]


def gamma_t(base: float, warmup: int, epoch: int) -> float:
    """gamma of opt1 epoch ``epoch`` (0-based): linear warm-up over ``warmup`` epochs, then ``base``."""
    return base * min(1.0, (epoch + 1) / (warmup + 1))


def opt1_hooks(pruner, base_gamma: float, cfg: PruneConfig) -> tuple[Callable, Callable, Callable]:
    """``(before_epoch, after_backward, after_step)`` of an opt1 epoch: the gamma schedule and the pruner's
    two calls around the optimizer step."""

    def before_epoch(e: int) -> None:
        if pruner.gamma is not None:
            pruner.gamma = gamma_t(base_gamma, cfg.gamma_warmup, e)

    return before_epoch, pruner.regularize, pruner.after_step


def opt1_steps(cfg: PruneConfig, train_size: int) -> int:
    """Optimizer steps of the whole opt1 budget."""
    return max(cfg.epochs, 1) * max(math.ceil(train_size / cfg.batch_size), 1)


def make_pruner(model, cfg: PruneConfig, c0: float, input_shape, targets=None, budget_steps=None) -> Pruner:
    """The pruner a run with ``cfg`` attaches to ``model`` (``targets``: reuse an earlier trace)."""
    return Pruner(model, input_shape, method=cfg.method, mode=cfg.mode, formulation=cfg.formulation, gamma=cfg.gamma,
                  c0=c0, kappa=cfg.kappa, bn_beta=cfg.bn_beta, target_speedup=cfg.target_speedup,
                  norm_threshold=cfg.norm_threshold, catalyst_lr=cfg.catalyst_lr, targets=targets, round_to=cfg.round_to,
                  budget_steps=budget_steps, prune_pull=cfg.prune_pull,
                  max_prune_fraction=cfg.max_prune_fraction)


def calibrate(run) -> Calibration:
    """Resolves the pruner's gamma (``"auto"``: from the opt1 budget) for the opt1 learning rate and momentum,
    and records the dynamics' predictions (logged, with their warnings)."""
    cfg, pruner = run.cfg, run.pruner
    steps_per_epoch = max(math.ceil(len(run.train_set) / cfg.batch_size), 1)
    lr = cfg.opt1_learning_rate
    if pruner.gamma_auto:
        pruner.resolve_gamma(lr=lr, momentum=cfg.momentum)
    gamma = pruner.gamma
    lam = lr * gamma / (1 - cfg.momentum)
    pred = {}
    if pruner.method.name == "catalyst":
        pred = pruner.predictions(lr, cfg.momentum, cfg.weight_decay)
        k = pred["k"]
        run.log(f"threshold: k {k['min']:.3f}-{k['max']:.3f} (mean {k['mean']:.3f}), c* = 1/sqrt(k) "
                f"{pred['threshold_c_star']['min']:.3f}-{pred['threshold_c_star']['max']:.3f}; catalysts start at u = c "
                f"sqrt(k) = {pruner.c0:g}")
        off = pred.get("steps_to_decide_offset", {}).get("steps", math.inf)
        run.log(f"gamma {gamma:.4g}{' (auto)' if pruner.gamma_auto else ''}, opt1 lr {lr:g}: lam {lam:.3g}; a channel "
                f"{pred['steps_to_decide_offset']['offset']:.0%} off the threshold decides after ~{off:.0f} steps "
                f"(opt1 epoch {off / steps_per_epoch:.1f} of {cfg.epochs}); undecided channels are decided by their "
                f"side at step {pruner.force_step} (epoch {pruner.force_step / steps_per_epoch:.1f})"
                + (f"; target {cfg.target_speedup}x by feedback on the undecided catalysts" if cfg.target_speedup else ""))
        for w in pred["warnings"]:
            run.log(f"warning: {w}")
    return Calibration(gamma=gamma, gamma_auto=pruner.gamma_auto, opt1_lr=lr, rate_lam=lam,
                       budget_steps=pruner.budget_steps, steps_per_epoch=steps_per_epoch, target_speedup=cfg.target_speedup,
                       predictions=pred, warnings=list(pred.get("warnings", [])))
