"""Plain-PyTorch reference of the Catalyst penalty: the source of truth for every backend.

Everything is ordinary differentiable PyTorch, so gradients come from autograd:

* ``n_i = sqrt(sum of squares over every slice of group i)``, written so that its gradient is exactly 0
  where ``n_i = 0`` (the subgradient convention) and NaN where ``n_i`` is NaN;
* ``R = sum_i |d_i| * n_i``; autograd of ``abs`` gives ``dR/dd_i = sign(d_i) * n_i`` with ``sign(0) = 0``;
* ``c_i = |d_i| / n_i``, ``+inf`` where ``n_i = 0``.

Sums run in the accumulation dtype (fp32 for fp16/bf16 inputs); pass fp64 tensors for an exact-as-possible
reference. :func:`eager_penalty` is the per-layer loop a user would write; benchmarks use it as the eager
baseline.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .layout import GroupLayout

__all__ = ["accumulation_dtype", "group_norms", "penalty_with_stats", "penalty", "penalty_", "eager_penalty"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16, the dtype itself otherwise (what the kernels accumulate and return in)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _members(weights: Sequence[torch.Tensor], layout: Optional[GroupLayout]):
    """(tensor, dim, start, count, segment, segment_start) rows; per-row layout when ``layout`` is None."""
    if layout is None:
        return [(i, 0, 0, w.shape[0], i, 0, 1) for i, w in enumerate(weights)]
    # TEMPORARY (branch kernels-gpu): 6-column tables have width 1.
    return [tuple(int(v) for v in row) + ((1,) if len(row) == 6 else ()) for row in layout.member_table.tolist()]


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
        index = torch.arange(count, device=sq.device) // width + offsets[seg] + seg_start
        sq = sq.index_add(0, index, part)
    return sq


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    # sqrt whose gradient is 0 (not inf * 0 = NaN) at 0; NaN stays NaN.
    zero = sq == 0
    return torch.where(zero, torch.zeros_like(sq), torch.sqrt(torch.where(zero, torch.ones_like(sq), sq)))


def group_norms(weights: Sequence[torch.Tensor], catalysts: Sequence[torch.Tensor], layout: Optional[GroupLayout] = None):
    """All group norms ``n`` as one flat vector (segments concatenated)."""
    return _safe_sqrt(_sum_of_squares(list(weights), list(catalysts), layout))


def penalty_with_stats(weights, catalysts, layout: Optional[GroupLayout] = None):
    """``(R, norms, ratios)``; ``R`` is differentiable, ``norms`` and ``ratios`` are detached."""
    weights, catalysts = list(weights), list(catalysts)
    norms = group_norms(weights, catalysts, layout)
    d = torch.cat([c.reshape(-1) for c in catalysts]).to(norms.dtype)
    value = (d.abs() * norms).sum()
    n = norms.detach()
    ratios = torch.where(n == 0, torch.full_like(n, float("inf")), d.detach().abs() / n)
    return value, n, ratios


def penalty(weights, catalysts, layout: Optional[GroupLayout] = None) -> torch.Tensor:
    return penalty_with_stats(weights, catalysts, layout)[0]


def penalty_(weights, catalysts, weight_grads, catalyst_grads, scale: float = 1.0, layout: Optional[GroupLayout] = None):
    """Reference of the in-place operator: adds ``scale * dR/dW`` and ``scale * dR/dd`` into the given
    gradient tensors and returns ``(R, norms, ratios)``."""
    weights = [w.detach().requires_grad_(True) for w in weights]
    catalysts = [d.detach().requires_grad_(True) for d in catalysts]
    with torch.enable_grad():
        value, norms, ratios = penalty_with_stats(weights, catalysts, layout)
        grads = torch.autograd.grad(value, weights + catalysts, allow_unused=True, materialize_grads=True)
    with torch.no_grad():
        for g, new in zip(list(weight_grads) + list(catalyst_grads), grads):
            g.add_(new.to(g.dtype), alpha=scale)
    return value.detach(), norms, ratios


def eager_penalty(weights: Sequence[torch.Tensor], catalysts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The per-layer loop a user would write for the per-row layout (the eager benchmark baseline)."""
    total = 0
    for w, d in zip(weights, catalysts):
        total = total + (d.abs() * torch.linalg.vector_norm(w.flatten(1) if w.dim() > 1 else w[:, None], dim=1)).sum()
    return total
