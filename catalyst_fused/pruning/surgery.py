"""Physical channel removal: a genuinely smaller dense model, and the masked model used to verify it.

:func:`prune_model` builds new ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` modules holding only the
kept channels (producer output rows, BN entries and running statistics, consumer input columns) and
swaps them into a deep copy of the model; the original is left untouched. :func:`mask_model` zeroes the
consumer input columns of the removed channels instead: its function is exactly the pruned model's (up to
floating-point summation order), which is how the surgery itself is checked.
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from .targets import Target

__all__ = ["prune_model", "mask_model", "slice_catalysts", "replace_module"]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _new_conv(conv: nn.Conv2d, out_idx, in_idx) -> nn.Conv2d:
    w = conv.weight.detach()
    if out_idx is not None:
        w = w.index_select(0, out_idx)
    if in_idx is not None:
        w = w.index_select(1, in_idx)
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
            b = conv.bias.detach()
            new.bias.copy_(b if out_idx is None else b.index_select(0, out_idx))
    new.train(conv.training)
    return new


def _new_bn(bn: nn.BatchNorm2d, idx) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(
        len(idx), eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats
    )
    ref = bn.weight if bn.affine else bn.running_mean
    new = new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight.detach().index_select(0, idx))
            new.bias.copy_(bn.bias.detach().index_select(0, idx))
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean.index_select(0, idx))
            new.running_var.copy_(bn.running_var.index_select(0, idx))
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def _new_linear(linear: nn.Linear, in_idx) -> nn.Linear:
    w = linear.weight.detach().index_select(1, in_idx)
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
    new.train(linear.training)
    return new


def _as_index(keep, device) -> torch.Tensor:
    idx = torch.as_tensor(keep, dtype=torch.long, device=device).flatten()
    return torch.sort(idx).values


def prune_model(model: nn.Module, targets: Sequence[Target], keep: Mapping[str, Sequence[int]], *, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (or ``model`` itself with ``inplace=True``) in which every target keeps only the
    output channels ``keep[target.producer]`` (sorted; at least one). Targets missing from ``keep`` keep
    all channels."""
    pruned = model if inplace else copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    out_keep: dict[str, torch.Tensor] = {}
    in_keep: dict[str, torch.Tensor] = {}
    bn_keep: dict[str, torch.Tensor] = {}
    for t in targets:
        if t.producer not in keep:
            continue
        conv = modules[t.producer]
        idx = _as_index(keep[t.producer], conv.weight.device)
        if idx.numel() == 0:
            raise ValueError(f"prune_model: target {t.producer} would keep no channel")
        if int(idx.max()) >= conv.out_channels or int(idx.min()) < 0:
            raise ValueError(f"prune_model: keep indices of {t.producer} are out of range [0, {conv.out_channels})")
        if idx.numel() == conv.out_channels:
            continue
        out_keep[t.producer] = idx
        in_keep[t.consumer] = idx
        if t.bn is not None:
            bn_keep[t.bn] = idx
    for name in set(out_keep) | set(in_keep):
        mod = modules[name]
        if isinstance(mod, nn.Conv2d):
            replace_module(pruned, name, _new_conv(mod, out_keep.get(name), in_keep.get(name)))
        elif isinstance(mod, nn.Linear):
            replace_module(pruned, name, _new_linear(mod, in_keep[name]))
        else:  # pragma: no cover - find_targets only yields Conv2d/Linear
            raise TypeError(f"prune_model: cannot slice {type(mod).__name__} {name}")
    for name, idx in bn_keep.items():
        replace_module(pruned, name, _new_bn(modules[name], idx))
    return pruned


def mask_model(model: nn.Module, targets: Sequence[Target], keep: Mapping[str, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` with the consumer input columns of every removed channel set to zero: the same
    function as :func:`prune_model` with the same ``keep``, at the original width."""
    masked = copy.deepcopy(model)
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for t in targets:
            if t.producer not in keep:
                continue
            consumer = modules[t.consumer]
            mask = torch.ones(t.channels, dtype=torch.bool, device=consumer.weight.device)
            mask[_as_index(keep[t.producer], consumer.weight.device)] = False
            consumer.weight[:, mask] = 0
    return masked


def slice_catalysts(catalysts: Sequence[torch.Tensor], targets: Sequence[Target], keep: Mapping[str, Sequence[int]]) -> list[torch.nn.Parameter]:
    """The catalysts of the kept channels (one segment per target, in target order), as new parameters."""
    out = []
    for d, t in zip(catalysts, targets):
        idx = _as_index(keep.get(t.producer, range(t.channels)), d.device)
        out.append(torch.nn.Parameter(d.detach().index_select(0, idx).clone()))
    return out
