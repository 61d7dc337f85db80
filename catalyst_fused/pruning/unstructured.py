"""Unstructured pruning to a target sparsity: LATS soft-threshold reparameterisation (Chen et al., ICLR 2023)
and plain magnitude pruning, through the same ``cf.Pruner`` loop as Catalyst.

    pruner = cf.Pruner(model, example_inputs, method="lats", sparsity=0.9, total_steps=epochs * len(loader),
                       steps_per_epoch=len(loader))
    optimizer = torch.optim.SGD(pruner.param_groups(lr=0.05, momentum=0.9, weight_decay=5e-4))
    pruner.attach_optimizer(optimizer)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)   # stepped per epoch
    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            pruner.regularize()        # the optimizer will update the latent theta (straight-through)
            optimizer.step()
            pruner.after_step()        # w = S_t(theta) and the zero count: one fused call for every tensor
        scheduler.step()
    summary = pruner.prune()           # masks fixed at the target sparsity; fine-tune with the same loop

**LATS** (``method="lats"``). The network computes with ``w = sign(theta) * max(|theta| - t, 0)``; the
backward is straight-through (``dL/dtheta = dL/dw``), so the optimizer updates the latent ``theta``
(weight decay and momentum included) and ``w`` is recomputed after every step. This is proximal SGD on
``L + lam_k ||w||_1`` with ``lam_k = (t_{k+1} - t_k) / lr_k`` (catalyst-method.md section 7). How it is done:
the model's parameters hold ``w`` (forward, evaluation and ``state_dict()`` see the sparse weights); the
pruner keeps ``theta``; :meth:`~SparsityPruner.regularize` points each parameter at its ``theta`` for the
optimizer step (``param.data``; the gradient, computed at ``w``, stays) and
:meth:`~SparsityPruner.after_step` writes ``w = S_t(theta)`` with one ``cf.soft_threshold_`` call over every
tensor (which also counts the zeros) and points the parameters back at ``w``.

The threshold is ``t_k = T * s(k / K)`` over ``K = total_steps`` steps, ``s`` from ``schedule``:

* ``"lats"``: ``lam`` constant under a cosine learning rate stepped once per epoch (``lr_e ~ 1 + cos(pi e /
  E)``, what ``CosineAnnealingLR(T_max=E)`` gives and what the workflow uses): ``t`` is the cumulative
  learning rate, a per-epoch discrete cumulative cosine, linear within each epoch;
* ``"slats"`` (S-LATS): the smooth form ``s(x) = x + sin(pi x) / pi`` (``lam`` constant under a per-step cosine);
* ``"continuation"``: ``lam`` grows geometrically, ``lam(x) ~ beta^x`` (a factor ``beta`` over the run),
  under the smooth cosine: ``s(x) = F(x) / F(1)``, ``F(x) = int_0^x beta^u (1 + cos(pi u)) du``.

**Target sparsity, by feedback.** The final threshold ``T`` is not a hand-set hyper-parameter: at the start
and at every epoch boundary (``steps_per_epoch``) it is re-estimated as the value that would give the target
sparsity on the current ``theta`` (the ``round(sparsity * n)``-th smallest ``|theta|``: one threshold over all
chosen tensors with ``scope="global"``, one per tensor with ``scope="layer"``), and at the last step it is
set exactly, so the final sparsity is the target (up to ties). Calibration by a short run was not chosen:
it costs runs and ``theta`` moves after it anyway.

**Magnitude** (``method="magnitude"``): the baseline at the same sparsity: at construction the weights
with the smallest ``|w|`` (global or per layer) are zeroed once and the masks kept for the rest of training
(:meth:`~SparsityPruner.after_step` re-applies them).

**Which tensors**: the weights of the ``Conv*d`` and ``Linear`` modules the forward pass runs, except the first
one and the last one (the classifier) unless ``include_first`` / ``include_classifier``; ``layers`` (modules
or names) picks them explicitly; ``ignored_layers`` removes some. Biases, BatchNorm and other parameters are
never pruned (they are counted in the whole-model figures).

**Output.** :meth:`~SparsityPruner.prune` fixes the masks (LATS: ``w = S_T(theta)`` at the exact target
threshold, so the accuracy does not change), drops ``theta`` and returns a :class:`SparsitySummary` (real
sparsity per tensor and in total against the target); afterwards ``after_step`` keeps the masks, so
fine-tuning uses the same loop. :meth:`~SparsityPruner.masks` gives the masks. Unstructured zeros do not make
dense kernels faster: the model keeps its shapes and its FLOPs (see the README's measurement of sparse
kernels on CPU).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from ..sparsity import soft_threshold_
from .targets import _ignored_names, example_batch, run_example

__all__ = ["SPARSITY_METHODS", "SCHEDULES", "SCOPES", "is_unstructured", "schedule_progress", "SparseTarget",
           "choose_tensors", "SparsityPruner", "SparsityStats", "SparsitySummary", "sparse_macs"]

SPARSITY_METHODS = ("lats", "magnitude")
SCHEDULES = ("lats", "slats", "continuation")
SCOPES = ("global", "layer")
_STATE_FORMAT = "catalyst_fused.sparsity_pruner/1"
_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def is_unstructured(method: str) -> bool:
    """Whether ``method`` is one of the unstructured methods of this module (not a channel method)."""
    return method in SPARSITY_METHODS


# ------------------------------------------------------------------------------------------ schedules
def _continuation_integral(x: float, beta: float) -> float:
    """``int_0^x beta^u (1 + cos(pi u)) du`` in closed form (``beta > 0``, ``beta != 1``)."""
    lb = math.log(beta)
    bx = beta ** x
    return (bx - 1) / lb + (bx * (lb * math.cos(math.pi * x) + math.pi * math.sin(math.pi * x)) - lb) / (lb * lb + math.pi ** 2)


def schedule_progress(schedule: str, step: int, total_steps: int, steps_per_epoch: Optional[int] = None,
                      beta: float = 10.0) -> float:
    """``s(step / total_steps)`` in [0, 1]: the fraction of the final threshold reached after ``step`` steps
    (see the module docstring; 1 from ``total_steps`` on)."""
    if step >= total_steps:
        return 1.0
    if step <= 0:
        return 0.0
    x = step / total_steps
    if schedule == "slats":
        return x + math.sin(math.pi * x) / math.pi
    if schedule == "continuation":
        if abs(beta - 1.0) < 1e-9:
            return x + math.sin(math.pi * x) / math.pi
        return _continuation_integral(x, beta) / _continuation_integral(1.0, beta)
    if schedule == "lats":
        # cumulative learning rate over steps, lr of epoch e ~ 1 + cos(pi e / E), E epochs (the last may be short)
        per = steps_per_epoch or total_steps
        epochs = -(-total_steps // per)

        def cumulative(k: int) -> float:
            full, part = divmod(k, per)
            done = sum(per * (1 + math.cos(math.pi * e / epochs)) for e in range(full))
            return done + part * (1 + math.cos(math.pi * full / epochs))

        return cumulative(step) / cumulative(total_steps)
    raise ValueError(f"schedule: unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


# ------------------------------------------------------------------------------------------ targets
@dataclass
class SparseTarget:
    """One pruned tensor: the weight of module ``module`` (parameter name ``name``)."""

    name: str
    module: str
    shape: list
    numel: int


def choose_tensors(model: nn.Module, example_inputs=None, *, layers: Optional[Sequence] = None,
                   ignored_layers: Sequence = (), include_first: bool = False,
                   include_classifier: bool = False) -> tuple[list, list]:
    """``(targets, excluded)``: the weights an unstructured pruner sparsifies (module docstring) and the
    left-out conv/linear modules with the reason (``{"producers": [name], "reason": ...}``).

    ``example_inputs`` (a batch, or one sample's shape) runs one forward pass to find the order in which the
    modules run (first layer, classifier); without it, the registration order is used.

    Raises:
        ValueError: for a ``layers`` entry that is not a conv/linear module of the model, or no tensor left.
    """
    modules = dict(model.named_modules())
    by_id = {id(m): n for n, m in modules.items()}
    if layers is not None:
        names = []
        for k, layer in enumerate(layers):
            name = layer if isinstance(layer, str) else by_id.get(id(layer))
            if name not in modules or not isinstance(modules[name], _PRUNABLE):
                raise ValueError(f"layers[{k}]: {layer if isinstance(layer, str) else type(layer).__name__} is not a "
                                 "Conv or Linear module of the model")
            names.append(name)
        chosen, excluded = list(dict.fromkeys(names)), []
    else:
        order = _execution_order(model, example_inputs)
        excluded = []
        chosen = list(order)
        if chosen and not include_first:
            excluded.append({"producers": [chosen[0]], "reason": "first layer (include it with include_first / "
                                                                   "--sparsify-first)"})
        if len(chosen) > 1 and not include_classifier:
            excluded.append({"producers": [chosen[-1]], "reason": "classifier, the last layer (include it with "
                                                                   "include_classifier / --sparsify-classifier)"})
        dropped = {e["producers"][0] for e in excluded}
        chosen = [n for n in chosen if n not in dropped]
    ignored = _ignored_names(model, ignored_layers)
    for n in [n for n in chosen if n in ignored]:
        excluded.append({"producers": [n], "reason": "in ignored_layers"})
    chosen = [n for n in chosen if n not in ignored]
    targets, seen = [], set()
    for n in chosen:
        w = modules[n].weight
        if id(w) in seen:  # a weight shared by several modules is pruned once
            continue
        seen.add(id(w))
        targets.append(SparseTarget(name=f"{n}.weight" if n else "weight", module=n, shape=list(w.shape), numel=w.numel()))
    if not targets:
        raise ValueError("Pruner: no tensor to sparsify (every conv/linear layer is excluded: "
                         + "; ".join(f"{e['producers'][0]}: {e['reason']}" for e in excluded) + ")")
    return targets, excluded


def _execution_order(model: nn.Module, example_inputs) -> list[str]:
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, _PRUNABLE)]
    if example_inputs is None:
        return [n for n, _ in candidates]
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
             for n, m in candidates]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            run_example(model, example_batch(model, example_inputs))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return order


# ------------------------------------------------------------------------------------------ reports
@dataclass
class SparsityStats:
    """The sparsity right now: per target ``{"numel", "zeros", "sparsity", "threshold"}`` and over them all."""

    method: str
    target: float
    scope: str
    step: int
    total_steps: Optional[int]
    progress: float  # s(k / K): the fraction of the final threshold in force
    sparsity: float  # zeros / elements over the chosen tensors
    zeros: int
    elements: int
    final_threshold: list  # the current estimate of T (one value, or one per tensor)
    per_target: dict = field(default_factory=dict)


@dataclass
class SparsitySummary:
    """What :meth:`SparsityPruner.prune` did: the real sparsity against the target, per tensor and in total,
    and over every parameter of the model (biases, BatchNorm and the layers left dense included)."""

    method: str
    target: float
    scope: str
    sparsity: float
    zeros: int
    elements: int
    abs_error_points: float  # |sparsity - target| in percentage points
    per_target: dict
    model_params: int
    model_zeros: int
    model_sparsity: float
    final_threshold: list


# ------------------------------------------------------------------------------------------ the pruner
def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value < 1:
        raise ValueError(f"Pruner: {name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_steps(name: str, value, required: bool) -> Optional[int]:
    if value is None:
        if required:
            raise ValueError(f"Pruner: method 'lats' needs {name} (the number of optimizer steps its threshold schedule "
                             "spans, e.g. epochs * len(loader))")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Pruner: {name} must be an integer >= 1, got {value!r}")
    return value


class SparsityPruner:
    """Unstructured LATS or magnitude pruning of ``model`` to ``sparsity`` (see the module docstring). What
    ``cf.Pruner(model, example_inputs, method="lats" | "magnitude", ...)`` returns.

    Args:
        model: the network (its conv/linear weights are sparsified in place).
        example_inputs: a batch (or one sample's shape) for one forward pass that finds the layer order;
            None: the modules' registration order.
        method: ``"lats"`` or ``"magnitude"``.
        sparsity: the target fraction of zeros over the chosen tensors, in [0, 1).
        scope: ``"global"`` (one threshold over all chosen tensors) or ``"layer"`` (each tensor at ``sparsity``).
        schedule: LATS threshold schedule, ``"lats"`` (default), ``"slats"`` or ``"continuation"``.
        beta: growth of ``lam`` over the run for ``"continuation"`` (> 0; 10 unless given: our choice).
        total_steps: LATS: optimizer steps over which the threshold rises to its final value.
        steps_per_epoch: LATS: steps per epoch (the ``"lats"`` schedule's epochs, and when ``T`` is
            re-estimated); default ``total_steps``.
        layers, ignored_layers, include_first, include_classifier: which tensors (module docstring).
        backend: kernel backend of ``cf.soft_threshold_``.
        targets: skip the layer search and use these :class:`SparseTarget` s (e.g. from :func:`choose_tensors`).

    Raises:
        ValueError / TypeError: for bad arguments, naming them.
    """

    def __init__(self, model: nn.Module, example_inputs=None, *, method: str = "lats", sparsity: Optional[float] = None,
                 scope: str = "global", schedule: Optional[str] = None, beta: Optional[float] = None,
                 total_steps: Optional[int] = None, steps_per_epoch: Optional[int] = None, layers: Optional[Sequence] = None,
                 ignored_layers: Sequence = (), include_first: bool = False, include_classifier: bool = False,
                 backend: str = "auto", targets: Optional[Sequence[SparseTarget]] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Pruner: model must be an nn.Module, got {type(model).__name__}")
        if method not in SPARSITY_METHODS:
            raise ValueError(f"Pruner: unknown unstructured method {method!r}; choose one of: {', '.join(SPARSITY_METHODS)}")
        if sparsity is None:
            raise ValueError(f"Pruner: method {method!r} needs sparsity= (the target fraction of zero weights, e.g. 0.9); "
                             "the channel baseline that was called 'lats' is now 'lats_channel'")
        if scope not in SCOPES:
            raise ValueError(f"Pruner: scope must be one of {SCOPES}, got {scope!r}")
        if method == "magnitude" and (schedule is not None or beta is not None):
            raise ValueError("Pruner: schedule and beta are LATS options; method 'magnitude' prunes once, at construction")
        schedule = "lats" if schedule is None else schedule
        if schedule not in SCHEDULES:
            raise ValueError(f"Pruner: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if beta is not None and schedule != "continuation":
            raise ValueError(f"Pruner: beta is the 'continuation' schedule's growth factor; schedule is {schedule!r}")
        beta = 10.0 if beta is None else beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"Pruner: beta must be a finite number > 0, got {beta!r}")
        self.model = model
        self.method = method
        self.sparsity = _check_fraction("sparsity", sparsity)
        self.scope = scope
        self.schedule = schedule
        self.beta = float(beta)
        self.total_steps = _check_steps("total_steps", total_steps, required=method == "lats")
        self.steps_per_epoch = _check_steps("steps_per_epoch", steps_per_epoch, required=False)
        self.backend = backend
        if targets is None:
            targets, excluded = choose_tensors(model, example_inputs, layers=layers, ignored_layers=ignored_layers,
                                               include_first=include_first, include_classifier=include_classifier)
        else:
            targets, excluded = list(targets), []
        self.targets: list[SparseTarget] = targets
        self.excluded: list = excluded
        self.steps = 0
        self.history: list[dict] = []  # one record per prune(): when and at what sparsity the masks were fixed
        self.threshold_history: list[dict] = []  # every re-estimate of the final threshold T
        self._optimizers: list = []
        self._swapped: Optional[list] = None  # the w tensors while the parameters point at theta
        params = dict(model.named_parameters(remove_duplicate=False))
        missing = [t.name for t in targets if t.name not in params]
        if missing:
            raise ValueError(f"Pruner: targets {missing} are not parameters of the model")
        self.params: list[nn.Parameter] = [params[t.name] for t in targets]
        for t, p in zip(targets, self.params):
            if list(p.shape) != list(t.shape):
                raise ValueError(f"Pruner: target {t.name} has shape {t.shape} but the parameter has {list(p.shape)}")
        self.theta: Optional[list[torch.Tensor]] = None
        self.masks_fixed: Optional[list[torch.Tensor]] = None
        self.final_threshold = self._estimate_threshold([p.detach() for p in self.params])
        self.thresholds = [0.0] * len(self.params)
        if method == "lats":
            self.theta = [p.detach().clone(memory_format=torch.contiguous_format) for p in self.params]
            self._record_threshold("start")
        else:  # magnitude: prune once, now
            with torch.no_grad():
                self.thresholds = self._per_tensor(self.final_threshold)
                weights = [p.detach() for p in self.params]
                masks = [(w.abs() > t) for w, t in zip(weights, self.thresholds)]
                torch._foreach_mul_(weights, masks)
                self.masks_fixed = masks

    # ------------------------------------------------------------------------------------------ threshold
    def _estimate_threshold(self, tensors: Sequence[torch.Tensor]) -> list[float]:
        """The threshold(s) giving the target sparsity on ``tensors``: the ``round(sparsity * n)``-th smallest
        magnitude (0 when that is 0 elements): one value (global) or one per tensor (layer)."""
        def kth(values: torch.Tensor) -> float:
            k = int(round(self.sparsity * values.numel()))
            if k == 0:
                return 0.0
            v = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
            return float(torch.kthvalue(v.cpu(), k).values)

        with torch.no_grad():
            if self.scope == "global":
                return [kth(torch.cat([t.reshape(-1).abs() for t in tensors]))]
            return [kth(t.reshape(-1).abs()) for t in tensors]

    def _per_tensor(self, values: Sequence[float]) -> list[float]:
        return list(values) * len(self.params) if len(values) == 1 else list(values)

    def _record_threshold(self, why: str) -> None:
        self.threshold_history.append({"step": self.steps, "why": why, "final_threshold": list(self.final_threshold)})

    def progress(self) -> float:
        """``s(k / K)``: the fraction of the final threshold in force after the steps so far (1 for magnitude)."""
        if self.method != "lats":
            return 1.0
        return schedule_progress(self.schedule, self.steps, self.total_steps, self.steps_per_epoch, self.beta)

    # ------------------------------------------------------------------------------------------ the loop
    def param_groups(self, lr: float, **optimizer_kwargs) -> list[dict]:
        """One parameter group with every parameter of the model (the latent ``theta`` is what the optimizer
        will update in the pruned tensors; weight decay applies to it, as in the paper)."""
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"Pruner: lr must be a finite number > 0, got {lr!r}")
        return [{"params": list(self.model.parameters()), "lr": float(lr), **optimizer_kwargs}]

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Registers ``optimizer`` (same call as for Catalyst; the parameters keep their identity, so nothing
        has to be narrowed later)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach_optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._optimizers.append(optimizer)
        return optimizer

    def regularize(self, scale: Optional[float] = None) -> None:
        """After ``backward()``, before ``optimizer.step()``. LATS: points every pruned parameter at its latent
        ``theta`` so that the step updates ``theta`` with the gradient computed at ``w`` (straight-through).
        Nothing for magnitude or after :meth:`prune`."""
        if self.theta is None:
            return None
        if self._swapped is not None:
            raise RuntimeError("Pruner.regularize: called twice without after_step(); the loop is backward, "
                               "regularize(), optimizer.step(), after_step()")
        self._swapped = []
        for p, theta in zip(self.params, self.theta):
            self._swapped.append(p.data)
            p.data = theta
        return None

    def after_step(self, lr: Optional[float] = None) -> torch.Tensor:
        """After ``optimizer.step()``: LATS writes ``w = S_t(theta)`` with this step's threshold (one fused call
        for every tensor), re-estimating the final threshold at epoch boundaries and setting it exactly at the
        last step; after :meth:`prune` (and for magnitude) the masks are re-applied. Returns the zero count per
        tensor (int64). ``lr`` is accepted for the same loop as Catalyst and not used."""
        self.steps += 1
        if self.theta is None:
            with torch.no_grad():
                weights = [p.detach() for p in self.params]
                torch._foreach_mul_(weights, self.masks_fixed)
                return torch.stack([(w == 0).sum() for w in weights])
        if self._swapped is None:
            raise RuntimeError("Pruner.after_step: regularize() was not called before optimizer.step(); the loop is "
                               "backward, regularize(), optimizer.step(), after_step() (the step must update theta)")
        weights, self._swapped = self._swapped, None
        for p, w in zip(self.params, weights):
            p.data = w
        if self.steps >= self.total_steps or (self.steps_per_epoch and self.steps % self.steps_per_epoch == 0):
            self.final_threshold = self._estimate_threshold(self.theta)
            self._record_threshold("last step" if self.steps == self.total_steps else "epoch boundary")
        s = self.progress()
        self.thresholds = [s * t for t in self._per_tensor(self.final_threshold)]
        return soft_threshold_(weights, self.thresholds, sources=self.theta, backend=self.backend)

    def all_decided(self) -> bool:
        """The stop rule: True once the threshold schedule has run its ``total_steps`` (magnitude: always)."""
        return self.method != "lats" or self.steps >= self.total_steps

    # ------------------------------------------------------------------------------------------ reports
    def _per_target(self, weights) -> tuple[dict, int, int]:
        per, zeros, elements = {}, 0, 0
        for t, w, thr in zip(self.targets, weights, self._per_tensor(self.thresholds)):
            z = int((w == 0).sum())
            per[t.name] = {"numel": t.numel, "zeros": z, "sparsity": z / max(t.numel, 1), "threshold": thr}
            zeros += z
            elements += t.numel
        return per, zeros, elements

    def stats(self) -> SparsityStats:
        """The sparsity of the weights the model computes with, per tensor and in total."""
        with torch.no_grad():
            per, zeros, elements = self._per_target([p.detach() for p in self._current_weights()])
        return SparsityStats(self.method, self.sparsity, self.scope, self.steps, self.total_steps, self.progress(),
                             zeros / max(elements, 1), zeros, elements, list(self.final_threshold), per)

    def _current_weights(self) -> list:
        return self._swapped if self._swapped is not None else [p.detach() for p in self.params]

    def masks(self) -> dict:
        """``{tensor name: bool mask}`` (True = kept): the fixed masks after :meth:`prune` (and for magnitude),
        else the current non-zeros."""
        src = self.masks_fixed if self.masks_fixed is not None else [w != 0 for w in self._current_weights()]
        return {t.name: m.detach().clone() for t, m in zip(self.targets, src)}

    # ------------------------------------------------------------------------------------------ prune
    def prune(self, keep=None, *, optimizer=None) -> SparsitySummary:
        """Fixes the masks (LATS: ``w = S_T(theta)`` with ``T`` set exactly for the target on the current
        ``theta``; magnitude: the masks made at construction) and drops ``theta``; afterwards
        :meth:`after_step` keeps the masks. No channel is removed: the model keeps its shapes.

        Raises:
            ValueError: for ``keep`` (channel keep sets belong to the structured methods).
            RuntimeError: between :meth:`regularize` and :meth:`after_step`.
        """
        if keep is not None:
            raise ValueError("Pruner.prune: keep= selects channels; unstructured methods fix masks from the sparsity target")
        if self._swapped is not None:
            raise RuntimeError("Pruner.prune: called between regularize() and after_step()")
        with torch.no_grad():
            weights = [p.detach() for p in self.params]
            if self.theta is not None:
                self.final_threshold = self._estimate_threshold(self.theta)
                self._record_threshold("prune")
                self.thresholds = self._per_tensor(self.final_threshold)
                soft_threshold_(weights, self.thresholds, sources=self.theta, backend=self.backend)
                self.theta = None
                self.masks_fixed = [w != 0 for w in weights]
            per, zeros, elements = self._per_target(weights)
            all_params = list(self.model.parameters())
            model_zeros = sum(int((p == 0).sum()) for p in all_params)
            model_params = sum(p.numel() for p in all_params)
        sparsity = zeros / max(elements, 1)
        self.history.append({"step": self.steps, "sparsity": sparsity, "target": self.sparsity,
                             "final_threshold": list(self.final_threshold)})
        return SparsitySummary(self.method, self.sparsity, self.scope, sparsity, zeros, elements,
                               100 * abs(sparsity - self.sparsity), per, model_params, model_zeros,
                               model_zeros / max(model_params, 1), list(self.final_threshold))

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Settings, targets, step, thresholds, ``theta`` (LATS before prune) and the fixed masks: tensors and
        plain Python values only."""
        if self._swapped is not None:
            raise RuntimeError("Pruner.state_dict: called between regularize() and after_step()")
        return {
            "format": _STATE_FORMAT, "method": self.method, "sparsity": self.sparsity, "scope": self.scope,
            "schedule": self.schedule, "beta": self.beta, "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch, "targets": [asdict(t) for t in self.targets], "steps": self.steps,
            "final_threshold": list(self.final_threshold), "thresholds": list(self.thresholds),
            "theta": None if self.theta is None else [t.detach().cpu().clone() for t in self.theta],
            "masks": None if self.masks_fixed is None else [m.cpu().clone() for m in self.masks_fixed],
            "history": [dict(h) for h in self.history], "threshold_history": [dict(h) for h in self.threshold_history],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` on a pruner built the same way (method, targets); load the model's
        weights too (before or after: the model's parameters hold ``w``, the pruner ``theta``).

        Raises:
            ValueError: for a state of another format or method, or other targets.
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"Pruner.load_state_dict: not an unstructured pruner state (expected format {_STATE_FORMAT!r})")
        if state["method"] != self.method:
            raise ValueError(f"Pruner.load_state_dict: the state was saved with method={state['method']!r} but this "
                             f"pruner has method={self.method!r}")
        if state["targets"] != [asdict(t) for t in self.targets]:
            raise ValueError("Pruner.load_state_dict: the saved targets (tensors and shapes) differ from this pruner's")
        self.sparsity, self.scope, self.schedule = float(state["sparsity"]), state["scope"], state["schedule"]
        self.beta, self.total_steps, self.steps_per_epoch = float(state["beta"]), state["total_steps"], state["steps_per_epoch"]
        self.steps = int(state["steps"])
        self.final_threshold = [float(v) for v in state["final_threshold"]]
        self.thresholds = [float(v) for v in state["thresholds"]]
        device = self.params[0].device
        self.theta = None if state["theta"] is None else [t.to(device=device, dtype=p.dtype).clone()
                                                          for t, p in zip(state["theta"], self.params)]
        self.masks_fixed = None if state["masks"] is None else [m.to(device).clone() for m in state["masks"]]
        self.history = [dict(h) for h in state.get("history", [])]
        self.threshold_history = [dict(h) for h in state.get("threshold_history", [])]

    def __repr__(self) -> str:
        return (f"SparsityPruner(method={self.method}, sparsity={self.sparsity}, scope={self.scope}, "
                f"schedule={self.schedule if self.method == 'lats' else None}, tensors={len(self.targets)}, "
                f"elements={sum(t.numel for t in self.targets)}, step={self.steps}/{self.total_steps})")


def sparse_macs(model: nn.Module, example_inputs) -> dict:
    """Multiply-accumulates of the conv and linear layers for one sample: ``dense`` (what dense kernels run)
    and ``nonzero`` (those with a non-zero weight: what an ideal sparse kernel would run)."""
    dense = nonzero = 0

    def hook(mod, args, out):
        nonlocal dense, nonzero
        channels = out.shape[-1] if isinstance(mod, nn.Linear) else out.shape[1]
        positions = out[0].numel() // max(channels, 1)  # where each output channel is computed, one sample
        dense += positions * mod.weight.numel()
        nonzero += positions * int((mod.weight != 0).sum())

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _PRUNABLE)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            batch = example_batch(model, example_inputs)
            x = batch if not isinstance(batch, torch.Tensor) else batch[:1]
            run_example(model, x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {"dense": dense, "nonzero": nonzero, "ratio": dense / max(nonzero, 1)}

