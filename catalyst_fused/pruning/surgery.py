"""Physical channel removal: a genuinely smaller dense model, and the masked model used to verify it.

:func:`prune_model` keeps only the kept indices of every slice of every target (producer output rows and
biases, BN entries and running statistics, consumer input columns; see
:class:`~catalyst_fused.pruning.targets.Target`). It works **in place on the modules**: every
``nn.Conv2d`` / ``nn.Linear`` / BatchNorm keeps its identity and its ``nn.Parameter`` objects (their
``.data`` and ``.grad`` are narrowed and the width attributes updated), so references a user holds
(``model.fc``, hooks, an optimizer's parameter list) stay valid; :func:`slice_optimizer_state_` then narrows
the optimizer's per-parameter state (momentum buffers, Adam moments) the same way. With ``inplace=False``
(the default) it works on a deep copy and leaves the original untouched. The result depends only on
(model, targets, keep), which is how a checkpoint rebuilds the pruned architecture. Operations between
layers (residual additions, pooling, concatenation, flatten of a 1x1 map) have no channel count of their own
and need no change.

:func:`mask_model` zeroes the consumer input columns of the removed channels instead: every path of a
target's channels ends in one of its consumers, so its function is exactly the pruned model's (up to
floating-point summation order), which is how the surgery itself is checked.

A *keep set* per target is either a boolean mask over the target's channels (``True`` = keep) or a sequence
of integer channel indices; anything else (floats, duplicates, a mask of the wrong length) is rejected.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .attention import sync_heads_
from .layers import axis_size, axis_tensors, describe, narrow_
from .targets import Target

__all__ = [
    "prune_model",
    "mask_model",
    "slice_catalysts",
    "replace_module",
    "keep_indices",
    "ParameterSlices",
    "narrow_attr_",
    "narrow_tensor",
    "slice_optimizer_state_",
    "remap_targets",
    "constant_inputs",
    "fold_constant_inputs_",
]

_BN = nn.modules.batchnorm._BatchNorm


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def keep_indices(keep, channels: int, where: str) -> torch.Tensor:
    """The sorted int64 indices of a keep set (a bool mask of length ``channels`` or integer indices).

    Raises:
        ValueError: naming ``where`` for a float or otherwise non-integer keep set, a mask of the wrong
            length, duplicates, indices out of ``[0, channels)``, or an empty keep set.
    """
    if isinstance(keep, torch.Tensor):
        t = keep.detach().cpu()
    else:
        try:
            t = torch.as_tensor(keep)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{where}: expected a bool mask or integer channel indices, got {type(keep).__name__}: {exc}") from exc
    if t.numel() == 0:
        raise ValueError(f"{where}: would keep no channel")
    if t.dtype == torch.bool:
        if t.dim() != 1 or t.numel() != channels:
            raise ValueError(f"{where}: a boolean keep mask must have one entry per channel ({channels}), got shape {tuple(t.shape)}")
        idx = t.nonzero().flatten()
    elif t.is_floating_point() or t.is_complex():
        raise ValueError(f"{where}: channel indices must be integers (or a bool mask), got dtype {t.dtype}")
    else:
        if t.dim() > 1:
            raise ValueError(f"{where}: channel indices must be 1-D, got shape {tuple(t.shape)}")
        idx = t.flatten().long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= channels):
            raise ValueError(f"{where}: indices are out of range [0, {channels})")
        unique = torch.unique(idx)
        if unique.numel() != idx.numel():
            raise ValueError(f"{where}: channel indices contain duplicates")
        idx = unique
    if idx.numel() == 0:
        raise ValueError(f"{where}: would keep no channel")
    return idx


def _kept(t: Target, keep_idx) -> torch.Tensor:
    kept = torch.zeros(t.channels, dtype=torch.bool)
    kept[keep_idx] = True
    return kept


def _piece_mask(kept: torch.Tensor, piece) -> torch.Tensor:
    """The kept indices of a slice's range: each channel's ``width`` consecutive indices follow it."""
    return kept[piece.offset : piece.offset + piece.count // piece.width].repeat_interleave(piece.width)


def _kept_masks(model: nn.Module, targets: Sequence[Target], keep: Mapping[str, object]) -> dict:
    """``(module name, axis) -> bool mask`` of the indices that stay, for every module axis that loses some
    (axis 0: producer rows, BN / norm entries, depthwise rows; axis 1: consumer input columns), and
    ``(parameter name, "param", dim) -> mask`` for free parameters.

    Raises:
        ValueError: for a ``keep`` naming an unknown target or an invalid keep set (see :func:`keep_indices`).
    """
    modules = model if isinstance(model, Mapping) else dict(model.named_modules())
    by_name = {t.name: t for t in targets}
    unknown = sorted(set(keep) - set(by_name))
    if unknown:
        raise ValueError(f"keep names {unknown}, which are not targets; targets are: {sorted(by_name)}")
    masks: dict = {}
    for name, kept_idx in keep.items():
        t = by_name[name]
        idx = keep_indices(kept_idx, t.channels, f"keep[{name!r}] (target {name})")
        if idx.numel() == t.channels:
            continue
        kept = _kept(t, idx)
        for p, axis in t.module_slices():
            mask = masks.setdefault((p.module, axis), torch.ones(axis_size(modules[p.module], axis), dtype=torch.bool))
            mask[p.start : p.start + p.count] &= _piece_mask(kept, p)
        for prm in t.params:
            owner, _, attr = prm.param.rpartition(".")
            size = getattr(modules[owner], attr).shape[prm.dim]
            mask = masks.setdefault((prm.param, "param", prm.dim), torch.ones(size, dtype=torch.bool))
            mask[prm.start : prm.start + prm.count] &= _piece_mask(kept, prm)
    return masks


@dataclass
class ParameterSlices:
    """What a removal did to each parameter: ``old parameter -> (new parameter, [(dim, kept indices), ...])``,
    the steps in the order applied (a convolution that is both a producer and a consumer loses rows, then
    columns: one entry from the original parameter to the newest)."""

    slices: dict = field(default_factory=dict)  # id(original) -> (original, newest, [(dim, idx)])
    _origin: dict = field(default_factory=dict)  # id(any intermediate or newest) -> id(original)

    def add(self, old: torch.Tensor, new: torch.Tensor, dim: int, idx: torch.Tensor) -> None:
        key = self._origin.get(id(old), id(old))
        if key in self.slices:
            first, _, steps = self.slices[key]
            self.slices[key] = (first, new, steps + [(dim, idx)])
        else:
            self.slices[key] = (old, new, [(dim, idx)])
        self._origin[id(new)] = key

    def apply(self, t: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        for dim, idx in self.slices[id(old)][2]:
            t = t.index_select(dim, idx.to(t.device))
        return t

    def new(self, old: torch.Tensor) -> torch.Tensor:
        return self.slices[id(old)][1]

    def __contains__(self, param) -> bool:
        return id(param) in self.slices


def narrow_attr_(owner: nn.Module, name: str, dim: int, idx: torch.Tensor, record: ParameterSlices) -> None:
    """Replaces ``owner.<name>`` (a parameter or buffer) by its slices ``idx`` along ``dim``.

    A parameter becomes a **new** ``nn.Parameter`` (same ``requires_grad``, its ``.grad`` narrowed too):
    changing the shape of an existing leaf through ``.data`` would leave autograd's cached gradient
    accumulator with the old shape for as long as an old graph (a ``loss`` still in scope) refers to it.
    ``record`` maps the old parameter to the new one for :func:`slice_optimizer_state_`."""
    old = getattr(owner, name)
    if old is None:
        return
    idx = idx.to(old.device)
    with torch.no_grad():
        data = old.detach().index_select(dim, idx).contiguous()
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(data, requires_grad=old.requires_grad)
            if old.grad is not None:
                new.grad = old.grad.index_select(dim, idx).contiguous()
            setattr(owner, name, new)
            record.add(old, new, dim, idx)
        else:
            setattr(owner, name, data)


def narrow_tensor(t: torch.Tensor, dim: int, idx: torch.Tensor, record: ParameterSlices) -> torch.Tensor:
    """A narrowed copy of ``t`` (a new ``nn.Parameter``, recorded, if ``t`` is one): for tensors held in a
    list rather than a module (the pruner's catalysts)."""
    holder = nn.Module()
    if isinstance(t, nn.Parameter):
        holder.register_parameter("t", t)
    else:
        holder.register_buffer("t", t)
    narrow_attr_(holder, "t", dim, idx, record)
    return holder.t


def _prune_module_(mod: nn.Module, out_mask, in_mask, record: ParameterSlices, name: str) -> None:
    out_idx = None if out_mask is None else out_mask.nonzero().flatten()
    in_idx = None if in_mask is None else in_mask.nonzero().flatten()
    narrow_(mod, out_idx, in_idx, lambda m, attr, dim, idx: narrow_attr_(m, attr, dim, idx, record), name)


def prune_model(model: nn.Module, targets: Sequence[Target], keep: Mapping[str, object], *, inplace: bool = False,
                record: Optional[ParameterSlices] = None) -> nn.Module:
    """``model`` with every target keeping only the channels ``keep[target.name]`` (a bool mask or
    indices; at least one). Targets missing from ``keep`` keep all channels. With ``inplace=False`` (the
    default) a deep copy is pruned and returned; with ``inplace=True`` ``model`` itself, whose modules keep
    their identity (their parameters are replaced by narrower ones). ``record`` (a :class:`ParameterSlices`)
    collects what happened to each parameter, for :func:`slice_optimizer_state_`.

    Raises:
        ValueError: for a bad ``keep`` (see :func:`keep_indices`), checked before anything changes.
    """
    masks = _kept_masks(model, targets, keep)
    pruned = model if inplace else copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    record = ParameterSlices() if record is None else record
    for name in dict.fromkeys(k[0] for k in masks if len(k) == 2):  # each module once, in a fixed order
        _prune_module_(modules[name], masks.get((name, 0)), masks.get((name, 1)), record, name)
    for (param, _, dim), mask in ((k, m) for k, m in masks.items() if len(k) == 3):
        owner, _, attr = param.rpartition(".")
        narrow_attr_(modules[owner], attr, dim, mask.nonzero().flatten(), record)
    for t in targets:  # attention modules whose heads went: their head counts follow the projections
        if t.attention is not None and t.name in keep and keep_indices(keep[t.name], t.channels, t.name).numel() < t.channels:
            sync_heads_(pruned, t.attention, t.head_dim)
    _sync_model_widths_(pruned)
    return pruned


def _sync_model_widths_(model: nn.Module) -> None:
    """Width attributes that known models read in their forward code (rather than from tensor shapes)."""
    for m in model.modules():
        # torchvision's VisionTransformer reshapes the patch embedding with self.hidden_dim
        if type(m).__name__ == "VisionTransformer" and type(m).__module__.startswith("torchvision.") and hasattr(m, "conv_proj"):
            m.hidden_dim = int(m.conv_proj.out_channels)


def slice_optimizer_state_(optimizer: torch.optim.Optimizer, record: ParameterSlices) -> int:
    """Makes ``optimizer`` follow a removal: every narrowed parameter is replaced by its new parameter in
    the parameter groups, and its per-parameter state (every tensor of the old shape: momentum buffers,
    Adam moments, ...) is narrowed the same way; scalars such as ``step`` are kept. Returns the number of
    parameters replaced.

    Raises:
        ValueError: for a state tensor whose shape matches neither the old nor the new parameter shape.
    """
    count = 0
    for group in optimizer.param_groups:
        params = group["params"]
        for i, old in enumerate(params):
            if old not in record:
                continue
            new = record.new(old)
            params[i] = new
            count += 1
            if old not in optimizer.state:
                continue
            state = optimizer.state.pop(old)
            for key, value in list(state.items()):
                if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape == new.shape:
                    continue
                sliced = record.apply(value, old)
                if sliced.shape != new.shape:
                    raise ValueError(f"optimizer state {key!r} of shape {tuple(value.shape)} does not fit a parameter "
                                     f"narrowed to {tuple(new.shape)}")
                state[key] = sliced
            optimizer.state[new] = state
    return count


def _remap_piece(piece, dim_mask: Optional[torch.Tensor], kept: Optional[torch.Tensor]):
    """``piece`` after a removal: its start moves by the removed indices before it, its count and offset by
    the removed channels of its range and before its offset."""
    start = piece.start if dim_mask is None else int(dim_mask[: piece.start].sum())
    channels = kept[piece.offset : piece.offset + piece.count // piece.width] if kept is not None else None
    count = piece.count if kept is None else int(channels.sum()) * piece.width
    offset = piece.offset if kept is None else int(kept[: piece.offset].sum())
    return replace(piece, start=start, count=count, offset=offset)


def remap_targets(model_before: Mapping[str, nn.Module], targets: Sequence[Target], keep: Mapping[str, object]) -> list[Target]:
    """The targets of the narrower model after removing ``keep`` (the same groups, renumbered), computed
    from the masks without tracing the model again. ``model_before``: ``dict(model.named_modules())`` of
    the model *before* the removal (only sizes are read)."""
    masks = _kept_masks(dict(model_before), targets, keep)
    out = []
    for t in targets:
        kept = None
        if t.name in keep:
            kept = _kept(t, keep_indices(keep[t.name], t.channels, f"keep[{t.name!r}]"))
        channels = t.channels if kept is None else int(kept.sum())

        def remap(pieces, axis):
            return [_remap_piece(p, masks.get((p.module, axis)), kept) for p in pieces]

        out.append(replace(
            t,
            channels=channels,
            producers=remap(t.producers, 0), bns=remap(t.bns, 0), channelwise=remap(t.channelwise, 0),
            norms=remap(t.norms, 0), consumers=remap(t.consumers, 1),
            params=[_remap_piece(p, masks.get((p.param, "param", p.dim)), kept) for p in t.params],
        ))
    return out


def mask_model(model: nn.Module, targets: Sequence[Target], keep: Mapping[str, object],
               folds: Optional[Mapping[str, tuple]] = None) -> nn.Module:
    """A copy of ``model`` with the consumer input columns of every removed channel set to zero (after
    ``folds`` from :func:`constant_inputs` moved their constant part into the consumers' biases): the same
    function as :func:`prune_model` with the same ``keep`` (and folds), at the original width. LayerNorms /
    RMSNorms that lose entries compute their statistics over the kept channels only (the removed channels'
    outputs are zero), as the pruned model does."""
    masked = copy.deepcopy(model)
    modules = dict(masked.named_modules())
    axes = {n.module: n.axis for t in targets for n in t.norms}
    if folds:
        fold_constant_inputs_(masked, folds)
    with torch.no_grad():
        for key, mask in _kept_masks(modules, targets, keep).items():
            if len(key) == 2 and key[1] == 1:
                mod = modules[key[0]]
                for attr, dim in axis_tensors(mod, 1):
                    weight = getattr(mod, attr)
                    weight.index_fill_(dim, (~mask).nonzero().flatten().to(weight.device), 0)
            elif len(key) == 2 and key[0] in axes and describe(modules[key[0]]) == "norm":
                _mask_norm_(modules[key[0]], mask, axes[key[0]], key[0])
    return masked


def _mask_norm_(mod: nn.Module, mask: torch.Tensor, axis: int, name: str) -> None:
    """Makes ``mod`` normalise only its kept entries (a narrowed copy of it runs on them) and output zero for
    the others."""
    narrow = copy.deepcopy(mod)
    _prune_module_(narrow, mask, None, ParameterSlices(), name)
    idx = mask.nonzero().flatten()

    def forward(x, *args, **kwargs):
        i = idx.to(x.device)
        y = narrow(x.index_select(axis, i), *args, **kwargs)
        return torch.zeros(x.shape, dtype=y.dtype, device=y.device).index_copy_(axis % x.dim(), i, y)

    mod.forward = forward


def constant_inputs(model: nn.Module, targets: Sequence[Target], keep: Mapping[str, object], example_inputs) -> dict:
    """What each removed channel feeds its consumers, for channels whose output is a constant: a channel whose
    BatchNorm scale is 0 still outputs its shift ``beta`` (``relu(beta)`` after a ReLU) whatever the input,
    and removing its consumer columns would drop that constant (``--bn-gamma-only``, filter mode, network
    slimming). One eval-mode forward of ``example_inputs`` reads every consumer's input; the value of a removed
    column is its mean over the batch and the positions. Returns ``{consumer: (removed columns, values)}`` for
    :func:`fold_constant_inputs_`.

    Exact for consumers that mix positions only through sums the constant enters everywhere (``Linear``,
    1x1 or unpadded convolutions); a zero-padded convolution sees fewer copies of the constant at the image
    border, which a bias cannot express: there the fold is exact in the interior only."""
    from .targets import run_example_observed

    modules = dict(model.named_modules())
    # consumer input columns of convolutions and linear layers (other consumers carry no foldable bias)
    removed = {key[0]: ~mask for key, mask in _kept_masks(modules, targets, keep).items()
               if len(key) == 2 and key[1] == 1 and isinstance(modules[key[0]], (nn.Conv2d, nn.Linear))}
    seen: dict = {}

    def hook(name):
        def read(m, args):
            x = args[0].detach()
            idx = removed[name].nonzero().flatten().to(x.device)
            cols = x.index_select(1 if isinstance(m, nn.Conv2d) else x.dim() - 1, idx)
            dims = [d for d in range(cols.dim()) if d != (1 if isinstance(m, nn.Conv2d) else cols.dim() - 1)]
            seen[name] = (idx.cpu(), cols.double().mean(dims).cpu())
        return read

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n, r in removed.items() if bool(r.any())]
    run_example_observed(model, example_inputs, handles)
    return seen


def fold_constant_inputs_(model: nn.Module, folds: Mapping[str, tuple]) -> dict:
    """Adds ``W[:, removed] @ values`` (summed over the kernel for a convolution) to each consumer's bias (a zero
    bias is created where the layer has none), so that dropping the removed columns keeps the constant they
    carried. Returns ``{consumer: {"max_bias_change": ..., "created_bias": bool}}``."""
    modules = dict(model.named_modules())
    out = {}
    with torch.no_grad():
        for name, (idx, values) in folds.items():
            mod = modules[name]
            w = mod.weight.index_select(1, idx.to(mod.weight.device)).double()
            if w.dim() > 2:
                w = w.sum(tuple(range(2, w.dim())))
            delta = w @ values.to(w.device)
            if not bool((delta != 0).any()):
                continue
            created = mod.bias is None
            if created:
                mod.bias = nn.Parameter(torch.zeros(mod.weight.shape[0], dtype=mod.weight.dtype, device=mod.weight.device))
            mod.bias.add_(delta.to(mod.bias.dtype))
            out[name] = {"max_bias_change": float(delta.abs().max()), "created_bias": created}
    return out


def slice_catalysts(catalysts: Sequence[torch.Tensor], targets: Sequence[Target], keep: Mapping[str, object]) -> list[torch.nn.Parameter]:
    """The catalysts of the kept channels (one segment per target, in target order), as new parameters."""
    out = []
    for d, t in zip(catalysts, targets):
        idx = keep_indices(keep[t.name], t.channels, f"keep[{t.name!r}]") if t.name in keep else torch.arange(t.channels)
        out.append(torch.nn.Parameter(d.detach().index_select(0, idx.to(d.device)).clone()))
    return out
