"""The bypass formulation ("extended model", catalyst-method.md section 4b) and its opt2.

For every target, a channel-wise op ``sigma`` after the producer conv is replaced by

    psi(x) = D x - Dbar x + sigma(x),    D = diag(d), Dbar = diag(dbar), d = dbar = c0 * n at the start,

so the extended model computes exactly the original function at the start. ``d`` is the catalyst: it
enters the fused penalty ``R = sum_i |d_i| n_i`` (same target set and layout as the regularizer-only mode,
so ``c_i = |d_i| / n_i``) *and* the forward pass. A :class:`Bypass` module holds ``sigma``, ``d`` and
``dbar`` and is swapped in for ``sigma`` on a copy of the model (:func:`attach`); :func:`unwrap` swaps the
plain ``sigma`` back.

Choices **[our reading]** (the poster does not say them):

* *Where* (``sigma``): the target's BatchNorm if it has one, else the activation module right after the
  producer conv (it must be an ``nn`` activation module called once in the graph: a functional or shared
  activation cannot carry one ``d`` per layer; the ReLU modules of our CNNs and ResNets are shared, the
  BatchNorms never are). In ``group`` and ``filter`` mode the bypass taps the BN *input*, the producer's
  output, which goes to 0 with a pruned channel's group (its conv row is in the group): the bypass of a
  pruned channel vanishes with it (the poster's "``A D W = 0`` when ``D W = 0``"). In ``bn`` mode the
  group is the BN's ``gamma_i, beta_i`` and the conv output of a pruned channel does not go to 0, so a
  bypass on the BN input would carry the signal of pruned channels past the penalty and make their
  removal lossy. There the bypass taps the BN *output* (the target's output): ``psi(x) = (d - dbar) BN(x)
  + BN(x)``, i.e. ``sigma`` is the identity after the target.
* *Which targets*: groups with one producer and at most one BatchNorm (:func:`supported_targets`). A
  coupled group (a ResNet stage's residual channels: several producers, several BNs) has no single
  ``sigma`` to extend; the pipeline leaves such groups out of a bypass run and reports them as excluded.
* ``dbar`` is a trained parameter, in the catalysts' parameter group (no weight decay, ``catalyst_lr``).
  The loss gradients of ``d`` and ``dbar`` are equal and opposite, so ``d + dbar`` moves with the penalty
  only and the bypass coefficient ``d - dbar`` with the loss (and the penalty's pull on ``d``).
* opt2 drives the coefficient ``d - dbar`` of the kept channels to 0 with the penalty
  ``mu_t * sum_i (d_i - dbar_i)^2`` added to the task loss (``mu_t`` ramps up linearly over
  ``opt2_ramp`` epochs to ``opt2_mu``), weights, ``d`` and ``dbar`` all trained, constant ``opt2_lr``.
  We prefer it to a scheduled interpolation ``d <- dbar + (1 - t/T)(d - dbar)``: the penalty is one more
  term of the training objective, so the optimizer trades each coefficient against the task loss step by
  step while the weights absorb it, and what is left at the end is a *measured* residual (a check that the
  bypass was made unnecessary), not zero by construction. For momentum SGD the penalty's step is stable
  iff ``4 * lr * mu < 2 * (1 + momentum)`` (its curvature along ``d - dbar`` is ``4 mu``); the config
  rejects larger ``mu``. At the end :func:`snap_and_fold` checks the residual ``max |d - dbar|`` against
  ``opt2_tol``, sets ``d = dbar`` exactly (then ``psi == sigma``), reports the residual and the accuracy
  change the snap causes, and unwraps: the final model has the original architecture, only narrower.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import fx, nn

from .surgery import keep_indices, prune_model, replace_module
from .targets import Target

__all__ = [
    "Bypass",
    "Site",
    "find_sites",
    "attach",
    "attach_",
    "unwrap",
    "unwrap_",
    "outer_targets",
    "narrow_",
    "fold_",
    "is_wrapped",
    "wrappers",
    "inner_targets",
    "supported_targets",
    "catalysts",
    "bypass_parameters",
    "prune",
    "max_abs_coefficient",
    "add_coefficient_penalty_grad_",
    "opt2_mu",
    "opt2_optimizer",
    "snap_and_fold",
]

# Activations a bypass may replace when a target has no BatchNorm (pooling and dropout are channel-wise
# too, but pooling changes the shape and dropout is not the layer's nonlinearity).
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish)
_TAPS = ("input", "output")


@dataclass(frozen=True)
class Site:
    """Where the bypass of one target goes: ``name`` is the module replaced (``sigma``); ``tap`` says which
    tensor ``D - Dbar`` multiplies: ``"input"`` (``psi(x) = (d - dbar) x + sigma(x)``) or ``"output"``
    (``psi(x) = (d - dbar) sigma(x) + sigma(x)``, bn mode)."""

    producer: str
    name: str
    tap: str


class Bypass(nn.Module):
    """``psi(x) = (d - dbar) * x + sigma(x)`` (``tap="input"``) or ``(d - dbar) * sigma(x) + sigma(x)``
    (``tap="output"``), channel-wise on dim 1. ``d`` and ``dbar`` are parameters of this module."""

    def __init__(self, sigma: nn.Module, d: torch.Tensor, dbar: torch.Tensor, *, producer: str, tap: str = "input"):
        super().__init__()
        if tap not in _TAPS:
            raise ValueError(f"Bypass: tap must be one of {_TAPS}, got {tap!r}")
        if d.dim() != 1 or d.shape != dbar.shape:
            raise ValueError(f"Bypass: d and dbar must be 1-D of the same length, got {tuple(d.shape)} and {tuple(dbar.shape)}")
        if isinstance(sigma, Bypass):
            raise ValueError(f"Bypass: {producer} is already wrapped")
        self.sigma = sigma
        self.d = nn.Parameter(d.detach().clone())
        self.dbar = nn.Parameter(dbar.detach().clone())
        self.producer = producer
        self.tap = tap
        self.train(sigma.training)

    def coefficient(self) -> torch.Tensor:
        return self.d - self.dbar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.d.shape[0]:
            raise ValueError(f"Bypass of {self.producer}: expected {self.d.shape[0]} channels on dim 1, got shape {tuple(x.shape)}")
        coef = self.coefficient().view(1, -1, *([1] * (x.dim() - 2)))
        if self.tap == "output":
            y = self.sigma(x)
            return y + coef * y
        # coef * x saves x for backward; an in-place activation must not overwrite it.
        inplace = getattr(self.sigma, "inplace", False)
        return self.sigma(x.clone() if inplace else x) + coef * x

    def extra_repr(self) -> str:
        return f"producer={self.producer}, tap={self.tap}, channels={self.d.shape[0]}"


# ------------------------------------------------------------------------------------------------ sites
def _whole(piece, channels: int) -> bool:
    return piece.start == 0 and piece.offset == 0 and piece.count == channels


def _bn(t: Target) -> Optional[str]:
    return t.bns[0].module if t.bns else None


def supported_targets(targets: Sequence[Target]) -> tuple[list, list]:
    """``(supported, excluded)``: the bypass puts one ``D`` after one producer, so it takes the targets with
    a single producer and at most one BatchNorm, each covering all the target's channels. Coupled groups
    (a ResNet stage's residual channels: several producers and BNs) are left out, with the reason, in the
    format of ``find_targets(..., return_excluded=True)``. **[our reading / limitation]**"""
    supported, excluded = [], []
    for t in targets:
        other = [role for role in ("channelwise", "norms", "params", "attention") if getattr(t, role, None)]
        if other:  # depthwise convolutions, norms, free parameters, heads: no single channel-wise op to extend
            excluded.append({"producers": [p.module for p in t.producers],
                             "reason": f"--formulation bypass: the group has {', '.join(other)}, which the bypass does not carry"})
            continue
        if len(t.producers) == 1 and len(t.bns) <= 1 and all(_whole(p, t.channels) for p in (*t.producers, *t.bns)):
            supported.append(t)
        else:
            excluded.append({"producers": [p.module for p in t.producers],
                             "reason": f"--formulation bypass: a coupled group ({len(t.producers)} producers, {len(t.bns)} "
                                       "BatchNorms) has no single channel-wise op to extend"})
    return supported, excluded


def find_sites(model: nn.Module, targets: Sequence[Target], mode: str) -> list[Site]:
    """The module each target's bypass replaces (see the module docstring), in target order.

    Raises:
        ValueError: if a target has no BatchNorm and the op after its producer is not an activation
            module called exactly once (naming the target and the ``--formulation`` flag).
    """
    sites = []
    graph = None
    for t in targets:
        if len(t.producers) != 1 or len(t.bns) > 1:
            raise ValueError(f"--formulation bypass: target {t.name} is a coupled group; see supported_targets")
        if t.bns:
            sites.append(Site(t.name, _bn(t), "output" if mode == "bn" else "input"))
            continue
        if mode == "bn":
            raise ValueError(f"--formulation bypass with mode 'bn' needs a BatchNorm after every target; {t.name} has none")
        if graph is None:
            graph = fx.symbolic_trace(model).graph
        node = next(n for n in graph.nodes if n.op == "call_module" and n.target == t.name)
        users = list(node.users)
        nxt = users[0] if len(users) == 1 else None
        what = "no single next op"
        if nxt is not None:
            what = f"{nxt.op} {nxt.target}"
            if nxt.op == "call_module":
                calls = sum(1 for n in graph.nodes if n.op == "call_module" and n.target == nxt.target)
                if isinstance(model.get_submodule(nxt.target), _ACTIVATIONS) and calls == 1:
                    sites.append(Site(t.name, nxt.target, "input"))
                    continue
                what += f" ({type(model.get_submodule(nxt.target)).__name__}, called {calls}x)"
        raise ValueError(
            f"--formulation bypass: target {t.name} has no BatchNorm and the op after it ({what}) is not an "
            "activation module called once; the bypass needs a per-layer channel-wise module to replace"
        )
    return sites


def wrappers(model: nn.Module) -> list[tuple[str, Bypass]]:
    """Every :class:`Bypass` in ``model`` with its module name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Bypass)]


def is_wrapped(model: nn.Module) -> bool:
    return any(isinstance(m, Bypass) for m in model.modules())


def _ordered(model: nn.Module, targets: Sequence[Target]) -> list[Bypass]:
    by_producer = {w.producer: w for _, w in wrappers(model)}
    missing = [t.name for t in targets if t.name not in by_producer]
    if missing:
        raise ValueError(f"bypass: no Bypass module for target(s) {', '.join(missing)}")
    return [by_producer[t.name] for t in targets]


def ordered_wrappers(model: nn.Module, targets: Sequence[Target]) -> list[Bypass]:
    """The :class:`Bypass` modules in target order (the order of :func:`catalysts`)."""
    return _ordered(model, targets)


def _wrap(model: nn.Module, sites: Sequence[Site], values: Mapping[str, tuple]) -> nn.Module:
    """Swaps a :class:`Bypass` in for every site of ``model`` (in place), ``d, dbar = values[producer]``."""
    modules = dict(model.named_modules())
    for s in sites:
        d, dbar = values[s.producer]
        channels = modules[s.producer].weight.shape[0]
        if d.shape != (channels,):
            raise ValueError(f"bypass: {s.producer} has {channels} channels but its catalyst has shape {tuple(d.shape)}")
        replace_module(model, s.name, Bypass(modules[s.name], d, dbar, producer=s.producer, tap=s.tap))
    return model


def attach_(model: nn.Module, targets: Sequence[Target], mode: str, catalysts: Optional[Sequence[torch.Tensor]] = None) -> nn.Module:
    """Swaps a :class:`Bypass` in at every target's site of ``model`` itself (in place), ``d = dbar =
    catalysts[k]`` (the values of ``cf.init_catalysts``, i.e. ``c0 * n``), or zeros when ``catalysts`` is
    None (a skeleton to load a checkpoint into). ``model`` must be plain (no bypass yet)."""
    if is_wrapped(model):
        raise ValueError("bypass.attach: the model already carries bypass modules")
    modules = dict(model.named_modules())
    if catalysts is None:
        catalysts = [modules[t.name].weight.new_zeros(t.channels) for t in targets]
    if len(catalysts) != len(targets):
        raise ValueError(f"bypass.attach: {len(targets)} targets but {len(catalysts)} catalyst vectors")
    values = {t.name: (d, d) for t, d in zip(targets, catalysts)}
    return _wrap(model, find_sites(model, targets, mode), values)


def attach(model: nn.Module, targets: Sequence[Target], mode: str, catalysts: Optional[Sequence[torch.Tensor]] = None) -> nn.Module:
    """:func:`attach_` on a copy of ``model``."""
    if is_wrapped(model):
        raise ValueError("bypass.attach: the model already carries bypass modules")
    return attach_(copy.deepcopy(model), targets, mode, catalysts)


def unwrap_(model: nn.Module) -> dict:
    """Replaces every :class:`Bypass` of ``model`` by its ``sigma`` (in place: this drops the bypass term)
    and returns ``{producer: (site, d, dbar)}`` of the removed wrappers (detached)."""
    removed = {}
    for name, w in wrappers(model):
        removed[w.producer] = (Site(w.producer, name, w.tap), w.d.detach(), w.dbar.detach())
        replace_module(model, name, w.sigma)
    return removed


def unwrap(model: nn.Module) -> tuple[nn.Module, dict]:
    """A plain copy of ``model`` (every :class:`Bypass` replaced by its ``sigma``: this drops the bypass
    term) and ``{producer: (site, d, dbar)}`` of the removed wrappers (detached)."""
    plain = copy.deepcopy(model)
    return plain, unwrap_(plain)


def inner_targets(model: nn.Module, targets: Sequence[Target]) -> list[Target]:
    """``targets`` with every BatchNorm name that is now a :class:`Bypass` pointing at the BN inside it,
    so that ``build_target_set(wrapped_model, ...)`` regularises the same tensors. Unchanged for a plain
    model."""
    out = []
    for t in targets:
        if t.bns and any(isinstance(model.get_submodule(b.module), Bypass) for b in t.bns):
            t = replace(t, bns=[replace(b, module=b.module + ".sigma") for b in t.bns])
        out.append(t)
    return out


def outer_targets(targets: Sequence[Target]) -> list[Target]:
    """The inverse of :func:`inner_targets`: BatchNorm names without their ``.sigma`` suffix."""
    out = []
    for t in targets:
        if any(b.module.endswith(".sigma") for b in t.bns):
            t = replace(t, bns=[replace(b, module=b.module[: -len(".sigma")]) if b.module.endswith(".sigma") else b
                                for b in t.bns])
        out.append(t)
    return out


def narrow_(model: nn.Module, targets: Sequence[Target], keep: Mapping[str, torch.Tensor], record=None) -> None:
    """Narrows ``d`` and ``dbar`` of every wrapper to the kept channels of its producer's target (new
    parameters on the same wrappers; ``record`` collects them for the optimizer)."""
    from .surgery import ParameterSlices, narrow_attr_

    record = ParameterSlices() if record is None else record
    by_producer = {w.producer: w for _, w in wrappers(model)}
    for t in targets:
        w = by_producer.get(t.name)
        if w is None or t.name not in keep:
            continue
        idx = keep[t.name]
        narrow_attr_(w, "d", 0, idx, record)
        narrow_attr_(w, "dbar", 0, idx, record)


def fold_(model: nn.Module) -> float:
    """Ends opt2 in place: sets ``d = dbar`` exactly (then ``psi == sigma``) and unwraps every bypass.
    Returns the residual ``max |d - dbar|`` it snapped away.

    Raises:
        RuntimeError: if a :class:`Bypass` is left (cannot happen short of a bug).
    """
    residual = max_abs_coefficient(model)
    with torch.no_grad():
        for _, w in wrappers(model):
            w.d.copy_(w.dbar)
    unwrap_(model)
    if is_wrapped(model):
        raise RuntimeError("bypass.fold_: a Bypass module is left in the folded model")
    return residual


def catalysts(model: nn.Module, targets: Sequence[Target]) -> list[nn.Parameter]:
    """The catalysts ``d`` (the wrappers' own parameters) in target order, for ``cf.penalty_``."""
    return [w.d for w in _ordered(model, targets)]


def bypass_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every ``d`` and ``dbar`` of ``model`` (``d``s first, module order); empty for a plain model."""
    ws = [w for _, w in wrappers(model)]
    return [w.d for w in ws] + [w.dbar for w in ws]


# ------------------------------------------------------------------------------------------------ prune
def prune(model: nn.Module, targets: Sequence[Target], keep: Mapping[str, Sequence[int]]) -> nn.Module:
    """:func:`~catalyst_fused.pruning.surgery.prune_model` for a wrapped model: unwrap a copy, remove the
    channels, re-wrap the kept channels with their ``d`` and ``dbar`` entries. ``model`` is untouched."""
    plain, removed = unwrap(model)
    pruned = prune_model(plain, targets, keep, inplace=True)
    values, sites = {}, []
    for producer, (site, d, dbar) in removed.items():
        t = next(t for t in targets if t.name == producer)
        idx = keep_indices(keep.get(producer, range(t.channels)), t.channels, f"keep[{producer!r}]").to(d.device)
        values[producer] = (d.index_select(0, idx), dbar.index_select(0, idx))
        sites.append(site)
    return _wrap(pruned, sites, values)


# ------------------------------------------------------------------------------------------------- opt2
def max_abs_coefficient(model: nn.Module) -> float:
    """``max |d_i - dbar_i|`` over every bypass of ``model`` (0.0 for none)."""
    with torch.no_grad():
        return max((float(w.coefficient().abs().max()) for _, w in wrappers(model) if w.d.numel()), default=0.0)


def add_coefficient_penalty_grad_(model: nn.Module, mu: float) -> float:
    """Adds the gradient of ``mu * sum (d - dbar)^2`` into ``d.grad`` and ``dbar.grad`` (after
    ``loss.backward()``, like ``cf.penalty_``) and returns the penalty's value."""
    total = 0.0
    with torch.no_grad():
        for _, w in wrappers(model):
            b = w.coefficient()
            for p, sign in ((w.d, 2.0 * mu), (w.dbar, -2.0 * mu)):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(b, alpha=sign)
            total += mu * float(b.square().sum())
    return total


def opt2_mu(mu: float, ramp: int, epoch: int) -> float:
    """``mu_t`` of opt2 epoch ``epoch`` (0-based): linear ramp over ``ramp`` epochs, then ``mu``."""
    return mu * min(1.0, (epoch + 1) / (ramp + 1))


def opt2_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD for opt2: the weights with weight decay, every ``d`` and ``dbar`` without it (weight decay would
    pull ``d + dbar`` as well, which the function does not depend on)."""
    bp = bypass_parameters(model)
    ids = {id(p) for p in bp}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.SGD([{"params": rest}, {"params": bp, "weight_decay": 0.0}], lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def snap_and_fold(model: nn.Module, tol: float, accuracy: Callable[[nn.Module], float], x: torch.Tensor) -> tuple[nn.Module, dict]:
    """Ends opt2: measures the residual ``max |d - dbar|``, sets ``d = dbar`` exactly (so ``psi == sigma``),
    and returns the plain (unwrapped) model with the figures: residual, whether it is within ``tol``,
    accuracy and max logit change on ``x`` caused by the snap. ``model`` is untouched.

    Raises:
        RuntimeError: if a :class:`Bypass` is left in the folded model (cannot happen short of a bug).
    """
    residual = max_abs_coefficient(model)
    acc_before = accuracy(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        y_before = model(x)
    model.train(was_training)
    snapped = copy.deepcopy(model)
    with torch.no_grad():
        for _, w in wrappers(snapped):
            w.d.copy_(w.dbar)
    plain, _ = unwrap(snapped)
    if is_wrapped(plain):
        raise RuntimeError("bypass.snap_and_fold: a Bypass module is left in the folded model")
    plain.eval()
    with torch.no_grad():
        y_after = plain(x)
    plain.train(was_training)
    acc_after = accuracy(plain)
    return plain, {
        "residual_max_abs_coefficient": residual,
        "residual_tol": tol,
        "residual_ok": residual <= tol,
        "accuracy_before_snap": acc_before,
        "accuracy_after_snap": acc_after,
        "snap_accuracy_change": acc_after - acc_before,
        "snap_max_abs_logit_change": float((y_after - y_before).abs().max()),
        "samples": int(x.shape[0]),
    }
