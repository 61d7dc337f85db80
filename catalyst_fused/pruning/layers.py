"""What a channel of a target is in each kind of layer, and how a layer is narrowed.

A target lists module slices along one of two *axes* of a module: axis 0 ("out": what a layer produces or
carries per channel) and axis 1 ("in": the input columns a layer reads). For each kind of layer these are:

| layer | axis 0 | axis 1 |
|---|---|---|
| ``nn.Linear``, ``nn.Conv1d/2d/3d`` (any ``groups``) | weight rows (dim 0) and bias | weight dim 1 (per group for grouped convolutions) |
| BatchNorm | scale, shift (and running statistics) | - |
| ``nn.LayerNorm``, RMSNorm-style modules | scale (and shift) entries | - |
| ``nn.Embedding`` | weight columns (dim 1): the embedding dimension | - |
| ``nn.MultiheadAttention`` | ``in_proj_weight`` rows and ``in_proj_bias`` (query/key/value dims) | ``in_proj_weight`` columns (embedding) |

:func:`narrow_` removes the indices not kept along each axis and updates the module's size attributes (a
depthwise convolution stays depthwise with fewer channels, a grouped convolution keeps its groups with fewer
channels in each, an ``nn.MultiheadAttention`` whose query/key/value width no longer equals its embedding
width becomes a :class:`~catalyst_fused.pruning.attention.PrunedMultiheadAttention`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .tracing import is_rms_norm

__all__ = ["axis_tensors", "axis_size", "is_depthwise", "narrow_", "describe"]

_BN = nn.modules.batchnorm._BatchNorm
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_depthwise(mod: nn.Module) -> bool:
    """A convolution whose channel ``i`` reads only input channel ``i`` (``groups == in == out``)."""
    return isinstance(mod, _CONV) and mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels


def describe(mod: nn.Module) -> Optional[str]:
    """The kind of a layer this module handles, or None."""
    if isinstance(mod, _BN):
        return "batchnorm"
    if isinstance(mod, nn.LayerNorm) or is_rms_norm(mod):
        return "norm"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    if isinstance(mod, _CONV) and not isinstance(mod, nn.modules.conv._ConvTransposeNd):
        return "conv"
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, nn.MultiheadAttention):
        return "attention"
    return None


def axis_tensors(mod: nn.Module, axis: int) -> list[tuple[str, int]]:
    """``(attribute, tensor dim)`` of the parameters a slice along ``axis`` covers (None-valued ones left out)."""
    kind = describe(mod)
    if kind is None:
        raise TypeError(f"{type(mod).__name__} is not a layer kind targets can slice")
    if axis == 0:
        names = {"batchnorm": [("weight", 0), ("bias", 0)], "norm": [("weight", 0), ("bias", 0)],
                 "embedding": [("weight", 1)], "conv": [("weight", 0), ("bias", 0)], "linear": [("weight", 0), ("bias", 0)],
                 "attention": [("in_proj_weight", 0), ("in_proj_bias", 0)]}[kind]
    elif kind in ("conv", "linear"):
        names = [("weight", 1)]
    elif kind == "attention":
        names = [("in_proj_weight", 1)]
    else:
        raise TypeError(f"a {type(mod).__name__} has no input columns")
    return [(a, d) for a, d in names if isinstance(getattr(mod, a, None), torch.Tensor)]


def axis_size(mod: nn.Module, axis: int) -> int:
    """The number of indices along ``axis`` of ``mod``."""
    if describe(mod) == "batchnorm":
        return int(mod.num_features)
    tensors = axis_tensors(mod, axis)
    if not tensors:  # a norm without affine parameters
        return int(mod.normalized_shape[-1])
    attr, dim = tensors[0]
    return int(getattr(mod, attr).shape[dim])


def narrow_(mod: nn.Module, out_idx: Optional[torch.Tensor], in_idx: Optional[torch.Tensor], narrow_attr, name: str) -> None:
    """Keeps indices ``out_idx`` along axis 0 and ``in_idx`` along axis 1 of ``mod`` (None: all), through
    ``narrow_attr(module, attribute, dim, idx)``, and updates its size attributes.

    Raises:
        TypeError: for a module kind targets do not produce, or a slice the kind cannot take.
    """
    kind = describe(mod)
    if kind is None:
        raise TypeError(f"prune_model: cannot slice {type(mod).__name__} {name}")
    if in_idx is not None and kind in ("batchnorm", "norm", "embedding"):
        raise TypeError(f"prune_model: {type(mod).__name__} {name} has no input columns")
    if out_idx is not None:
        for attr, dim in axis_tensors(mod, 0):
            narrow_attr(mod, attr, dim, out_idx)
        n = int(out_idx.numel())
        if kind == "batchnorm":
            for attr in ("running_mean", "running_var"):
                narrow_attr(mod, attr, 0, out_idx)
            mod.num_features = n
        elif kind == "norm":
            if isinstance(getattr(mod, "normalized_shape", None), tuple):
                mod.normalized_shape = (n,)
        elif kind == "embedding":
            mod.embedding_dim = n
        elif kind == "conv":
            if is_depthwise(mod):
                if in_idx is not None:
                    raise TypeError(f"prune_model: depthwise convolution {name} takes one channel mask")
                mod.in_channels = mod.out_channels = mod.groups = n
            else:
                if n % mod.groups:
                    raise TypeError(f"prune_model: {n} output channels do not fill the {mod.groups} groups of {name}")
                mod.out_channels = n
        elif kind == "linear":
            mod.out_features = n
    if in_idx is not None:
        for attr, dim in axis_tensors(mod, 1):
            narrow_attr(mod, attr, dim, in_idx)
        n = int(in_idx.numel())
        if kind == "conv":
            mod.in_channels = n * mod.groups
        elif kind == "linear":
            mod.in_features = n
    if kind == "attention":
        from .attention import sync_multihead_attention_

        sync_multihead_attention_(mod)
