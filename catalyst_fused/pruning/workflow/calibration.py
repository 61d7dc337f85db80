"""c0 for a target speed-up: geometric bisection over opt1 trial runs.

Methods that rank channels reach a target FLOPs ratio directly (``reaches_target_by_ranking``); Catalyst
decides by its own rule, so its aggressiveness knob ``c0`` is calibrated instead: each trial runs opt1 from
the dense weights **through the same hooks and epoch loop as the opt1 stage** (:func:`opt1_hooks`,
:func:`~.training.epoch_loop`), by default the full budget with the stop rule (``calib_epochs = 0``), and
predicts the FLOPs ratio with the pruner's own decisions; the smallest tested ``c0`` whose prediction
reaches the target is used (``calib_c0_max`` if none does, reported as not reached).
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch

from ..metrics import count_flops
from ..pruner import Pruner
from .config import PruneConfig
from .report import Calibration
from .training import epoch_loop

__all__ = ["opt1_hooks", "gamma_t", "make_pruner", "predict_speedup", "calibrate_c0"]


def gamma_t(cfg: PruneConfig, epoch: int) -> float:
    """gamma of opt1 epoch ``epoch`` (0-based): linear warm-up over ``gamma_warmup`` epochs, then constant."""
    return cfg.gamma * min(1.0, (epoch + 1) / (cfg.gamma_warmup + 1))


def opt1_hooks(pruner, cfg: PruneConfig) -> tuple[Callable, Callable, Callable]:
    """``(before_epoch, after_backward, after_step)`` of an opt1 epoch: the gamma schedule and the pruner's
    two calls around the optimizer step."""

    def before_epoch(e: int) -> None:
        pruner.gamma = gamma_t(cfg, e)

    return before_epoch, pruner.regularize, pruner.after_step


def make_pruner(model, cfg: PruneConfig, c0: float, input_shape, targets=None) -> Pruner:
    """The pruner a run with ``cfg`` attaches to ``model`` (``targets``: reuse an earlier trace)."""
    return Pruner(model, input_shape, method=cfg.method, mode=cfg.mode, formulation=cfg.formulation, gamma=cfg.gamma,
                  c0=c0, kappa=cfg.kappa, bn_beta=cfg.bn_beta, target_speedup=cfg.target_speedup,
                  norm_threshold=cfg.norm_threshold, catalyst_lr=cfg.catalyst_lr, targets=targets, round_to=cfg.round_to)


def predict_speedup(dense_model, cfg: PruneConfig, train_set, c0: float, input_shape, device="cpu", targets=None,
                    loss_fn=None) -> float:
    """The FLOPs ratio (dense / pruned) that opt1 with ``c0`` reaches from ``dense_model`` (a trial on a copy;
    ``dense_model`` is not changed). With ``calib_epochs == 0`` the trial is the opt1 the pipeline runs (same
    budget, stop rule, data order, hooks); a positive ``calib_epochs`` runs a shorter trial (cheaper, but it
    under-predicts: channels keep splitting after it)."""
    model = copy.deepcopy(dense_model)
    pruner = make_pruner(model, cfg, c0, input_shape, targets)
    opt = pruner.attach_optimizer(
        torch.optim.SGD(pruner.param_groups(cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)))
    before_epoch, after_backward, after_step = opt1_hooks(pruner, cfg)
    exact = not cfg.calib_epochs

    def after_epoch(e, rec):
        return exact and pruner.all_decided()  # the pipeline's stop rule

    epoch_loop("opt1", cfg.calib_epochs or cfg.epochs, start=0, model=model, optimizer=opt, train_set=train_set,
               batch_size=cfg.batch_size, seed=cfg.seed, device=device, before_epoch=before_epoch,
               after_backward=after_backward, after_step=after_step, after_epoch=after_epoch, loss_fn=loss_fn)
    dense = count_flops(dense_model, input_shape)["macs"]
    pruner.prune()
    return dense / count_flops(model, input_shape)["macs"]


def calibrate_c0(run, log: Callable[[str], None] = None) -> Calibration:
    """Geometric bisection over ``c0`` in ``[1 / calib_c0_max, calib_c0_max]`` for ``run.cfg.target_speedup``
    (see the module docstring); the global RNG state is left as it was."""
    from .runner import rng_state, set_rng_state

    cfg, log = run.cfg, log or run.log
    rng = rng_state()
    cache: dict[float, float] = {}

    def ratio(c0: float) -> float:
        if c0 not in cache:
            cache[c0] = predict_speedup(run.model, cfg, run.train_set, c0, run.input_shape, run.device, run.targets,
                                        run.loss_fn)
            log(f"  calibrate: c0={c0:.4f} -> predicted speed-up {cache[c0]:.3f}x")
        return cache[c0]

    # c0 < 1 starts every channel on the keep side (prunes less), c0 > 1 on the prune side: search both,
    # geometrically, in [1 / calib_c0_max, calib_c0_max].
    lo, hi = 1.0 / cfg.calib_c0_max, cfg.calib_c0_max
    trials = [{"c0": hi, "predicted_speedup": ratio(hi)}]
    best = hi
    reached = trials[0]["predicted_speedup"] >= cfg.target_speedup
    if reached:
        for _ in range(cfg.calib_iters):
            mid = math.sqrt(lo * hi)
            r = ratio(mid)
            trials.append({"c0": mid, "predicted_speedup": r})
            if r >= cfg.target_speedup:
                hi = best = mid
            else:
                lo = mid
    set_rng_state(rng)
    return Calibration(target_speedup=cfg.target_speedup, c0=best, reached_in_calibration=reached, trials=trials,
                       calib_epochs=cfg.calib_epochs,
                       method="geometric bisection on [1/calib_c0_max, calib_c0_max]; smallest tested c0 whose predicted "
                              "speed-up reaches the target (calib_epochs 0: each trial is the full opt1 run, so the "
                              "prediction is exact)")
