"""Plain-PyTorch reference of the soft-threshold operator: the source of truth for its backends.

For every tensor ``i`` and element ``x`` of ``sources[i]`` (of ``weights[i]`` itself for the in-place form),
with ``t = thresholds[i]``:

    weights[i] = 0                                   where |x| <= t
               = sign(x) * (|x| - t)                 elsewhere (NaN stays NaN, +-Inf stays +-Inf)

computed in the accumulation dtype (fp32 for fp16/bf16, else the dtype itself; ``t`` is rounded to it
first) and rounded once to the weights' dtype. The operator returns, per tensor, the number of elements
of the *written* weights that are zero (a tiny fp32 result that rounds to 0 in fp16 counts as zero).

``eager_soft_threshold_`` is the per-tensor loop a user would write (``sign * clamp`` and a ``(w == 0)``
count per tensor): the benchmarks' eager baseline.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .reference import accumulation_dtype

__all__ = ["soft_threshold", "soft_threshold_", "eager_soft_threshold_"]


def soft_threshold(x: torch.Tensor, t: float) -> torch.Tensor:
    """``sign(x) * max(|x| - t, 0)`` of one tensor, by the rules above (a new tensor of ``x``'s dtype)."""
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    ta = torch.tensor(float(t), dtype=acc).item()  # the threshold as the kernels see it
    a = xa.abs()
    # torch.sign(NaN) is 0, so the sign comes from copysign (which keeps NaN and -Inf)
    out = torch.where(a <= ta, torch.zeros_like(a), torch.copysign(a - ta, xa))
    return out.to(x.dtype)


def soft_threshold_(weights: Sequence[torch.Tensor], sources: Optional[Sequence[torch.Tensor]],
                    thresholds: Sequence[float]) -> torch.Tensor:
    """Writes ``soft_threshold(sources[i], thresholds[i])`` into ``weights[i]`` (``sources=None``: in place)
    and returns the zero count of every written tensor (int64, on the weights' device)."""
    weights = list(weights)
    sources = weights if sources is None else list(sources)
    counts = []
    with torch.no_grad():
        for w, x, t in zip(weights, sources, thresholds):
            out = soft_threshold(x, t)
            w.copy_(out)
            counts.append((out == 0).sum())
    return torch.stack(counts).to(torch.int64) if counts else torch.zeros(0, dtype=torch.int64)


def eager_soft_threshold_(weights: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
                          thresholds: Sequence[float]) -> torch.Tensor:
    """The loop a user would write: per tensor ``w = sign(x) * clamp(|x| - t, min=0)`` and a zero count."""
    counts = []
    with torch.no_grad():
        for w, x, t in zip(weights, sources, thresholds):
            torch.mul(torch.sign(x), (x.abs() - t).clamp_(min=0), out=w)
            counts.append((w == 0).sum())
    return torch.stack(counts)
