"""Plain-PyTorch reference of the Catalyst penalty: the source of truth for every backend.

Everything is ordinary differentiable PyTorch, so gradients come from autograd:

* ``n_i = sqrt(sum of squares over every slice of group i)``, written so that its gradient is exactly 0
  where ``n_i = 0`` (the subgradient convention) and NaN where ``n_i`` is NaN;
* ``R = sum_i |d_i| * n_i``; its autograd gives ``dR/dd_i = sign(d_i) * n_i`` with ``sign(0) = 0`` and
  ``sign(NaN) = NaN`` (so a NaN catalyst never gets a finite gradient; ``torch.sign(NaN)`` would be 0);
* ``c_i = |d_i| / n_i``, ``+inf`` where ``n_i = 0`` (NaN for a NaN catalyst).

Sums run in the accumulation dtype (fp32 for fp16/bf16 inputs); pass fp64 tensors for an exact-as-possible
reference. :func:`eager_penalty` and :func:`eager_group_penalty` are the loops a user would write (per
layer; per segment of a layout); benchmarks use them as the eager baselines and compile them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .layout import GroupLayout

__all__ = [
    "accumulation_dtype",
    "group_norms",
    "penalty_with_stats",
    "penalty",
    "penalty_",
    "partial_sums",
    "finish_",
    "eager_penalty",
    "eager_group_penalty",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16, the dtype itself otherwise (what the kernels accumulate and return in)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _members(weights: Sequence[torch.Tensor], layout: Optional[GroupLayout]):
    """(tensor, dim, start, count, segment, segment_start, width) rows; per-row layout when ``layout`` is None."""
    if layout is None:
        return [(i, 0, 0, w.shape[0], i, 0, 1) for i, w in enumerate(weights)]
    return layout.members


def _sum_of_squares(weights, catalysts, layout):
    acc = accumulation_dtype(weights[0].dtype)
    offsets = [0]
    for d in catalysts:
        offsets.append(offsets[-1] + d.numel())
    sq = weights[0].new_zeros(offsets[-1], dtype=acc)
    for t, dim, start, count, seg, seg_start, width in _members(weights, layout):
        moved = weights[t].movedim(dim, 0)[start : start + count]
        slices = moved.reshape(count, moved[0].numel() if count else 0).to(acc)
        part = (slices * slices).sum(dim=1)
        # slice start + k belongs to group seg_start + k // width
        index = torch.arange(count, device=sq.device) // width + offsets[seg] + seg_start
        sq = sq.index_add(0, index, part)
    return sq


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    # sqrt whose derivative at 0 is taken as 1 instead of inf: the value is 0 there, and the weights'
    # gradient (incoming * 1 * 2w, with w = 0) is exactly 0, or NaN when the incoming gradient is NaN/Inf
    # (a NaN or Inf catalyst), never inf * 0 from the sqrt itself. NaN stays NaN.
    zero = sq == 0
    return torch.where(zero, sq, torch.sqrt(torch.where(zero, torch.ones_like(sq), sq)))


def _abs(d: torch.Tensor) -> torch.Tensor:
    """``|d|`` whose gradient is ``sign(d)`` with ``sign(0) = 0`` and ``sign(NaN) = NaN`` (``torch.abs`` and
    ``torch.sign`` give 0 at NaN, which would turn a NaN catalyst's gradient into a finite value)."""
    sign = torch.where(torch.isnan(d), d, torch.sign(d)).detach()
    return d * sign


def group_norms(weights: Sequence[torch.Tensor], catalysts: Sequence[torch.Tensor], layout: Optional[GroupLayout] = None):
    """All group norms ``n`` as one flat vector (segments concatenated)."""
    return _safe_sqrt(_sum_of_squares(list(weights), list(catalysts), layout))


def penalty_with_stats(weights, catalysts, layout: Optional[GroupLayout] = None):
    """``(R, norms, ratios)``; ``R`` is differentiable, ``norms`` and ``ratios`` are detached."""
    weights, catalysts = list(weights), list(catalysts)
    norms = group_norms(weights, catalysts, layout)
    d = torch.cat([c.reshape(-1) for c in catalysts]).to(norms.dtype)
    value = (_abs(d) * norms).sum()
    n = norms.detach()
    abs_d = d.detach().abs()
    # +inf for an all-zero group, NaN for a NaN catalyst
    zero_ratio = torch.where(torch.isnan(abs_d), abs_d, torch.full_like(n, float("inf")))
    ratios = torch.where(n == 0, zero_ratio, abs_d / n)
    return value, n, ratios


def penalty(weights, catalysts, layout: Optional[GroupLayout] = None) -> torch.Tensor:
    return penalty_with_stats(weights, catalysts, layout)[0]


def penalty_(weights, catalysts, weight_grads, catalyst_grads, scale: float = 1.0, layout: Optional[GroupLayout] = None):
    """Reference of the in-place operator: adds ``scale * dR/dW`` and ``scale * dR/dd`` into the given
    gradient tensors (``None`` entries: that tensor gets no gradient) and returns ``(R, norms, ratios)``."""
    weights = [w.detach().requires_grad_(True) for w in weights]
    catalysts = [d.detach().requires_grad_(True) for d in catalysts]
    with torch.enable_grad():
        value, norms, ratios = penalty_with_stats(weights, catalysts, layout)
        grads = torch.autograd.grad(value, weights + catalysts, allow_unused=True, materialize_grads=True)
    with torch.no_grad():
        for g, new in zip(list(weight_grads) + list(catalyst_grads), grads):
            if g is not None:
                g.add_(new.to(g.dtype), alpha=scale)
    return value.detach(), norms, ratios


def partial_sums(weights, catalysts, layout=None) -> torch.Tensor:
    """Reference of ``penalty_partial_sums``: every group's sum of squares over these tensors (sharded
    weights: the slices one process holds; ``layout`` is then anything with a ``members`` table, which may
    leave groups uncovered: their sums are 0)."""
    with torch.no_grad():
        return _sum_of_squares(list(weights), list(catalysts), layout)


def finish_(weights, catalysts, weight_grads, catalyst_grads, scale: float, layout, sums: torch.Tensor):
    """Reference of ``penalty_finish_``: ``n = sqrt(sums)`` (sums reduced over every process), the penalty,
    norms and ratios from them, and ``scale * dR/dd`` / ``scale * dR/dW`` added into the given buffers
    (``None``: no gradient), where ``dR/dW = |d| / n * W`` for the slices these tensors hold."""
    weights, catalysts = list(weights), list(catalysts)
    n = _safe_sqrt(sums)
    d = torch.cat([c.detach().reshape(-1) for c in catalysts]).to(n.dtype)
    abs_d = d.abs()
    sign = torch.where(torch.isnan(d), d, torch.sign(d))
    factor = torch.where(n == 0, abs_d * 0, abs_d / n)  # the kernels' subgradient convention (NaN stays NaN)
    local = [w.detach().requires_grad_(True) for w in weights]
    with torch.enable_grad():
        surrogate = (0.5 * factor * _sum_of_squares(local, catalysts, layout)).sum()  # d/dW = factor * W
        grads = torch.autograd.grad(surrogate, local, allow_unused=True, materialize_grads=True)
    with torch.no_grad():
        for g, new in zip(weight_grads, grads):
            if g is not None:
                g.add_(new.to(g.dtype), alpha=scale)
        for g, part in zip(catalyst_grads, torch.split(sign * n, [c.numel() for c in catalysts])):
            if g is not None:
                g.add_(part.to(g.dtype), alpha=scale)
    zero_ratio = torch.where(torch.isnan(abs_d), abs_d, torch.full_like(n, float("inf")))
    ratios = torch.where(n == 0, zero_ratio, abs_d / n)
    return (abs_d * n).sum(), n, ratios


def eager_penalty(weights: Sequence[torch.Tensor], catalysts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The per-layer loop a user would write for the per-row layout (the eager benchmark baseline)."""
    total = 0
    for w, d in zip(weights, catalysts):
        total = total + (d.abs() * torch.linalg.vector_norm(w.flatten(1) if w.dim() > 1 else w[:, None], dim=1)).sum()
    return total


def eager_group_penalty(weights: Sequence[torch.Tensor], catalysts: Sequence[torch.Tensor], layout: GroupLayout) -> torch.Tensor:
    """The loop a user would write for a :class:`GroupLayout`: per segment, the squares of every member's
    slices summed per group and padded to the segment's size, then ``sum |d| * sqrt(...)`` (the eager
    benchmark baseline for group layouts; plain ``sqrt``, so an all-zero group gives NaN gradients)."""
    total = 0
    for s, d in enumerate(catalysts):
        sq = None
        for t, dim, start, count, seg, offset, width in layout.members:
            if seg != s or count == 0:
                continue
            slices = weights[t].narrow(dim, start, count).movedim(dim, 0)
            part = slices.reshape(count // width, -1).square().sum(1)
            part = torch.nn.functional.pad(part, (offset, d.shape[0] - offset - count // width))
            sq = part if sq is None else sq + part
        total = total + (d.abs() * sq.sqrt()).sum()
    return total
