"""The pruner: Catalyst (and the baselines it is compared with) on any model, in any training loop.

    import catalyst_fused as cf
    pruner = cf.Pruner(model, example_inputs, mode="group", gamma="auto", budget_steps=epochs * len(loader),
                       target_speedup=2.0, ignored_layers=[model.fc])
    optimizer = torch.optim.SGD(pruner.param_groups(lr=0.05, momentum=0.9, weight_decay=5e-4))
    pruner.attach_optimizer(optimizer)      # prune() then narrows its momentum buffers too
    for x, y in loader:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        pruner.regularize()                 # one fused in-place call for every group of the model
        optimizer.step()
        pruner.after_step()                 # the method's proximal step, if any (LATS); nothing for Catalyst
        if pruner.all_decided():
            break
    summary = pruner.prune()                # the model itself becomes narrower; catalysts and optimizer follow

What the pruner does for the user (each step a user would otherwise take from private code):

* **Targets**: the coupled channel groups of the model (Torch-Pruning's ``DependencyGraph``, traced once
  with ``example_inputs``; :mod:`.targets`), less ``ignored_layers`` and what the mode or formulation cannot
  carry (``pruner.excluded`` says why), expressed as one :class:`~catalyst_fused.GroupLayout`.
* **Catalysts**: threshold-corrected, ``d_i = c0 * n_i / sqrt(k_i)`` (:mod:`.dynamics`): every channel starts at
  corrected ratio ``u_i = c_i sqrt(k_i) = c0``, and ``u = 1`` is the unstable point of every group in every mode
  (in group mode a conv's rows and columns sit in two groups, so ``k`` is 1.6-1.8 and the raw threshold
  ``c* = 1 / sqrt(k)`` about 0.75). Owned by the pruner. Their
  optimizer settings are the pruner's job: :meth:`param_groups` / :meth:`attach_optimizer` put them in their
  own group **without weight decay** (it would pull every ``c`` towards "keep") and with the weights'
  momentum (momentum on the weights only would move the bifurcation threshold; see workflow.py).
* **Regularization**: :meth:`regularize` adds ``gamma * dR/dW`` and ``gamma * dR/dd`` into the gradients in
  one fused call (``cf.penalty_``), after ``backward()`` and before ``optimizer.step()``. With AMP's
  ``GradScaler`` pass it to the pruner (``grad_scaler=``): the gradients are still scaled at that point, so
  the call is scaled too and unscaling leaves exactly ``gamma * dR/dW``.
* **Decisions**: the method's rule (:mod:`.methods`). Catalyst (:mod:`.control`, every :meth:`regularize`):
  a channel whose ``|log10 u|`` passes ``kappa`` is decided and its catalyst frozen, so it keeps its side;
  decided channels with ``u > 1`` are pruned, undecided ones kept; the threshold is tracked as the weights
  change; with ``target_speedup`` the undecided catalysts are moved together so that the predicted FLOPs
  ratio is the target; with ``budget_steps`` the channels still undecided at 80% of it are decided by their
  side. Its stop rule is :meth:`all_decided`. ``gamma="auto"`` (with ``budget_steps``) picks gamma from the
  step budget when the optimizer is attached; :meth:`predictions` says when channels will decide. Baselines
  rank channels to a ``target_speedup`` or cut at ``norm_threshold`` and have no stop rule.
* **Removal**: :meth:`prune` narrows the model **in place**: modules keep their identity (``model.fc``,
  hooks), the pruned layers get new, narrower ``nn.Parameter`` objects (a leaf cannot change its shape
  safely while an old autograd graph refers to it), the catalysts are narrowed, every attached optimizer
  gets the new parameters and its state (momentum, Adam moments) narrowed the same way, and the targets are
  renumbered (no new trace). Returns a :class:`PruneSummary`; can be called again later (iterative pruning).
  **An optimizer built before** ``prune()`` **must be attached** (or passed) or rebuilt afterwards.
* **Checkpoints**: :meth:`state_dict` / :meth:`load_state_dict` (load the pruner's state *before* the
  model's: it re-applies earlier removals so that the model has the saved shapes).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from . import distributed
from .control import FORCE_FRACTION, FlopsModel
from .dynamics import AUTO_GAMMA_OFFSET, auto_gamma, effective_rate, reachable_log10, steps_to_decide
from .methods import (DEFAULT_MAX_PRUNE_FRACTION, Decision, PruningMethod, RuleContext, check_max_prune_fraction,
                      get_method, round_widths)
from .metrics import count_flops, count_params
from .formulations import Formulation, get_formulation
from .surgery import (ParameterSlices, constant_inputs, fold_constant_inputs_, keep_indices, narrow_tensor, prune_model,
                      remap_targets, slice_optimizer_state_)
from .targets import MODES, Target, TargetSet, build_target_set, example_batch, find_targets
from .unstructured import is_unstructured

__all__ = ["Pruner", "CatalystPruner", "PruningStats", "TargetStats", "PruneSummary"]

_STATE_FORMAT = "catalyst_fused.pruner/1"


@dataclass
class TargetStats:
    """One target's decision statistic right now (``s = log10 c`` for Catalyst)."""

    name: str
    channels: int
    decided: int
    undecided: int
    above_zero: int  # channels with s > 0 (c > 1 for Catalyst)
    min: float
    max: float
    statistic: torch.Tensor = field(repr=False)


@dataclass
class PruningStats:
    """What :meth:`Pruner.stats` reports: per target and in total."""

    statistic: str
    penalty: float
    targets: list
    channels: int
    decided: int
    undecided: int
    fraction_decided: float
    fraction_above_zero: float
    margin: Optional[float]  # min s over channels to prune - max s over kept ones, in decades (None for a
    # ranking to a FLOPs target: see Pruner.stats)


@dataclass
class PruneSummary:
    """What :meth:`Pruner.prune` did."""

    channels_total: int
    channels_pruned: int
    undecided_total: int
    per_target: dict  # name -> {"channels", "kept", "pruned", "undecided", "forced_keep", "rounded"}
    keep: dict  # name -> kept channel indices (list of ints)
    decisions: list  # Decision per target (None when an explicit keep was given)
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    folded: dict = field(default_factory=dict)  # consumer -> bias change that kept removed constant channels

    @property
    def flops_ratio(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    @property
    def params_ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)


def _check_number(name: str, value, *, positive: bool = False, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Pruner: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0) or (not allow_zero and value == 0):
        raise ValueError(f"Pruner: {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return value


class Pruner:
    """Catalyst structured pruning (or a baseline) of ``model``; see the module docstring for the loop.

    Args:
        model: the network to prune (changed in place by :meth:`prune`, and by the bypass formulation).
        example_inputs: what ``model`` is called with for the one trace that finds the coupled groups: a
            batch tensor, a tuple or dict of tensors, or one sample's shape such as ``(3, 32, 32)``.
        method: ``"catalyst"`` or a channel baseline (``"group_lasso"``, ``"slimming"``, ``"lats_channel"``,
            ``"lats_group"``); see :mod:`.methods`. The unstructured methods ``"lats"`` and ``"magnitude"``
            return a :class:`~.unstructured.SparsityPruner` instead (same loop; arguments ``sparsity``,
            ``scope``, ``schedule``, ``total_steps``, ... in :mod:`.unstructured`).
        mode: which slices form a channel's group: ``"group"`` (every coupled slice), ``"bn"`` (BN scale and
            shift), ``"filter"`` (producer rows).
        formulation: ``"regularizer"`` or ``"bypass"`` (the extended model; Catalyst only).
        gamma: strength of the sparsity term (settable between steps, e.g. for a schedule), or ``"auto"``
            (Catalyst, needs ``budget_steps``): resolved by :meth:`resolve_gamma` when the optimizer is attached.
        c0: initial corrected ratio ``u_i = c_i sqrt(k_i)`` of every channel (1: the threshold).
        kappa: a channel is decided (and frozen) when ``|log10 u_i|`` passes ``kappa``.
        ignored_layers: modules (or names) whose output channels must stay.
        bn_beta: BN mode regularises the BN shift with the scale (see :mod:`.targets`).
        target_speedup: baselines: remove channels by rank until this FLOPs ratio.
        norm_threshold: baselines without a target: remove groups with ``n_i <= norm_threshold``.
        catalyst_lr: learning rate of the catalysts' group (default: the weights'); the bifurcation
            threshold moves to ``sqrt(catalyst_lr / lr)``.
        grad_scaler: an AMP ``torch.amp.GradScaler`` whose scale the gradients carry when
            :meth:`regularize` runs.
        backend: kernel backend of the fused calls (``"auto"``, ``"cpp"``, ``"triton"``, ``"reference"``).
        targets: skip the trace and use these targets (e.g. from an earlier :func:`find_targets`).
        round_to: round every kept width up to a multiple of this (8 or 16 suit CPU kernels) by keeping the
            least-pruned extra channels (:func:`~catalyst_fused.pruning.methods.round_widths`); 1 = exact.
        budget_steps: optimizer steps of the sparsity stage (Catalyst: for ``gamma="auto"``, and to decide the
            channels still undecided at 80% of it).
        prune_pull: Catalyst: the catalyst of a channel decided on the prune side grows a decade per
            :meth:`settle_steps` until one step of its pull takes the group's whole mass, and the group is then
            set to zero (:mod:`.control` step 5); False keeps it at its frozen value, where the loss can hold the
            group away from zero.
        max_prune_fraction: the width floor: no decision removes more than this fraction of a target's
            channels; every target keeps at least ``max(1, ceil((1 - max_prune_fraction) n))`` of its ``n``
            (:func:`~catalyst_fused.pruning.methods.min_width`), for every method. Catalyst keeps it while it
            decides (the target feedback and the end of the budget move only channels above the floor), so the
            FLOPs it aims at are the ones the removal obtains. 1 keeps only the last channel of a target.

    Raises:
        ValueError / TypeError: for bad arguments (named), a model without prunable channels, or a
            formulation the model cannot carry.
    """

    def __new__(cls, *args, method: str = "catalyst", **kwargs):
        # Unstructured methods (LATS, magnitude) have no channels to decide: the same call returns their own
        # pruner, with the same loop (pruning/unstructured.py).
        if cls is Pruner and is_unstructured(method):
            from .unstructured import SparsityPruner

            return SparsityPruner(*args, method=method, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        example_inputs,
        *,
        method: str = "catalyst",
        mode: str = "group",
        formulation: str = "regularizer",
        gamma=0.03,
        c0: float = 1.0,
        kappa: float = 1.0,
        ignored_layers: Sequence = (),
        bn_beta: bool = True,
        target_speedup: Optional[float] = None,
        norm_threshold: float = 1e-2,
        catalyst_lr: Optional[float] = None,
        grad_scaler=None,
        backend: str = "auto",
        targets: Optional[Sequence[Target]] = None,
        round_to: int = 1,
        budget_steps: Optional[int] = None,
        prune_pull: bool = True,
        max_prune_fraction: float = DEFAULT_MAX_PRUNE_FRACTION,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Pruner: model must be an nn.Module, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"Pruner: unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        self.model = model
        self.example_inputs = example_batch(model, example_inputs)
        self.method: PruningMethod = get_method(method)
        self.formulation: Formulation = get_formulation(formulation)
        if self.formulation.name == "bypass" and self.method.name != "catalyst":
            raise ValueError(f"Pruner: formulation 'bypass' is Catalyst's extended model; method {method!r} runs the "
                             "regularizer formulation only")
        self.mode = mode
        self.bn_beta = bool(bn_beta)
        self.gamma_auto = isinstance(gamma, str)
        if self.gamma_auto and gamma != "auto":
            raise ValueError(f"Pruner: gamma must be a number or 'auto', got {gamma!r}")
        if self.gamma_auto and self.method.name != "catalyst":
            raise ValueError(f"Pruner: gamma='auto' comes from Catalyst's decision dynamics; method {method!r} needs a "
                             "number")
        self.gamma: Optional[float] = None if self.gamma_auto else _check_number("gamma", gamma)
        if budget_steps is not None and (isinstance(budget_steps, bool) or not isinstance(budget_steps, int)
                                         or budget_steps < 1):
            raise ValueError(f"Pruner: budget_steps must be a positive integer (optimizer steps of the sparsity stage), "
                             f"got {budget_steps!r}")
        if self.gamma_auto and budget_steps is None:
            raise ValueError("Pruner: gamma='auto' needs budget_steps (optimizer steps of the sparsity stage)")
        self.budget_steps = budget_steps
        if not isinstance(prune_pull, bool):
            raise TypeError(f"Pruner: prune_pull must be True or False, got {prune_pull!r}")
        self.prune_pull = prune_pull
        self.max_prune_fraction = check_max_prune_fraction(max_prune_fraction, "Pruner: max_prune_fraction")
        self.c0 = _check_number("c0", c0, positive=True)
        self.kappa = _check_number("kappa", kappa, positive=True)
        self.target_speedup = None if target_speedup is None else _check_number("target_speedup", target_speedup, positive=True)
        if self.target_speedup is not None and self.target_speedup < 1:
            raise ValueError(f"Pruner: target_speedup must be >= 1, got {self.target_speedup}")
        self.norm_threshold = _check_number("norm_threshold", norm_threshold, positive=True)
        self.catalyst_lr = None if catalyst_lr is None else _check_number("catalyst_lr", catalyst_lr, positive=True)
        self.grad_scaler = grad_scaler
        self.backend = backend
        round_widths([], round_to)  # validates round_to
        self.round_to = round_to
        self.steps = 0
        self.history: list[dict] = []  # one entry per prune(): the targets before it and the kept indices
        self._optimizers: list = []
        self._flops: Optional[FlopsModel] = None
        self.method.bind(self)

        self.targets, self.excluded = self.plan(model, self.example_inputs, method=method, mode=mode, formulation=formulation,
                                                ignored_layers=ignored_layers, bn_beta=self.bn_beta, targets=targets)
        self._build_target_set()
        catalysts = self.method.init_catalysts(self._ts, self.c0)
        self.catalysts: list[torch.Tensor] = self.formulation.attach_(model, self.targets, mode, catalysts)
        if self.formulation.is_attached(model):
            self._build_target_set()  # a wrapped BN lives at "<bn>.sigma"

    # ------------------------------------------------------------------------------------------ set-up
    @staticmethod
    def plan(model: nn.Module, example_inputs, *, method: str = "catalyst", mode: str = "group",
             formulation: str = "regularizer", ignored_layers: Sequence = (), bn_beta: bool = True,
             targets: Optional[Sequence[Target]] = None) -> tuple[list, list]:
        """``(targets, excluded)``: the groups a pruner with these settings regularises (DepGraph's groups,
        less ``ignored_layers``, what the method's mode and the formulation cannot carry), without attaching
        anything. ``excluded`` says why each left-out group is out."""
        method_obj, form = get_method(method), get_formulation(formulation)
        if targets is None:
            targets, excluded = find_targets(model, example_inputs, return_excluded=True, ignored_layers=ignored_layers)
        else:
            targets, excluded = list(targets), []
        eff_mode, eff_beta = method_obj.effective_mode(mode, bn_beta)
        ts = build_target_set(model, eff_mode, bn_beta=eff_beta, targets=targets)
        supported, unsupported = form.supported(model, ts.targets, mode)
        return list(supported), excluded + ts.excluded + unsupported

    def _build_target_set(self) -> None:
        self._flops = None
        eff_mode, eff_beta = self.method.effective_mode(self.mode, self.bn_beta)
        self._inner = self.formulation.inner(self.model, self.targets)
        self._ts: TargetSet = build_target_set(self.model, eff_mode, bn_beta=eff_beta, targets=self._inner)

    @property
    def target_set(self) -> TargetSet:
        """The regularised tensors and their :class:`~catalyst_fused.GroupLayout` (rebuilt after each prune)."""
        return self._ts

    @property
    def statistic(self) -> str:
        return self.method.statistic

    def _trained_catalysts(self) -> list:
        if not self.method.trains_catalysts:
            return []
        return list(self.catalysts) + self.formulation.extra_parameters(self.model)

    def param_groups(self, lr: float, **optimizer_kwargs) -> list[dict]:
        """Parameter groups for a ``torch.optim`` optimizer: the model's parameters with the given settings,
        and (for methods that train catalysts) the catalysts in their own group with no weight decay and
        ``catalyst_lr`` (default ``lr``); every other setting (momentum, betas, ...) is the weights'."""
        lr = _check_number("lr", lr, positive=True)
        extra = self._trained_catalysts()
        ids = {id(p) for p in extra}
        groups = [{"params": [p for p in self.model.parameters() if id(p) not in ids], "lr": lr, **optimizer_kwargs}]
        if extra:
            groups.append({"params": extra, "lr": lr if self.catalyst_lr is None else self.catalyst_lr,
                           **optimizer_kwargs, "weight_decay": 0.0})
        return groups

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Registers ``optimizer`` so that :meth:`prune` narrows its state and :meth:`after_step` reads its
        learning rate; adds the catalysts' group (no weight decay) if the optimizer does not hold them.

        Raises:
            ValueError: if the optimizer holds only some catalysts, or holds them with weight decay.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach_optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        extra = self._trained_catalysts()
        held = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        inside = [p for p in extra if id(p) in held]
        if extra and not inside:
            lr = optimizer.param_groups[0]["lr"] if self.catalyst_lr is None else self.catalyst_lr
            optimizer.add_param_group({"params": extra, "lr": lr, "weight_decay": 0.0})
        elif len(inside) != len(extra):
            raise ValueError("attach_optimizer: the optimizer holds some of the pruner's catalysts but not all")
        elif any(held[id(p)].get("weight_decay", 0.0) for p in extra):
            raise ValueError("attach_optimizer: the catalysts are in a parameter group with weight decay, which pulls "
                             "every c towards 'keep'; build the optimizer from pruner.param_groups(...)")
        if all(o is not optimizer for o in self._optimizers):
            self._optimizers.append(optimizer)
        if self.gamma_auto and self.gamma is None:
            self.resolve_gamma()
        return optimizer

    # ------------------------------------------------------------------- the dynamics (catalyst-method.md 9)
    def _weights_group(self) -> Optional[dict]:
        if not self._optimizers:
            return None
        ids = {id(p) for p in self._trained_catalysts()}
        groups = self._optimizers[0].param_groups
        return next((g for g in groups if not any(id(p) in ids for p in g["params"])), groups[0])

    def resolve_gamma(self, lr: Optional[float] = None, momentum: Optional[float] = None) -> float:
        """``gamma="auto"``: the gamma whose no-loss flow decides a channel ``AUTO_GAMMA_OFFSET`` off the
        threshold within half of ``budget_steps`` (:func:`~.dynamics.auto_gamma`), for the weights' learning
        rate and momentum (given, or read from the attached optimizer). Sets and returns ``self.gamma``."""
        group = self._weights_group()
        if lr is None or momentum is None:
            if group is None:
                raise ValueError("Pruner: gamma='auto' needs the learning rate and momentum: attach the optimizer "
                                 "(attach_optimizer) or call resolve_gamma(lr, momentum)")
            lr = group["lr"] if lr is None else lr
            momentum = group.get("momentum", 0.0) if momentum is None else momentum
        if self.budget_steps is None:
            raise ValueError("Pruner.resolve_gamma: needs budget_steps")
        k = self._k_stats()["mean"]
        self.gamma = auto_gamma(self.budget_steps, _check_number("lr", lr, positive=True), float(momentum), k, self.kappa)
        return self.gamma

    def _k_stats(self) -> dict:
        initial = getattr(self.method, "initial", None)
        if initial is None or initial.k.numel() == 0:
            return {"min": 1.0, "mean": 1.0, "max": 1.0}
        k = initial.k.double().cpu()
        return {"min": float(k.min()), "mean": float(k.mean()), "max": float(k.max())}

    def _settings(self, lr=None, momentum=None, weight_decay=None) -> Optional[tuple]:
        """(lr, momentum, weight decay) as given, else the attached optimizer's weights' group (None if neither)."""
        group = self._weights_group()
        if group is None and lr is None:
            return None
        group = group or {}
        return (float(group["lr"] if lr is None else lr), float(group.get("momentum", 0.0) if momentum is None else momentum),
                float(group.get("weight_decay", 0.0) if weight_decay is None else weight_decay))

    def rate(self, lr: Optional[float] = None, momentum: Optional[float] = None) -> Optional[float]:
        """``lam = lr gamma / (1 - momentum)`` for the given settings or the attached optimizer's weights' group
        (None when neither is known or gamma is not resolved)."""
        settings = self._settings(lr, momentum)
        if settings is None or self.gamma is None:
            return None
        return effective_rate(settings[0], self.gamma, settings[1])

    def momentum(self) -> float:
        """The momentum of the attached optimizer's weights' group (0 before one is attached)."""
        settings = self._settings()
        return 0.0 if settings is None else settings[1]

    @property
    def force_step(self) -> Optional[int]:
        """The step at which channels still undecided are decided by their side (None without a budget)."""
        return None if self.budget_steps is None else int(FORCE_FRACTION * self.budget_steps)

    def settle_steps(self, lam: Optional[float] = None) -> int:
        """Steps the flow needs to shrink a just-decided prune-side group to 0, ``1 / (lam sqrt(k) 10^kappa)``,
        plus the momentum build-up: the stop rule waits this long after the last decision."""
        lam = self.rate() if lam is None else lam
        if not lam:
            return 0
        return int(math.ceil(1.0 / (lam * math.sqrt(self._k_stats()["min"]) * 10.0 ** self.kappa))) + 10

    def pull_settings(self) -> dict:
        """The prune side's pull (:mod:`.control` step 5) for this step: ``{}`` when off or before an optimizer
        is attached, else the rate ``lam`` (``pull_rate``) and the steps per decade of growth ``pull_steps``
        (:meth:`settle_steps`: the time the flow alone would take to empty a just-decided group)."""
        lam = self.rate() if self.prune_pull else None
        if not lam:
            return {}
        return {"pull_rate": lam, "pull_steps": self.settle_steps(lam)}

    def flops_model(self) -> FlopsModel:
        """The FLOPs of the model as a function of prune masks (built once per set of targets)."""
        if self._flops is None:
            self._flops = FlopsModel(self.model, self._inner, self.example_inputs)
        return self._flops

    def rescale_catalysts_(self, factors: torch.Tensor) -> None:
        """Multiplies every catalyst by its entry of ``factors`` (flat over the targets' channels), through the
        formulation (the bypass keeps its function)."""
        self.formulation.rescale_(self.model, self.targets, self.catalysts, factors)

    def predictions(self, lr: Optional[float] = None, momentum: Optional[float] = None,
                    weight_decay: Optional[float] = None) -> dict:
        """What the no-loss flow predicts for this pruner's settings (catalyst-method.md section 9): ``k`` per
        group, the rate ``lam``, when a channel ``AUTO_GAMMA_OFFSET`` off the threshold (and one at ``c0``)
        decides, the step at which the end of the budget decides the rest, how far the prune side can reach,
        and warnings when the budget or ``kappa`` does not fit. The optimizer settings are the given ones, else
        the attached optimizer's."""
        k = self._k_stats()
        settings = self._settings(lr, momentum, weight_decay)
        lam = None if settings is None else self.rate(*settings[:2])
        out = {"k": k, "threshold_c_star": {"min": 1 / math.sqrt(k["max"]), "max": 1 / math.sqrt(k["min"])},
               "gamma": self.gamma, "gamma_auto": self.gamma_auto, "rate_lam": lam, "kappa": self.kappa,
               "budget_steps": self.budget_steps, "force_step": self.force_step, "warnings": []}
        if lam is None or self.method.name != "catalyst":
            return out
        offset = float(steps_to_decide(1 + AUTO_GAMMA_OFFSET, k["mean"], lam, self.kappa))
        out["steps_to_decide_offset"] = {"offset": AUTO_GAMMA_OFFSET, "steps": offset}
        if self.c0 != 1:
            out["steps_to_decide_c0"] = float(steps_to_decide(self.c0, k["mean"], lam, self.kappa))
        out["settle_steps"] = self.settle_steps(lam)
        out["reachable_log10_c"] = reachable_log10(lam, k["max"])
        rho = settings[2] / self.gamma if self.gamma else math.inf
        out["weight_decay_over_gamma"] = rho
        if self.kappa > out["reachable_log10_c"] - 0.5:
            out["warnings"].append(f"kappa {self.kappa} is within half a decade of the largest ratio the prune side can "
                                   f"reach at this rate (log10 1/(lam k) = {out['reachable_log10_c']:.2f}): decisions on "
                                   "the prune side may never come; lower kappa or gamma")
        if self.budget_steps is not None and offset > self.budget_steps:
            out["warnings"].append(f"the budget ({self.budget_steps} steps) is shorter than the predicted decision time of "
                                   f"a channel {AUTO_GAMMA_OFFSET:.0%} off the threshold ({offset:.0f} steps): most "
                                   "channels will be decided by the end of the budget, not by the data; raise gamma, the "
                                   "learning rate or the budget (or use gamma='auto')")
        if rho > 0.05:
            out["warnings"].append(f"weight decay / gamma = {rho:.2g}: weight decay moves the threshold towards 'keep' by "
                                   f"about {rho / 2:.1%} (not corrected)")
        return out

    # ------------------------------------------------------------------------------------ the training step
    def regularize(self, scale: Optional[float] = None):
        """Adds the sparsity term's gradients (``gamma``, or ``scale`` if given, times ``dR/dW`` and
        ``dR/dd``) into every ``.grad`` in one fused call, after ``backward()`` and before
        ``optimizer.step()``. Returns the call's :class:`~catalyst_fused.PenaltyStats` (norms and ratios of
        the weights before the step), or None for methods without a penalty (LATS)."""
        if scale is None and self.gamma is None:
            raise ValueError("Pruner.regularize: gamma='auto' is not resolved yet: attach the optimizer "
                             "(attach_optimizer) or call resolve_gamma(lr, momentum)")
        s = self.gamma if scale is None else scale
        scaler = self.grad_scaler
        if scaler is not None and scaler.is_enabled():
            s = s * scaler.get_scale()
        return self.method.regularize(self._ts, self.catalysts, s)

    def _lr(self) -> Optional[float]:
        return self._optimizers[0].param_groups[0]["lr"] if self._optimizers else None

    def after_step(self, lr: Optional[float] = None) -> None:
        """What the method needs after ``optimizer.step()`` (LATS: the soft threshold ``gamma * lr``; the
        learning rate comes from ``lr`` or the attached optimizer's first group)."""
        self.method.after_step(self._ts, self.gamma, lr if lr is not None else self._lr())
        self.steps += 1

    # ------------------------------------------------------------------------------------- decisions
    def scores(self, weights: Optional[Sequence[torch.Tensor]] = None) -> list[torch.Tensor]:
        """The method's statistic per channel, one fp64 CPU tensor per target (larger = prune)."""
        return self.method.scores(self._ts, self.catalysts, weights)

    def _speedup_of(self):
        dense = count_flops(self.model, self.example_inputs)["macs"]

        def speedup_of(masks):
            keep = {t.name: ~m for t, m in zip(self._inner, masks) if bool(m.any())}
            return dense / max(count_flops(prune_model(self.model, self._inner, keep), self.example_inputs)["macs"], 1)

        return speedup_of

    def rule(self):
        ctx = RuleContext(kappa=self.kappa, target_speedup=self.target_speedup, norm_threshold=self.norm_threshold,
                          max_prune_fraction=self.max_prune_fraction,
                          speedup_of=self._speedup_of() if self.target_speedup is not None and
                          self.method.reaches_target_by_ranking else None)
        return self.method.rule(ctx)

    def decisions(self, scores: Optional[Sequence[torch.Tensor]] = None, *, round_to: Optional[int] = None) -> list[Decision]:
        """The method's decision for every target (for the current weights unless ``scores`` are given), kept
        widths rounded up to a multiple of ``round_to`` (default: the pruner's; 1 = the rule's own decision)."""
        scores = self.scores() if scores is None else scores
        decisions = [Decision(t.name, s, prune, undecided, forced)
                     for t, s, (prune, undecided, forced) in zip(self.targets, scores, self.rule().decide(scores))]
        return round_widths(decisions, self.round_to if round_to is None else round_to)

    def undecided(self, scores: Optional[Sequence[torch.Tensor]] = None) -> int:
        scores = self.scores() if scores is None else scores
        return int(sum(int(m.sum()) for m in self.method.undecided(scores, self.kappa)))

    def all_decided(self) -> bool:
        """The method's stop rule: True when every channel is decided (Catalyst: every channel decided, and the
        last decision at least :meth:`settle_steps` ago). Always False for methods without a stop rule (their
        budget ends them)."""
        return self.method.all_decided(self)

    def stats(self) -> PruningStats:
        """The decision statistic per target, decided fractions and the margin (for logs and reports)."""
        scores = self.scores()
        undecided = self.method.undecided(scores, self.kappa)
        # the margin needs the decisions; a ranking to a FLOPs target counts FLOPs of trial removals, too
        # costly for a per-epoch figure, so it is left out there
        ranked = self.target_speedup is not None and self.method.reaches_target_by_ranking
        decisions = None if ranked else self.decisions(scores, round_to=1)
        per, total, decided, above = [], 0, 0, 0
        for t, s, u in zip(self.targets, scores, undecided):
            n_dec = int(s.numel() - int(u.sum()))
            n_above = int((s > 0).sum())
            per.append(TargetStats(t.name, int(s.numel()), n_dec, int(u.sum()), n_above, float(s.min()), float(s.max()), s))
            total += s.numel()
            decided += n_dec
            above += n_above
        with torch.no_grad():
            if self.method.uses_catalysts:
                from .. import functional as F_cf

                penalty = float(F_cf.penalty(self._ts.weights, self.catalysts, layout=self._ts.layout, return_stats=True,
                                             backend=self.backend).penalty)
            else:
                penalty = float(self.method.norms(self._ts).sum())  # the Group Lasso value sum_i n_i
        return PruningStats(self.method.statistic, penalty, per, int(total), decided, int(total - decided),
                            decided / max(total, 1), above / max(total, 1), None if ranked else margin(decisions))

    # ----------------------------------------------------------------------------------------- removal
    def _keep_from(self, keep: Mapping[str, object]) -> dict:
        names = {t.name: t for t in self.targets}
        unknown = sorted(set(keep) - set(names))
        if unknown:
            raise ValueError(f"prune: keep names {unknown}, which are not targets; targets are: {sorted(names)}")
        return {name: keep_indices(k, names[name].channels, f"keep[{name!r}] (target {name})") for name, k in keep.items()}

    @property
    def folds_constants(self) -> bool:
        """Whether removed channels can leave a constant behind: the regularised slices do not include the BN
        shift (filter mode, BN mode with ``bn_beta=False``, network slimming), so a channel with BN scale 0
        still outputs its shift. :meth:`prune` then folds that constant into the consumers' biases."""
        eff_mode, eff_beta = self.method.effective_mode(self.mode, self.bn_beta)
        return eff_mode == "filter" or (eff_mode == "bn" and not eff_beta)

    def constant_folds(self, keep: Mapping[str, object]) -> dict:
        """The constants the channels removed by ``keep`` feed their consumers (:func:`~.surgery.constant_inputs`;
        empty when :attr:`folds_constants` is False)."""
        if not self.folds_constants:
            return {}
        keep_idx = self._keep_from(keep)
        return constant_inputs(self.model, self._inner, keep_idx, self.example_inputs)

    def prune(self, keep: Optional[Mapping[str, object]] = None, *, optimizer: Optional[torch.optim.Optimizer] = None,
              round_to: Optional[int] = None, folds: Optional[Mapping[str, tuple]] = None) -> PruneSummary:
        """Removes channels physically, in place: by the method's decisions (kept widths rounded up to a
        multiple of ``round_to``, default the pruner's), or the given ``keep`` (per target name, a bool mask
        over its channels or integer indices; targets not named keep everything). ``folds``: the constants
        of removed channels to fold into their consumers (default: :meth:`constant_folds`).

        The model's modules keep their identity; the pruned layers get new, narrower parameters (with their
        gradients); the catalysts are narrowed; ``optimizer`` and every attached optimizer get the new
        parameters and their state narrowed; the targets are renumbered for the narrower model. Warns when
        no optimizer is known (one built earlier would keep updating the old parameters).

        Raises:
            ValueError: for an invalid ``keep`` (named), before anything changes.
        """
        decisions = None
        if keep is None:
            decisions = self.decisions(round_to=round_to)
            keep_idx = {d.target: d.keep for d in decisions if bool(d.prune.any())}
        else:
            keep_idx = {k: v for k, v in self._keep_from(keep).items() if v.numel() < next(
                t.channels for t in self.targets if t.name == k)}
        distributed.check_agreement(keep_idx)  # under torch.distributed: every rank removes the same channels
        macs_before = count_flops(self.model, self.example_inputs)["macs"]
        params_before = count_params(self.model)
        optimizers = list(self._optimizers)
        if optimizer is not None and all(o is not optimizer for o in optimizers):
            optimizers.append(optimizer)
        if folds is None and keep_idx and self.folds_constants:
            folds = constant_inputs(self.model, self._inner, keep_idx, self.example_inputs)
        folded = fold_constant_inputs_(self.model, folds) if folds else {}
        modules = dict(self.model.named_modules())
        for name, info in folded.items():  # a created bias trains with its layer's weight
            if info["created_bias"]:
                m = modules[name]
                for opt in optimizers:
                    group = next((g for g in opt.param_groups if any(p is m.weight for p in g["params"])), None)
                    if group is not None:
                        group["params"].append(m.bias)
        before = dict(self.model.named_modules())
        targets_before = [asdict(t) for t in self.targets]
        record = ParameterSlices()
        new_inner = remap_targets(before, self._inner, keep_idx)
        prune_model(self.model, self._inner, keep_idx, inplace=True, record=record)
        if self.formulation.is_attached(self.model):  # the catalysts are the bypass modules' d
            self.formulation.narrow_(self.model, self.targets, keep_idx, record)
            self.catalysts = self.formulation.catalysts(self.model, self.targets)
        else:
            self.catalysts = [narrow_tensor(d, 0, keep_idx[t.name], record) if t.name in keep_idx else d
                              for t, d in zip(self.targets, self.catalysts)]
        self.method.narrow_([keep_idx.get(t["name"]) for t in targets_before])
        for opt in optimizers:
            slice_optimizer_state_(opt, record)
        if not optimizers and record.slices:
            warnings.warn("Pruner.prune: no optimizer is attached; the pruned layers have new parameters, so an "
                          "optimizer built before prune() keeps updating the old ones. Pass it (prune(optimizer=...)), "
                          "attach it (attach_optimizer) or build a new one.", stacklevel=2)
        self.targets = self.formulation.outer(new_inner)
        self._build_target_set()
        self.history.append({"targets": targets_before, "keep": {k: v.tolist() for k, v in keep_idx.items()},
                             "created_biases": sorted(n for n, info in folded.items() if info["created_bias"])})
        per_target = {}
        for k, t in enumerate(targets_before):
            d = None if decisions is None else decisions[k]
            kept = len(keep_idx[t["name"]]) if t["name"] in keep_idx else t["channels"]
            per_target[t["name"]] = {"channels": t["channels"], "kept": kept, "pruned": t["channels"] - kept,
                                     "undecided": 0 if d is None else int(d.undecided.sum()),
                                     "forced_keep": False if d is None else d.forced_keep,
                                     "rounded": 0 if d is None else d.rounded}
        return PruneSummary(
            channels_total=sum(t["channels"] for t in targets_before),
            channels_pruned=sum(v["pruned"] for v in per_target.values()),
            undecided_total=sum(v["undecided"] for v in per_target.values()),
            per_target=per_target,
            keep={t["name"]: (keep_idx[t["name"]].tolist() if t["name"] in keep_idx else list(range(t["channels"])))
                  for t in targets_before},
            decisions=decisions,
            macs_before=macs_before, macs_after=count_flops(self.model, self.example_inputs)["macs"],
            params_before=params_before, params_after=count_params(self.model), folded=folded,
        )

    # ------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything needed to rebuild this pruner on a fresh copy of the original model: settings,
        targets, catalysts, the removals made so far, whether the model carries the bypass, the method's
        state. Tensors and plain Python values only."""
        return {
            "format": _STATE_FORMAT,
            "method": self.method.name, "mode": self.mode, "formulation": self.formulation.name,
            "bn_beta": self.bn_beta, "gamma": self.gamma, "gamma_auto": self.gamma_auto, "c0": self.c0,
            "kappa": self.kappa, "budget_steps": self.budget_steps, "prune_pull": self.prune_pull,
            "max_prune_fraction": self.max_prune_fraction,
            "targets": [asdict(t) for t in self.targets],
            "catalysts": [d.detach().cpu().clone() for d in self.catalysts],
            "history": [dict(h) for h in self.history],
            "attached": self.formulation.is_attached(self.model),
            "steps": self.steps,
            "method_state": self.method.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restores a :meth:`state_dict`. Call it on a pruner built the same way (same method, mode and
        formulation) on the *original* model, **before** ``model.load_state_dict``: earlier removals are
        re-applied here so that the model has the saved shapes.

        Raises:
            ValueError: for a state of another format, method, mode or formulation, or targets that do not
                match this model.
        """
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"Pruner.load_state_dict: not a pruner state (expected format {_STATE_FORMAT!r})")
        for key, mine in (("method", self.method.name), ("mode", self.mode), ("formulation", self.formulation.name)):
            if state[key] != mine:
                raise ValueError(f"Pruner.load_state_dict: the state was saved with {key}={state[key]!r} but this pruner "
                                 f"has {key}={mine!r}")
        for record in state["history"][len(self.history):]:
            current = [asdict(t) for t in self.targets]
            if current != record["targets"]:
                raise ValueError("Pruner.load_state_dict: the model's targets differ from the ones the saved removal "
                                 "was made on; build the pruner on the original model")
            with warnings.catch_warnings():  # a replay on a fresh model: no optimizer exists yet
                warnings.simplefilter("ignore", UserWarning)
                self.prune({k: torch.as_tensor(v, dtype=torch.long) for k, v in record["keep"].items()}, folds={})
            modules = dict(self.model.named_modules())
            for name in record.get("created_biases", []):  # their values come with the model's state
                m = modules[name]
                m.bias = nn.Parameter(torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device))
            self.history[-1]["created_biases"] = list(record.get("created_biases", []))
        if [asdict(t) for t in self.targets] != state["targets"]:
            raise ValueError("Pruner.load_state_dict: the saved targets do not match this model's")
        if state["attached"] and not self.formulation.is_attached(self.model):
            raise ValueError("Pruner.load_state_dict: the state has the bypass attached but this model has none")
        if not state["attached"] and self.formulation.is_attached(self.model):
            self.formulation.fold_(self.model)  # folded in the saved run; values come from the model's state
            self._build_target_set()
        if len(state["catalysts"]) != len(self.catalysts):
            raise ValueError(f"Pruner.load_state_dict: {len(state['catalysts'])} catalyst vectors for "
                             f"{len(self.catalysts)} targets")
        with torch.no_grad():
            for d, saved in zip(self.catalysts, state["catalysts"]):
                if d.shape != saved.shape:
                    raise ValueError(f"Pruner.load_state_dict: a catalyst of shape {tuple(saved.shape)} for one of "
                                     f"shape {tuple(d.shape)}")
                d.copy_(saved)
        self.gamma = None if state["gamma"] is None else float(state["gamma"])
        self.c0, self.kappa = float(state["c0"]), float(state["kappa"])
        self.prune_pull = bool(state.get("prune_pull", self.prune_pull))
        # states saved before the width floor removed down to the last channel
        self.max_prune_fraction = float(state.get("max_prune_fraction", 1.0))
        self.steps = int(state["steps"])
        self.method.load_state_dict(state.get("method_state", {}))

    # ---------------------------------------------------------------------------------- bypass (opt2)
    def bypass_penalty_(self, mu: float) -> float:
        """Bypass formulation, opt2: adds the gradient of ``mu * sum (d - dbar)^2`` (after ``backward()``)."""
        self._require_bypass("bypass_penalty_")
        return self.formulation.coefficient_penalty_(self.model, mu)

    def max_abs_coefficient(self) -> float:
        """Bypass formulation: ``max |d - dbar|`` over the kept channels (0.0 when folded)."""
        self._require_bypass("max_abs_coefficient")
        return self.formulation.max_abs_coefficient(self.model)

    def fold(self) -> float:
        """Bypass formulation, end of opt2: snaps ``d = dbar`` and removes the bypass modules in place, so the
        model has its original architecture (only narrower). Returns the residual ``max |d - dbar|``."""
        self._require_bypass("fold")
        residual = self.formulation.fold_(self.model)
        self._build_target_set()
        return residual

    def _require_bypass(self, what: str) -> None:
        if self.formulation.name != "bypass":
            raise ValueError(f"Pruner.{what}: only for formulation='bypass'")

    def __repr__(self) -> str:
        return (f"Pruner(method={self.method.name}, mode={self.mode}, formulation={self.formulation.name}, "
                f"targets={len(self.targets)}, channels={sum(t.channels for t in self.targets)}, gamma={self.gamma}, "
                f"c0={self.c0}, kappa={self.kappa})")


CatalystPruner = Pruner


def margin(decisions: Sequence[Decision], decided_only: bool = False) -> Optional[float]:
    """Smallest statistic among channels to prune minus the largest among kept ones (undecided channels
    count as kept; with ``decided_only`` they are left out), in decades; None if either side is empty."""
    pruned = torch.cat([d.statistic[d.prune] for d in decisions]) if decisions else torch.zeros(0)
    kept_mask = [(~d.prune) & ~d.undecided if decided_only else ~d.prune for d in decisions]
    kept = torch.cat([d.statistic[m] for d, m in zip(decisions, kept_mask)]) if decisions else torch.zeros(0)
    if pruned.numel() == 0 or kept.numel() == 0:
        return None
    return float(pruned.min() - kept.max())
