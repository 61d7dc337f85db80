"""The Catalyst pruning pipeline (catalyst-method.md section 5), resumable epoch by epoch.

    dense training -> [c0 calibration for a target speed-up] -> opt1 (L + gamma_t R, until every channel is
    decided or the budget ends) -> decide (prune decided channels with c > 1) -> physical removal (verified)
    -> fine-tuning -> report (JSON + plots)

``method`` picks what opt1 does and how channels are decided: Catalyst (the default, described below) or
one of the baselines of :mod:`.methods` (Group Lasso, network slimming, LATS elementwise and group), which
share every other stage.

Choices **[our reading]**, stated here once:

* Formulation (``formulation``): ``"regularizer"`` (the default, section 4a): the catalysts ``d`` appear
  only in ``R``; nothing has to be removed afterwards. ``"bypass"`` (section 4b): the extended model
  ``psi(x) = D x - Dbar x + sigma(x)``, where ``d`` enters the forward pass too; after the removal, opt2
  drives ``d - dbar`` of the kept channels to 0 and folds the bypass away (:mod:`.bypass` states its
  choices). The stage ``opt2`` is skipped by the regularizer formulation.
* Catalysts are trained by the same SGD optimizer in their **own parameter group with no weight decay but
  the same momentum as the weights** (``catalyst_lr`` defaults to ``lr``). Weight decay on ``d`` would pull
  every ``c`` towards 0 (keep) regardless of the data. Momentum is kept for symmetry: without the loss,
  the penalty moves ``d`` by ``lr_d * gamma * n`` and ``n`` by ``lr_w * gamma * d`` per step, so the
  unstable fixed point of ``c`` is ``sqrt(lr_d / lr_w)``; with momentum ``m`` on the weights only, the
  weights' effective rate is ``lr / (1 - m)`` and the threshold would move from ``c = 1`` to
  ``sqrt(1 - m)`` (0.32 at m = 0.9), which in a first trial pushed every channel above 1. For the same
  reason a ``catalyst_lr`` different from ``lr`` moves the threshold to ``sqrt(catalyst_lr / lr)``.
* The penalty is applied with the fused in-place call ``cf.penalty_(..., scale=gamma_t)`` after
  ``loss.backward()``, i.e. the objective is ``L + gamma_t R``.
* gamma schedule: ``gamma_t = gamma * min(1, (t + 1) / (gamma_warmup + 1))`` per opt1 epoch ``t`` (linear
  warm-up over ``gamma_warmup`` epochs, then constant; ``gamma_warmup = 0`` is constant). opt1 uses a
  constant learning rate; dense training and fine-tuning use cosine annealing.
* Stop rule: opt1 ends after the first epoch at which every channel is decided, ``|log10 c_i| > kappa``, or
  when the epoch budget is spent. Undecided channels are reported and **kept**.
* Decision: remove a channel iff it is decided and ``c_i > 1`` (so ``log10 c_i > kappa``). A layer never
  loses all its channels: if every channel of a target would go, the one with the smallest ``c`` stays
  (reported as ``forced_keep``).
* Verification at the prune step (eval mode, on up to 256 test samples): the pruned model must match the
  *masked* model (the regularized model with the removed channels' consumer columns zeroed: the same
  function) to ``1e-4 * max|logits|`` (checks the surgery), and the regularized model itself to
  ``verify_rtol * max|logits|`` (default 1e-2; checks that removed channels were really ~0). Both figures
  are reported; a failed check is reported, not raised. With the bypass, all three are extended models:
  the pruned one keeps the ``d``/``dbar`` entries of its kept channels.
* Target speed-up: ``c0`` is calibrated by geometric bisection on ``[1 / calib_c0_max, calib_c0_max]``: each trial runs opt1 from the
  dense weights (by default the full budget with the stop rule, i.e. exactly the run the pipeline then
  makes; ``calib_epochs > 0`` for shorter, cheaper, under-predicting trials) and predicts the FLOPs ratio with the final decision
  rule (decided channels with ``c > 1``); the smallest tested ``c0`` whose prediction reaches the target is used (or
  ``calib_c0_max`` if none does, reported as not reached). Larger ``c0`` prunes more (section 3/8).
* Determinism: the data order of epoch ``e`` of a stage comes from a generator seeded with
  ``seed * 1000 + stage_index * 100 + e`` only, and every checkpoint stores model, catalysts, optimizer,
  scheduler and RNG states, so ``resume`` reproduces an uninterrupted run exactly (on CPU).
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from .. import functional as F_cf
from ..data import DATASETS, load_dataset, make_loader
from ..models import MODEL_NAMES, build_model
from . import bypass
from .methods import METHODS, PruningMethod, decision_flips, get_method, rank_decisions, spearman, threshold_decisions, top_k_decisions
from .metrics import count_flops, count_params, evaluate, measure_latency
from .surgery import mask_model, prune_model, slice_catalysts
from .targets import MODES, build_target_set, find_targets

__all__ = ["PruneConfig", "run_pipeline", "decide", "predict_speedup", "calibrate_c0", "HIST_BINS", "FORMULATIONS"]

STAGES = ("dense", "calibrate", "opt1", "prune", "opt2", "finetune", "done")
FORMULATIONS = ("regularizer", "bypass")
# Seeds of each stage's data order; fixed (opt2 came later) so that adding a stage changes no other one.
_STAGE_SEED = {"dense": 0, "calibrate": 1, "opt1": 2, "prune": 3, "finetune": 4, "done": 5, "opt2": 6}
HIST_BINS = [float(b) for b in np.arange(-12.0, 12.5, 0.5)]  # log10 c histogram bin edges (+-inf clipped)


@dataclass
class PruneConfig:
    model: str = "small_cnn"
    dataset: str = "digits"
    data_root: Optional[str] = None
    method: str = "catalyst"
    mode: str = "group"
    formulation: str = "regularizer"  # or "bypass" (section 4b: extended model, then opt2)
    out: str = "prune_out"
    dense_epochs: int = 15
    epochs: int = 50  # opt1 budget
    finetune_epochs: int = 5
    opt2_epochs: int = 5  # bypass only: epochs driving d - dbar to 0 before the fold
    opt2_mu: float = 10.0  # bypass only: weight of mu_t * sum (d - dbar)^2
    opt2_ramp: int = 2  # bypass only: epochs of linear mu ramp
    opt2_lr: Optional[float] = None  # bypass only: constant opt2 learning rate (default: finetune_lr)
    opt2_tol: float = 1e-2  # bypass only: largest |d - dbar| accepted as "small" at the snap
    gamma: float = 0.03
    gamma_warmup: int = 0
    c0: float = 1.2
    target_speedup: Optional[float] = None
    calib_epochs: int = 0  # 0: each calibration trial is the full opt1 (exact prediction)
    calib_iters: int = 6
    calib_c0_max: float = 1.5
    kappa: float = 2.0
    lr: float = 0.05
    catalyst_lr: Optional[float] = None
    finetune_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    bn_beta: bool = True
    image_size: Optional[int] = None
    verify_rtol: float = 1e-2
    latency_batch: int = 64
    progress: bool = True
    plots: bool = True
    train_limit: Optional[int] = None  # use only the first N training / test samples (smoke tests)
    test_limit: Optional[int] = None
    dense_checkpoint: Optional[str] = None  # start from these dense weights (a state_dict file) instead of training
    norm_threshold: float = 1e-2  # baselines without a target speed-up: remove groups with n_i <= this
    noise_level: float = 0.01  # relative weight noise for the decision-robustness figure
    noise_draws: int = 5

    def validate(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"--model: unknown model {self.model!r}; choose one of: {', '.join(MODEL_NAMES)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset: unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        if self.mode not in MODES:
            raise ValueError(f"--mode: unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        get_method(self.method)  # raises for an unknown --method
        if not (self.norm_threshold > 0 and math.isfinite(self.norm_threshold)):
            raise ValueError(f"--norm-threshold must be a positive finite number, got {self.norm_threshold}")
        if not (self.noise_level >= 0 and math.isfinite(self.noise_level)):
            raise ValueError(f"--noise-level must be a finite number >= 0, got {self.noise_level}")
        if self.noise_draws < 1:
            raise ValueError(f"--noise-draws must be >= 1, got {self.noise_draws}")
        if self.dense_checkpoint is not None and not Path(self.dense_checkpoint).is_file():
            raise ValueError(f"--dense-checkpoint: no file at {self.dense_checkpoint}")
        if self.formulation not in FORMULATIONS:
            raise ValueError(f"--formulation: unknown formulation {self.formulation!r}; choose one of: {', '.join(FORMULATIONS)}")
        if self.formulation == "bypass" and self.method != "catalyst":
            raise ValueError(f"--formulation bypass is Catalyst's extended model; --method {self.method} runs the "
                             "regularizer formulation only")
        for name in ("dense_epochs", "epochs", "finetune_epochs", "gamma_warmup", "calib_epochs", "calib_iters",
                     "opt2_epochs", "opt2_ramp"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("train_limit", "test_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ValueError(f"--gamma must be a finite number >= 0, got {self.gamma}")
        if not (self.c0 > 0 and math.isfinite(self.c0)):
            raise ValueError(f"--c0 must be a positive finite number, got {self.c0}")
        if self.target_speedup is not None and not (self.target_speedup >= 1 and math.isfinite(self.target_speedup)):
            raise ValueError(f"--target-speedup must be a finite number >= 1, got {self.target_speedup}")
        if not self.kappa > 0:
            raise ValueError(f"--kappa must be > 0, got {self.kappa}")
        if not self.calib_c0_max > 1:
            raise ValueError(f"--calib-c0-max must be > 1, got {self.calib_c0_max}")
        if not (self.opt2_mu > 0 and math.isfinite(self.opt2_mu)):
            raise ValueError(f"--opt2-mu must be a positive finite number, got {self.opt2_mu}")
        if self.opt2_lr is not None and not (self.opt2_lr > 0 and math.isfinite(self.opt2_lr)):
            raise ValueError(f"--opt2-lr must be a positive finite number, got {self.opt2_lr}")
        if not (self.opt2_tol > 0 and math.isfinite(self.opt2_tol)):
            raise ValueError(f"--opt2-tol must be a positive finite number, got {self.opt2_tol}")
        if self.formulation == "bypass":
            # mu * (d - dbar)^2 has curvature 4 mu along d - dbar: momentum SGD diverges unless 4 lr mu < 2 (1 + m).
            lr2 = self.opt2_learning_rate
            bound = 2 * (1 + self.momentum) / (4 * lr2)
            if not self.opt2_mu < bound:
                raise ValueError(f"--opt2-mu {self.opt2_mu} is too large for the opt2 learning rate {lr2} (--opt2-lr, default "
                                 f"--finetune-lr) and --momentum {self.momentum}: the bypass penalty's SGD step is stable only "
                                 f"for 4 * lr * mu < 2 * (1 + momentum), i.e. mu < {bound:.4g}")
        if self.dataset != "digits" and self.data_root is None:
            raise ValueError(f"--data-root is required for --dataset {self.dataset}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device!r}: CUDA is not available on this machine")

    @property
    def opt2_learning_rate(self) -> float:
        return self.finetune_lr if self.opt2_lr is None else self.opt2_lr

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------- helpers
def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)
    except ImportError:  # pragma: no cover - tqdm is optional
        print(f"  {desc} ...", flush=True)
        return iterable


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _epoch_seed(seed: int, stage: str, epoch: int) -> int:
    return int(seed) * 1000 + _STAGE_SEED[stage] * 100 + int(epoch)


def decide(log10c: list, kappa: float) -> list[dict]:
    """Catalyst's rule, per segment of ``log10 c``: masks ``prune`` (decided and ``c > 1``), ``undecided``
    (``|log10 c| <= kappa``), and ``keep`` indices (at least one per segment: see ``forced_keep``)."""
    out = []
    for lc in log10c:
        lc = lc.detach().double().cpu()
        undecided = lc.abs() <= kappa
        prune = (~undecided) & (lc > 0)
        forced = False
        if bool(prune.all()):
            prune = prune.clone()
            prune[int(torch.argmin(lc))] = False
            forced = True
        keep = (~prune).nonzero().flatten()
        out.append({"log10c": lc, "prune": prune, "undecided": undecided, "keep": keep, "forced_keep": forced})
    return out


def _decisions_from_masks(scores: list, masks: list) -> list[dict]:
    """The baselines' decisions in :func:`decide`'s format (no undecided channels)."""
    return [{"log10c": s, "prune": m, "undecided": torch.zeros_like(m), "keep": (~m).nonzero().flatten(),
             "forced_keep": bool(m.sum() == len(m) - 1 and len(m) > 1)} for s, m in zip(scores, masks)]


def _method_decisions(method: PruningMethod, cfg: PruneConfig, model, ts, catalysts, targets, input_shape):
    """The method's decisions (in :func:`decide`'s format), the rule in words, and how many decisions flip
    under ``cfg.noise_level`` relative weight noise with the same rule."""
    scores = method.scores(ts, catalysts)
    if method.self_deciding:
        decisions = decide(scores, cfg.kappa)
        rule = f"remove iff |log10 c| > kappa={cfg.kappa} and c > 1; undecided channels are kept"

        def redecide(sc):
            return [d["prune"] for d in decide(sc, cfg.kappa)]
    elif cfg.target_speedup is not None:
        dense_macs = count_flops(model, input_shape)["macs"]

        def speedup_of(masks):
            keep = {t.name: (~m).nonzero().flatten().tolist() for t, m in zip(targets, masks)}
            return dense_macs / count_flops(prune_model(model, targets, keep), input_shape)["macs"]

        masks = rank_decisions(scores, speedup_of, cfg.target_speedup)
        k = sum(int(m.sum()) for m in masks)
        decisions = _decisions_from_masks(scores, masks)
        rule = (f"remove the {k} channels with the largest {method.statistic} (one global ranking), the fewest "
                f"that reach a {cfg.target_speedup}x FLOPs ratio")

        def redecide(sc):
            return top_k_decisions(sc, k)
    else:
        threshold = -math.log10(cfg.norm_threshold)
        decisions = _decisions_from_masks(scores, threshold_decisions(scores, threshold))
        rule = f"remove iff the group norm n_i <= norm_threshold={cfg.norm_threshold}"

        def redecide(sc):
            return threshold_decisions(sc, threshold)
    robustness = decision_flips(redecide, lambda w: method.scores(ts, catalysts, w), ts.weights,
                                [d["prune"] for d in decisions], noise=cfg.noise_level, draws=cfg.noise_draws,
                                seed=cfg.seed)
    return decisions, rule, robustness


def _magnitude_bias(initial_norms: torch.Tensor, decisions: list[dict]) -> dict:
    """Spearman rank correlations between each channel's group norm when the sparsity stage started and
    its decision statistic / its decision (1 = pruned): near 0 means no magnitude bias."""
    stat = torch.cat([d["log10c"] for d in decisions])
    pruned = torch.cat([d["prune"] for d in decisions]).double()
    per_layer = []
    start = 0
    for d in decisions:
        n = len(d["log10c"])
        r = spearman(initial_norms[start : start + n], d["log10c"])
        if r is not None:
            per_layer.append(r)
        start += n
    return {"spearman_initial_norm_vs_statistic": spearman(initial_norms, stat),
            "spearman_initial_norm_vs_pruned": spearman(initial_norms, pruned),
            "spearman_within_layer_mean": sum(per_layer) / len(per_layer) if per_layer else None}


def _margin(decisions: list[dict], exclude: bool = False) -> Optional[float]:
    if exclude:  # "prune" here is prune | undecided: compare pruned with decided kept channels only
        pruned = torch.cat([d["log10c"][d["prune"] & ~d["undecided"]] for d in decisions])
        kept = torch.cat([d["log10c"][~d["prune"]] for d in decisions])
        return None if pruned.numel() == 0 or kept.numel() == 0 else float(pruned.min() - kept.max())
    pruned = torch.cat([d["log10c"][d["prune"]] for d in decisions])
    kept = torch.cat([d["log10c"][~d["prune"]] for d in decisions])
    if pruned.numel() == 0 or kept.numel() == 0:
        return None
    return float(pruned.min() - kept.max())


def _decision_stats(ts, catalysts, kappa: float, method: Optional[PruningMethod] = None) -> dict:
    """Per-layer figures of the decision statistic ``s`` (``log10 c`` for Catalyst; see methods.py).

    Keys keep Catalyst's names (``log10c_gt_0`` = ``s > 0``). "Decided" (``|s| > kappa``) is Catalyst's
    stop rule; the baselines have none, so all their channels count as decided."""
    method = method or get_method("catalyst")
    with torch.no_grad():
        if method.uses_catalysts:
            penalty = float(F_cf.penalty(ts.weights, catalysts, layout=ts.layout, return_stats=True).penalty)
        else:
            penalty = float(method.norms(ts).sum())  # the Group Lasso value sum_i n_i
    scores = method.scores(ts, catalysts)
    layers = {}
    total = decided = above = 0
    for name, lc in zip(ts.segment_names, scores):
        hist, _ = np.histogram(lc.clamp(HIST_BINS[0], HIST_BINS[-1]).numpy(), bins=HIST_BINS)
        n_dec = int((lc.abs() > kappa).sum()) if method.self_deciding else int(lc.numel())
        n_above = int((lc > 0).sum())
        layers[name] = {"channels": int(lc.numel()), "decided": n_dec, "log10c_gt_0": n_above,
                        "min_log10c": float(lc.min()), "max_log10c": float(lc.max()), "hist": hist.tolist()}
        total += lc.numel()
        decided += n_dec
        above += n_above
    return {"penalty": penalty, "statistic": method.statistic, "fraction_decided": decided / total,
            "fraction_c_gt_1": above / total, "undecided": total - decided, "layers": layers, "scores": scores}


def _sgd(params, cfg: PruneConfig, lr: float):
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _train_epoch(model, loader, opt, device, *, penalty=None, after_backward=None, progress=False, desc="") -> dict:
    """One epoch of cross-entropy training; ``penalty = (method, ts, catalysts, gamma)`` adds the method's
    sparsity term (its gradient after ``backward``, its proximal step after ``step``); ``after_backward()``
    (if given) adds further penalty gradients before each step."""
    model.train()
    crit = nn.CrossEntropyLoss()
    total_loss = 0.0
    n = 0
    for x, y in _progress(loader, progress, desc):
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        loss = crit(model(x), y)
        loss.backward()
        if penalty is not None:
            method, ts, catalysts, gamma = penalty
            method.after_backward(ts, catalysts, gamma)
        if after_backward is not None:
            after_backward()
        opt.step()
        if penalty is not None:
            method.after_step(ts, gamma, opt.param_groups[0]["lr"])
        total_loss += loss.item() * y.numel()
        n += y.numel()
    return {"train_loss": total_loss / max(n, 1)}


def _opt1_optimizer(model, catalysts, cfg: PruneConfig, method: PruningMethod):
    if not method.trains_catalysts:
        return _sgd(model.parameters(), cfg, cfg.lr)
    # With the bypass, d (the catalysts) and dbar are parameters of the model: they go to the catalyst group.
    group = list(catalysts) + [w.dbar for _, w in bypass.wrappers(model)]
    ids = {id(p) for p in group}
    return torch.optim.SGD(
        [
            {"params": [p for p in model.parameters() if id(p) not in ids]},
            {"params": group, "weight_decay": 0.0,
             "lr": cfg.lr if cfg.catalyst_lr is None else cfg.catalyst_lr},
        ],
        lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
    )


def _pipeline_targets(model, cfg: PruneConfig, method: PruningMethod, input_shape) -> tuple[list, list]:
    """The targets this run regularises and the groups it leaves out (with reasons): DepGraph's groups,
    less those the method's mode cannot use (BN mode: no BatchNorm) and, for the bypass formulation, the
    coupled groups it does not support. Raises ValueError for configurations that leave nothing."""
    targets, excluded = find_targets(model, input_shape, return_excluded=True)
    ts = _target_set(model, cfg, method, targets)
    targets, excluded = ts.targets, excluded + ts.excluded
    if cfg.formulation == "bypass":
        targets, unsupported = bypass.supported_targets(targets)
        excluded = excluded + unsupported
        if not targets:
            raise ValueError("--formulation bypass: no target with a single producer and at most one BatchNorm")
        bypass.find_sites(model, targets, cfg.mode)
    return targets, excluded


def _target_set(model, cfg: PruneConfig, method: PruningMethod, targets):
    """The target set in the method's groups (network slimming always uses BN scales). A wrapped BN lives
    at "<bn>.sigma"; ``inner_targets`` points there (no-op for a plain model)."""
    mode, bn_beta = method.effective_mode(cfg.mode, cfg.bn_beta)
    return build_target_set(model, mode, bn_beta=bn_beta, targets=bypass.inner_targets(model, targets))


def _start_opt1(model, cfg: PruneConfig, method: PruningMethod, targets, c0: float):
    """``(model, catalysts)`` at the start of opt1 (Catalyst: ``d = c0 * n``); for the bypass formulation
    ``model`` is a wrapped copy whose :class:`~.bypass.Bypass` modules own ``d`` (and ``dbar = d``)."""
    catalysts = method.init_catalysts(_target_set(model, cfg, method, targets), c0)
    if cfg.formulation == "bypass":
        model = bypass.attach(model, targets, cfg.mode, catalysts)
        catalysts = bypass.catalysts(model, targets)
    return model, catalysts


def _saved_catalysts(model, targets, state: dict, method: PruningMethod, device) -> list:
    """The catalysts to train: the bypass modules' own ``d`` if the model is wrapped, else the checkpoint's
    (trainable parameters for Catalyst, constant tensors for the baselines)."""
    if bypass.is_wrapped(model):
        return bypass.catalysts(model, targets)
    if method.trains_catalysts:
        return [nn.Parameter(d.to(device)) for d in state["catalysts"]]
    return [d.to(device) for d in state["catalysts"] or []]


def _gamma_t(cfg: PruneConfig, epoch: int) -> float:
    return cfg.gamma * min(1.0, (epoch + 1) / (cfg.gamma_warmup + 1))


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _input_format(cfg: PruneConfig) -> tuple[int, int]:
    """(channels, image size) the model is fed."""
    if cfg.model == "small_cnn" and cfg.dataset == "digits":
        return 1, cfg.image_size or 8
    return 3, cfg.image_size or 32


# ----------------------------------------------------------------------------------------- calibration
def predict_speedup(dense_model, cfg: PruneConfig, train_set, c0: float, input_shape, device="cpu") -> float:
    """The FLOPs ratio (dense / pruned) predicted for ``c0``: opt1 on a copy of ``dense_model``, then the
    final decision rule (remove decided channels with ``log10 c > kappa``).

    With ``cfg.calib_epochs == 0`` (the default) the trial is exactly the opt1 the pipeline runs: the same
    epoch budget, stop rule, data order and initial state, so the prediction is the result the pipeline
    will get for this ``c0``. A positive ``calib_epochs`` runs a shorter trial (cheaper, but it
    under-predicts: channels keep splitting after it, so the calibrated ``c0`` then overshoots)."""
    method = get_method("catalyst")
    targets, _ = _pipeline_targets(dense_model, cfg, method, input_shape)
    model, catalysts = _start_opt1(copy.deepcopy(dense_model), cfg, method, targets, c0)
    ts = _target_set(model, cfg, method, targets)
    opt = _opt1_optimizer(model, catalysts, cfg, method)
    for e in range(cfg.calib_epochs or cfg.epochs):
        loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=_epoch_seed(cfg.seed, "opt1", e))
        _train_epoch(model, loader, opt, device, penalty=(method, ts, catalysts, _gamma_t(cfg, e)))
        if not cfg.calib_epochs and _decision_stats(ts, catalysts, cfg.kappa)["undecided"] == 0:
            break  # the pipeline's stop rule
    decisions = decide(method.scores(ts, catalysts), cfg.kappa)
    keep = {t.name: d["keep"] for t, d in zip(ts.targets, decisions)}
    dense = count_flops(dense_model, input_shape)["macs"]
    plain = bypass.unwrap(model)[0] if bypass.is_wrapped(model) else model  # the bypass adds no MACs
    return dense / count_flops(prune_model(plain, targets, keep), input_shape)["macs"]


def calibrate_c0(dense_model, cfg: PruneConfig, train_set, input_shape, device="cpu", log=print) -> dict:
    """Geometric bisection over ``c0`` in ``[1 / cfg.calib_c0_max, cfg.calib_c0_max]`` for ``cfg.target_speedup`` (see the module
    docstring); leaves the global RNG state unchanged."""
    rng = _rng_state()
    cache: dict[float, float] = {}

    def ratio(c0: float) -> float:
        if c0 not in cache:
            cache[c0] = predict_speedup(dense_model, cfg, train_set, c0, input_shape, device)
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
    _set_rng_state(rng)
    return {"target_speedup": cfg.target_speedup, "c0": best, "reached_in_calibration": reached, "trials": trials,
            "calib_epochs": cfg.calib_epochs,
            "method": "geometric bisection on [1/calib_c0_max, calib_c0_max]; smallest tested c0 whose predicted speed-up reaches the target "
                      "(calib_epochs 0: each trial is the full opt1 run, so the prediction is exact)"}


# ------------------------------------------------------------------------------------------------ plots
def _plots(out: Path, report: dict, history: list, log) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("  plots skipped: matplotlib is not installed")
        return []
    files = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(str(out / name))

    final = report.get("opt1", {}).get("final_catalysts", {})
    layers = final.get("layers", {})
    statistic = final.get("statistic", "log10 c")
    if layers:
        n = len(layers)
        cols = min(4, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
        centers = (np.array(HIST_BINS[:-1]) + np.array(HIST_BINS[1:])) / 2
        for ax, (name, info) in zip(axes.flat, layers.items()):
            ax.bar(centers, info["hist"], width=0.45)
            if statistic == "log10 c":  # the +-kappa band is Catalyst's decision rule; baselines have none
                ax.axvline(report["config"]["kappa"], color="r", lw=0.8)
                ax.axvline(-report["config"]["kappa"], color="r", lw=0.8)
            ax.set_title(name, fontsize=8)
            ax.set_xlabel(statistic, fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        save(fig, "log10c_histograms.png")
    if history:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = np.arange(1, len(history) + 1)
        acc = [h.get("test_accuracy") for h in history]
        ax.plot(x, acc, marker=".")
        start = 0
        for i, h in enumerate(history + [{"stage": None}]):
            if i == len(history) or h["stage"] != history[start]["stage"]:
                ax.axvspan(start + 0.5, i + 0.5, alpha=0.08 * (1 + STAGES.index(history[start]["stage"]) % 3))
                ax.text((start + i) / 2 + 0.5, min(a for a in acc if a is not None), history[start]["stage"], fontsize=7, ha="center")
                start = i
        ax.set_xlabel("epoch (all stages)")
        ax.set_ylabel("test accuracy (%)")
        save(fig, "accuracy_curve.png")
    return files


# ---------------------------------------------------------------------------------------------- pipeline
def run_pipeline(config: PruneConfig, *, resume: bool = False, stop_after_epochs: Optional[int] = None,
                 log: Callable[[str], None] = print) -> dict:
    """Runs (or, with ``resume``, continues) the pipeline; returns the report (also written to
    ``<out>/report.json``). ``stop_after_epochs`` stops after that many training epochs of this call (all
    stages together), as an interruption would, and returns ``{"status": "interrupted", ...}``."""
    out = Path(config.out)
    ckpt_path = out / "checkpoint.pt"
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        config = PruneConfig.from_dict(state["config"])
        config.validate()
        log(f"resuming {ckpt_path}: stage {state['stage']}, {state['epoch']} epochs done")
    else:
        config.validate()
        state = None
    cfg = config
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    channels, size = _input_format(cfg)
    input_shape = (channels, size, size)
    train_set, test_set, info = load_dataset(cfg.dataset, cfg.data_root, image_size=size, channels=channels)
    if cfg.train_limit is not None:
        train_set = Subset(train_set, range(min(cfg.train_limit, len(train_set))))
    if cfg.test_limit is not None:
        test_set = Subset(test_set, range(min(cfg.test_limit, len(test_set))))
    info.train_size, info.test_size = len(train_set), len(test_set)
    test_loader = make_loader(test_set, 256, shuffle=False)

    if state is None:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
    model = build_model(cfg.model, num_classes=info.num_classes, in_channels=channels).to(device)
    method = get_method(cfg.method)
    targets, excluded = _pipeline_targets(model, cfg, method, input_shape)  # config errors surface now
    dropped = "; ".join(f"{', '.join(e['producers'])}: {e['reason']}" for e in excluded) or "none"
    log(f"targets: {len(targets)} coupled groups, {sum(t.channels for t in targets)} channels; excluded: {dropped}")
    dense_cost = {"flops": count_flops(model, input_shape), "params": count_params(model)}

    if state is None:
        state = {"stage": "dense", "epoch": 0, "history": [], "report": {}, "keep": None, "catalysts": None,
                 "optimizer": None, "scheduler": None, "elapsed": {}, "c0": cfg.c0}
    else:
        if state["keep"] is not None:
            model = prune_model(model, targets, state["keep"])
        if state.get("wrapped"):  # a bypass skeleton for the saved d, dbar
            model = bypass.attach(model, targets, cfg.mode)
        model.load_state_dict(state["model"])
        _set_rng_state(state["rng"])
    history, report, elapsed = state["history"], state["report"], state["elapsed"]
    epochs_this_call = [0]

    def checkpoint(stage, epoch, catalysts=None, opt=None, sched=None):
        state.update(stage=stage, epoch=epoch, model=model.state_dict(), wrapped=bypass.is_wrapped(model), rng=_rng_state(),
                     catalysts=None if catalysts is None else [d.detach().cpu().clone() for d in catalysts],
                     optimizer=None if opt is None else opt.state_dict(),
                     scheduler=None if sched is None else sched.state_dict(), config=asdict(cfg))
        _save(ckpt_path, state)

    def interrupted() -> bool:
        epochs_this_call[0] += 1
        return stop_after_epochs is not None and epochs_this_call[0] >= stop_after_epochs

    def timed(stage, t0):
        elapsed[stage] = elapsed.get(stage, 0.0) + time.perf_counter() - t0

    def supervised_stage(stage: str, epochs: int, lr: float) -> Optional[dict]:
        """Plain training with a cosine schedule (dense training, fine-tuning), resumable epoch by epoch;
        returns the interruption result, or None when the stage is complete."""
        t0 = time.perf_counter()
        opt = _sgd(model.parameters(), cfg, lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
        if state["optimizer"] is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        for e in range(state["epoch"], epochs):
            loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=_epoch_seed(cfg.seed, stage, e))
            rec = _train_epoch(model, loader, opt, device, progress=cfg.progress, desc=f"{stage} {e + 1}/{epochs}")
            sched.step()
            rec.update(stage=stage, epoch=e + 1, test_accuracy=evaluate(model, test_loader, device)["accuracy"])
            history.append(rec)
            log(f"{stage} {e + 1}/{epochs}: loss {rec['train_loss']:.4f} test acc {rec['test_accuracy']:.2f}%")
            checkpoint(stage, e + 1, opt=opt, sched=sched)
            if interrupted():
                timed(stage, t0)
                checkpoint(stage, e + 1, opt=opt, sched=sched)
                return {"status": "interrupted", "stage": stage, "epoch": e + 1}
        report[stage] = {"epochs": epochs, **evaluate(model, test_loader, device)}
        timed(stage, t0)
        return None

    # ---- dense training (or loading dense weights)
    if state["stage"] == "dense":
        if cfg.dense_checkpoint is not None:
            loaded = torch.load(cfg.dense_checkpoint, map_location=device, weights_only=True)
            try:
                model.load_state_dict(loaded)
            except RuntimeError as exc:
                raise ValueError(f"--dense-checkpoint {cfg.dense_checkpoint} does not fit model {cfg.model}: {exc}") from exc
            report["dense"] = {"epochs": 0, "loaded_from": cfg.dense_checkpoint, **evaluate(model, test_loader, device)}
            log(f"dense weights loaded from {cfg.dense_checkpoint}: test acc {report['dense']['accuracy']:.2f}%")
        else:
            interruption = supervised_stage("dense", cfg.dense_epochs, cfg.lr)
            if interruption is not None:
                return interruption
        _save(out / "dense_model.pt", model.state_dict())  # reusable with --dense-checkpoint
        checkpoint("calibrate", 0)

    # ---- c0 calibration for a target speed-up
    if state["stage"] == "calibrate":
        t0 = time.perf_counter()
        if cfg.target_speedup is not None and method.self_deciding:
            log(f"calibrating c0 for a {cfg.target_speedup}x FLOPs reduction")
            report["calibration"] = calibrate_c0(model, cfg, train_set, input_shape, device, log)
            state["c0"] = report["calibration"]["c0"]
        timed("calibrate", t0)
        state["initial_norms"] = method.norms(_target_set(model, cfg, method, targets)).cpu()  # magnitude-bias figure
        model, catalysts = _start_opt1(model, cfg, method, targets, state["c0"])
        checkpoint("opt1", 0, catalysts=catalysts)

    # ---- opt1: L + gamma_t R (or the baseline's sparsity term) until every channel is decided
    if state["stage"] == "opt1":
        t0 = time.perf_counter()
        ts = _target_set(model, cfg, method, targets)
        catalysts = _saved_catalysts(model, targets, state, method, device)
        opt = _opt1_optimizer(model, catalysts, cfg, method)
        if state["optimizer"] is not None:
            opt.load_state_dict(state["optimizer"])
        op = report.setdefault("opt1", {"method": method.name, "c0": state["c0"], "stopped_because": None, "epochs_run": 0})
        start = state["epoch"]
        stats = _decision_stats(ts, catalysts, cfg.kappa, method)
        if start == 0:
            op["initial_fraction_decided"] = stats["fraction_decided"]
        # Only Catalyst has a stop rule on decidedness; the baselines spend the epoch budget.
        stop = start > 0 and method.self_deciding and stats["undecided"] == 0
        e = start
        while not stop and e < cfg.epochs:
            gamma = _gamma_t(cfg, e)
            loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=_epoch_seed(cfg.seed, "opt1", e))
            rec = _train_epoch(model, loader, opt, device, penalty=(method, ts, catalysts, gamma), progress=cfg.progress,
                               desc=f"opt1 {e + 1}/{cfg.epochs}")
            e += 1
            stats = _decision_stats(ts, catalysts, cfg.kappa, method)
            rec.update(stage="opt1", epoch=e, gamma=gamma, test_accuracy=evaluate(model, test_loader, device)["accuracy"],
                       penalty=stats["penalty"], fraction_decided=stats["fraction_decided"],
                       fraction_c_gt_1=stats["fraction_c_gt_1"], undecided=stats["undecided"],
                       layers={k: {kk: v[kk] for kk in ("decided", "log10c_gt_0", "hist")} for k, v in stats["layers"].items()})
            history.append(rec)
            log(f"opt1 {e}/{cfg.epochs}: loss {rec['train_loss']:.4f} R {stats['penalty']:.4f} acc {rec['test_accuracy']:.2f}% "
                f"decided {100 * stats['fraction_decided']:.1f}% {stats['statistic']}>0 {100 * stats['fraction_c_gt_1']:.1f}%")
            stop = method.self_deciding and stats["undecided"] == 0
            op["epochs_run"] = e
            checkpoint("opt1", e, catalysts=catalysts, opt=opt)
            if interrupted():
                timed("opt1", t0)
                checkpoint("opt1", e, catalysts=catalysts, opt=opt)
                return {"status": "interrupted", "stage": "opt1", "epoch": e}
        op["stopped_because"] = "all channels decided" if stop else "epoch budget spent"
        op["epochs_run"] = e
        op["final_catalysts"] = {k: v for k, v in stats.items() if k != "scores"}
        if method.name.startswith("lats"):
            steps = len(make_loader(train_set, cfg.batch_size, shuffle=False))
            op["final_threshold"] = sum(_gamma_t(cfg, k) for k in range(e)) * cfg.lr * steps  # t = lam * sum lr
        op.update(evaluate(model, test_loader, device))
        timed("opt1", t0)
        checkpoint("prune", 0, catalysts=catalysts)

    # ---- decide and remove
    if state["stage"] == "prune":
        t0 = time.perf_counter()
        ts = _target_set(model, cfg, method, targets)
        catalysts = _saved_catalysts(model, targets, state, method, device)
        decisions, rule, robustness = _method_decisions(method, cfg, model, ts, catalysts, targets, input_shape)
        keep = {t.name: d["keep"].tolist() for t, d in zip(targets, decisions)}
        # With the bypass, the kept channels keep their d and dbar entries (re-wrapped after the surgery).
        pruned = bypass.prune(model, targets, keep) if bypass.is_wrapped(model) else prune_model(model, targets, keep)
        masked = mask_model(model, bypass.inner_targets(model, targets), keep)  # a wrapped BN is "<bn>.sigma"
        x = torch.cat([b[0] for b, _ in zip(test_loader, range(1))])[:256].to(device)
        model.eval(), pruned.eval(), masked.eval()
        with torch.no_grad():
            y_reg, y_mask, y_pruned = model(x), masked(x), pruned(x)
        scale = float(y_reg.abs().max())
        surgery_err = float((y_pruned - y_mask).abs().max())
        function_err = float((y_pruned - y_reg).abs().max())
        acc_reg = evaluate(model, test_loader, device)["accuracy"]
        acc_pruned = evaluate(pruned, test_loader, device)["accuracy"]
        per_layer = {}
        for t, d in zip(targets, decisions):
            per_layer[t.name] = {
                "channels": t.channels, "kept": int(d["keep"].numel()), "pruned": int(d["prune"].sum()),
                "undecided": int(d["undecided"].sum()), "forced_keep": d["forced_keep"],
                "undecided_indices": d["undecided"].nonzero().flatten().tolist(),
            }
        total = sum(t.channels for t in targets)
        report["prune"] = {
            "method": method.name,
            "rule": rule,
            "statistic": method.statistic,
            "channels_total": total,
            "channels_pruned": sum(v["pruned"] for v in per_layer.values()),
            "undecided_total": sum(v["undecided"] for v in per_layer.values()),
            "margin_log10c": _margin(decisions),
            "margin_log10c_decided_only": _margin([dict(d, prune=d["prune"] | d["undecided"]) for d in decisions], exclude=True),
            "margin_definition": f"min {method.statistic} over pruned channels - max {method.statistic} over kept channels "
                                 "(incl. undecided), in decades",
            "robustness": robustness,
            "magnitude_bias": _magnitude_bias(state["initial_norms"], decisions),
            # one entry per channel (segments in target order): what the experiments in experiments/ plot
            "channels": {"layer": [k for k, d in enumerate(decisions) for _ in range(len(d["prune"]))],
                         "initial_norm": state["initial_norms"].tolist(),
                         "statistic": torch.cat([d["log10c"] for d in decisions]).tolist(),
                         "pruned": torch.cat([d["prune"] for d in decisions]).tolist()},
            "per_layer": per_layer,
            "accuracy_regularized": acc_reg,
            "accuracy_after_removal": acc_pruned,
            "verification": {
                "samples": int(x.shape[0]), "max_abs_logit": scale,
                "surgery_max_abs_err": surgery_err, "surgery_tol": 1e-4 * max(scale, 1.0),
                "surgery_ok": surgery_err <= 1e-4 * max(scale, 1.0),
                "function_max_abs_err": function_err, "function_tol": cfg.verify_rtol * max(scale, 1.0),
                "function_ok": function_err <= cfg.verify_rtol * max(scale, 1.0),
                "argmax_agreement": float((y_pruned.argmax(1) == y_reg.argmax(1)).float().mean()),
            },
        }
        # A penalty or learning rate too large for the model collapses it during opt1: say so.
        lost = report["dense"]["accuracy"] - acc_reg
        report["prune"]["warnings"] = [] if lost <= 10 else [
            f"opt1 lost {lost:.1f} points of test accuracy (dense {report['dense']['accuracy']:.2f}% -> {acc_reg:.2f}%): "
            "the sparsity term or the opt1 learning rate is too large for this model; try a smaller --gamma, --c0 "
            "or --lr"]
        for w in report["prune"]["warnings"]:
            log(f"warning: {w}")
        v = report["prune"]["verification"]
        log(f"prune: removed {report['prune']['channels_pruned']}/{total} channels, undecided {report['prune']['undecided_total']}, "
            f"margin {report['prune']['margin_log10c']}, acc {acc_reg:.2f}% -> {acc_pruned:.2f}%, "
            f"|pruned - regularized| {function_err:.2e} (tol {v['function_tol']:.2e}), surgery err {surgery_err:.2e}")
        state["keep"] = keep
        model = pruned
        # Fine-tuning is plain loss; the sliced catalysts are kept in the checkpoint for a user who continues opt1.
        catalysts = slice_catalysts(catalysts, targets, keep)
        timed("prune", t0)
        checkpoint("opt2" if bypass.is_wrapped(model) else "finetune", 0, catalysts=catalysts)

    # ---- opt2 (bypass formulation only): drive d - dbar of the kept channels to 0, then fold the bypass away
    if state["stage"] == "opt2":
        t0 = time.perf_counter()
        lr2 = cfg.opt2_learning_rate
        opt = bypass.opt2_optimizer(model, lr2, cfg.momentum, cfg.weight_decay)
        if state["optimizer"] is not None:
            opt.load_state_dict(state["optimizer"])
        op2 = report.setdefault("opt2", {"epochs": cfg.opt2_epochs, "mu": cfg.opt2_mu, "ramp": cfg.opt2_ramp, "lr": lr2,
                                         "initial_max_abs_coefficient": bypass.max_abs_coefficient(model),
                                         "objective": "L + mu_t * sum (d - dbar)^2 over the kept channels"})
        for e in range(state["epoch"], cfg.opt2_epochs):
            mu = bypass.opt2_mu(cfg.opt2_mu, cfg.opt2_ramp, e)
            loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=_epoch_seed(cfg.seed, "opt2", e))
            rec = _train_epoch(model, loader, opt, device, after_backward=lambda: bypass.add_coefficient_penalty_grad_(model, mu),
                               progress=cfg.progress, desc=f"opt2 {e + 1}/{cfg.opt2_epochs}")
            rec.update(stage="opt2", epoch=e + 1, mu=mu, max_abs_coefficient=bypass.max_abs_coefficient(model),
                       test_accuracy=evaluate(model, test_loader, device)["accuracy"])
            history.append(rec)
            log(f"opt2 {e + 1}/{cfg.opt2_epochs}: loss {rec['train_loss']:.4f} mu {mu:.3g} max|d - dbar| "
                f"{rec['max_abs_coefficient']:.2e} acc {rec['test_accuracy']:.2f}%")
            checkpoint("opt2", e + 1, opt=opt)
            if interrupted():
                timed("opt2", t0)
                checkpoint("opt2", e + 1, opt=opt)
                return {"status": "interrupted", "stage": "opt2", "epoch": e + 1}
        x = torch.cat([b[0] for b, _ in zip(test_loader, range(1))])[:256].to(device)
        model, snap = bypass.snap_and_fold(model, cfg.opt2_tol, lambda m: evaluate(m, test_loader, device)["accuracy"], x)
        op2.update(snap)
        log(f"opt2: residual max|d - dbar| {snap['residual_max_abs_coefficient']:.2e} "
            f"({'ok' if snap['residual_ok'] else 'ABOVE'} tol {cfg.opt2_tol:g}); snap d = dbar changed acc "
            f"{snap['accuracy_before_snap']:.2f}% -> {snap['accuracy_after_snap']:.2f}%, logits by {snap['snap_max_abs_logit_change']:.2e}; "
            "bypass folded away")
        timed("opt2", t0)
        checkpoint("finetune", 0)

    # ---- fine-tuning
    if state["stage"] == "finetune":
        interruption = supervised_stage("finetune", cfg.finetune_epochs, cfg.finetune_lr)
        if interruption is not None:
            return interruption
        checkpoint("done", 0)

    # ---- report
    pruned_cost = {"flops": count_flops(model, input_shape), "params": count_params(model)}
    dense_model = build_model(cfg.model, num_classes=info.num_classes, in_channels=channels).to(device)
    lat_dense = measure_latency(dense_model, input_shape, batch_size=cfg.latency_batch)
    lat_pruned = measure_latency(model, input_shape, batch_size=cfg.latency_batch)
    final = {
        "status": "done",
        "config": asdict(cfg),
        "dataset": asdict(info),
        "input_shape": list(input_shape),
        "targets": [asdict(t) for t in targets],
        "targets_excluded": excluded,
        "c0_used": state["c0"],
        "stages": report,
        "accuracy": {
            "dense": report["dense"]["accuracy"],
            "regularized": report["opt1"]["accuracy"],
            "after_removal": report["prune"]["accuracy_after_removal"],
            "after_opt2": report["opt2"]["accuracy_after_snap"] if "opt2" in report else None,
            "after_finetune": report["finetune"]["accuracy"],
        },
        "cost": {
            "dense": {**dense_cost, "latency": lat_dense},
            "pruned": {**pruned_cost, "latency": lat_pruned},
            "flops_ratio": dense_cost["flops"]["macs"] / pruned_cost["flops"]["macs"],
            "params_ratio": dense_cost["params"] / pruned_cost["params"],
            "latency_ratio": lat_dense["median_ms"] / lat_pruned["median_ms"],
            "flops_counting": "MACs of Conv2d and Linear layers via forward hooks, one sample; flops = 2 * macs",
        },
        "per_layer_kept": {k: v["kept"] for k, v in report["prune"]["per_layer"].items()},
        "margin_log10c": report["prune"]["margin_log10c"],
        "decision_flips": report["prune"]["robustness"],
        "magnitude_bias": report["prune"]["magnitude_bias"],
        "undecided_total": report["prune"]["undecided_total"],
        "history": history,
        "runtime_s": dict(elapsed, total=sum(elapsed.values())),
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()},
        "method": method.name,
        "formulation": cfg.formulation,
        "opt2": report.get("opt2"),  # None for the regularizer formulation (stage skipped)
    }
    final["plots"] = _plots(out, {"config": final["config"], "opt1": report["opt1"]}, history, log) if cfg.plots else []
    with open(out / "report.json", "w") as f:
        json.dump(final, f, indent=1, default=float)
    torch.save({"model": model, "keep": state["keep"]}, out / "pruned_model.pt")
    log(f"done: acc dense {final['accuracy']['dense']:.2f}% -> finetuned {final['accuracy']['after_finetune']:.2f}%, "
        f"FLOPs {final['cost']['flops_ratio']:.2f}x, params {final['cost']['params_ratio']:.2f}x, "
        f"latency {final['cost']['latency_ratio']:.2f}x; report {out / 'report.json'}")
    return final
