"""Physical channel removal: a genuinely smaller dense model, and the masked model used to verify it.

:func:`prune_model` builds new ``nn.Conv2d`` / ``nn.Linear`` / BatchNorm modules holding only the kept
indices of every slice of every target (producer output rows, BN entries and running statistics, consumer
input columns; see :class:`~catalyst_fused.pruning.targets.Target`) and swaps them into a deep copy of the
model; the original is left untouched. The result depends only on (model, targets, keep), which is how a
checkpoint rebuilds the pruned architecture. Operations between layers (residual additions, pooling,
concatenation, flatten of a 1x1 map) have no channel count of their own and need no change.

:func:`mask_model` zeroes the consumer input columns of the removed channels instead: every path of a
target's channels ends in one of its consumers, so its function is exactly the pruned model's (up to
floating-point summation order), which is how the surgery itself is checked.
"""
from __future__ import annotations

import copy
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .targets import Target

__all__ = ["prune_model", "mask_model", "slice_catalysts", "replace_module"]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _pick(t: torch.Tensor, dim: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return t if mask is None else t.index_select(dim, mask.nonzero().flatten().to(t.device))


def _new_conv(conv: nn.Conv2d, out_mask, in_mask) -> nn.Conv2d:
    w = _pick(_pick(conv.weight.detach(), 0, out_mask), 1, in_mask)
    new = nn.Conv2d(
        w.shape[1],
        w.shape[0],
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if conv.bias is not None:
            new.bias.copy_(_pick(conv.bias.detach(), 0, out_mask))
    new.train(conv.training)
    return new


def _new_linear(linear: nn.Linear, out_mask, in_mask) -> nn.Linear:
    w = _pick(_pick(linear.weight.detach(), 0, out_mask), 1, in_mask)
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(_pick(linear.bias.detach(), 0, out_mask))
    new.train(linear.training)
    return new


def _new_bn(bn: nn.modules.batchnorm._BatchNorm, mask) -> nn.Module:
    new = type(bn)(
        int(mask.sum()), eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats
    )
    ref = bn.weight if bn.affine else bn.running_mean
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(_pick(bn.weight.detach(), 0, mask))
            new.bias.copy_(_pick(bn.bias.detach(), 0, mask))
        if bn.track_running_stats:
            new.running_mean.copy_(_pick(bn.running_mean, 0, mask))
            new.running_var.copy_(_pick(bn.running_var, 0, mask))
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def _as_index(keep, device) -> torch.Tensor:
    idx = torch.as_tensor(keep, dtype=torch.long, device=device).flatten()
    return torch.unique(idx)  # sorted


def _kept_masks(modules: dict, targets: Sequence[Target], keep: Mapping[str, Sequence[int]]) -> dict:
    """``(module name, dim) -> bool mask`` of the indices that stay, for every module dimension that loses
    some (dim 0: producer rows and BN entries, dim 1: consumer input columns).

    Raises:
        ValueError: for a ``keep`` naming an unknown target, keeping no channel, or out of range.
    """
    by_name = {t.name: t for t in targets}
    unknown = sorted(set(keep) - set(by_name))
    if unknown:
        raise ValueError(f"keep names {unknown}, which are not targets; targets are: {sorted(by_name)}")
    masks: dict = {}
    for name, kept_idx in keep.items():
        t = by_name[name]
        idx = _as_index(kept_idx, torch.device("cpu"))
        if idx.numel() == 0:
            raise ValueError(f"keep[{name!r}]: target {name} would keep no channel")
        if int(idx.min()) < 0 or int(idx.max()) >= t.channels:
            raise ValueError(f"keep[{name!r}]: indices of target {name} are out of range [0, {t.channels})")
        if idx.numel() == t.channels:
            continue
        kept = torch.zeros(t.channels, dtype=torch.bool)
        kept[idx] = True
        for dim, pieces in ((0, t.producers), (0, t.bns), (1, t.consumers)):
            for p in pieces:
                mod = modules[p.module]
                size = mod.num_features if isinstance(mod, nn.modules.batchnorm._BatchNorm) else mod.weight.shape[dim]
                mask = masks.setdefault((p.module, dim), torch.ones(size, dtype=torch.bool))
                mask[p.start : p.start + p.count] &= kept[p.offset : p.offset + p.count]
    return masks


def prune_model(model: nn.Module, targets: Sequence[Target], keep: Mapping[str, Sequence[int]], *, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (or ``model`` itself with ``inplace=True``) in which every target keeps only the
    channels ``keep[target.name]`` (at least one). Targets missing from ``keep`` keep all channels.

    Raises:
        ValueError: for a bad ``keep`` (see :func:`_kept_masks`).
    """
    masks = _kept_masks(dict(model.named_modules()), targets, keep)
    pruned = model if inplace else copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    for name in dict.fromkeys(n for n, _ in masks):  # each module once, in a fixed order
        mod = modules[name]
        out_mask, in_mask = masks.get((name, 0)), masks.get((name, 1))
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            new = _new_bn(mod, out_mask)
        elif isinstance(mod, nn.Conv2d):
            new = _new_conv(mod, out_mask, in_mask)
        elif isinstance(mod, nn.Linear):
            new = _new_linear(mod, out_mask, in_mask)
        else:  # pragma: no cover - find_targets only yields Conv2d/Linear/BatchNorm slices
            raise TypeError(f"prune_model: cannot slice {type(mod).__name__} {name}")
        replace_module(pruned, name, new)
    return pruned


def mask_model(model: nn.Module, targets: Sequence[Target], keep: Mapping[str, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` with the consumer input columns of every removed channel set to zero: the same
    function as :func:`prune_model` with the same ``keep``, at the original width."""
    masked = copy.deepcopy(model)
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for (name, dim), mask in _kept_masks(modules, targets, keep).items():
            if dim == 1:
                weight = modules[name].weight
                weight[:, ~mask.to(weight.device)] = 0
    return masked


def slice_catalysts(catalysts: Sequence[torch.Tensor], targets: Sequence[Target], keep: Mapping[str, Sequence[int]]) -> list[torch.nn.Parameter]:
    """The catalysts of the kept channels (one segment per target, in target order), as new parameters."""
    out = []
    for d, t in zip(catalysts, targets):
        idx = _as_index(keep.get(t.name, range(t.channels)), d.device)
        out.append(torch.nn.Parameter(d.detach().index_select(0, idx).clone()))
    return out
