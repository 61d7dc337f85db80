"""Unstructured sparsity kernels: the soft threshold of every tensor of a model, and its zero count, in one call.

    counts = cf.soft_threshold_(weights, 0.01, sources=thetas)   # w = sign(theta) * max(|theta| - t, 0)
    counts = cf.soft_threshold_(weights, taus)                   # in place: the proximal L1 step

This is the per-step update of LATS (Chen et al., 2023): the weights a network computes with are the soft
threshold of its latent parameters ``theta`` (``sources``), and the same pass counts the zeros it wrote, so
the sparsity needs no second read. Rules (reference: :mod:`catalyst_fused.reference_sparsity`):

* ``w = 0`` where ``|x| <= t``, else ``sign(x) * (|x| - t)``; computed in fp32 for fp16/bf16 (the tensors'
  dtype otherwise), ``t`` rounded to that dtype first, the result rounded once. NaN stays NaN, +-Inf stays
  +-Inf (for a finite ``t``).
* ``thresholds``: one number for every tensor, or one per tensor; finite and ``>= 0``. Pass Python floats
  (a CUDA tensor of thresholds costs a device sync to read).
* The returned counts (int64, one per tensor, on the tensors' device) are the zeros of the *written* weights.
* All tensors share one dtype and device and are contiguous; ``sources[i]`` has ``weights[i]``'s shape and
  may be ``weights[i]`` itself; no weight may share memory with another tensor of the call.

Backends as for the penalty (``backend=``): ``"cpp"`` (C++ CPU kernel; CUDA C++ for CUDA tensors),
``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"reference"``, ``"auto"``. The operator
``torch.ops.catalyst_fused.soft_threshold_`` has a fake function, so ``torch.compile`` traces through it.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Sequence, Union

import torch

from . import operators, reference_sparsity
from ._validation import as_tensor_list
from .backends import triton_ops
from .functional import resolve_backend

__all__ = ["soft_threshold_", "check_soft_threshold_args"]

_PREFIX = "catalyst_fused: soft_threshold_:"


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype)


def check_soft_threshold_args(weights, sources, thresholds, *, check_memory: bool = True) -> None:
    """The C++ operator's checks, with its messages (csrc/soft_threshold.cpp); fake tensors skip the memory check."""
    if not weights:
        raise ValueError(f"{_PREFIX} weights must be a non-empty sequence of tensors")
    first = weights[0]
    if not first.is_floating_point():
        raise TypeError(f"{_PREFIX} weights[0] must be a floating-point tensor, got {_dtype(first)}")
    for name, tensors in (("weights", weights), ("sources", sources or [])):
        for i, t in enumerate(tensors):
            if t.dtype != first.dtype:
                raise TypeError(f"{_PREFIX} {name}[{i}] has dtype {_dtype(t)} but weights[0] has dtype {_dtype(first)}; "
                                "all tensors must share one dtype")
            if t.device != first.device:
                raise ValueError(f"{_PREFIX} {name}[{i}] is on {t.device} but weights[0] is on {first.device}")
            if name == "sources" and t.shape != weights[i].shape:
                raise ValueError(f"{_PREFIX} sources[{i}] has shape {list(t.shape)} but weights[{i}] has shape "
                                 f"{list(weights[i].shape)}")
            if not t.is_contiguous():
                raise ValueError(f"{_PREFIX} {name}[{i}] must be contiguous")
        if name == "weights" and sources is not None and len(sources) != len(weights):
            raise ValueError(f"{_PREFIX} got {len(sources)} sources for {len(weights)} weights")
    if len(thresholds) != len(weights):
        raise ValueError(f"{_PREFIX} got {len(thresholds)} thresholds for {len(weights)} weights")
    for i, t in enumerate(thresholds):
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"{_PREFIX} thresholds[{i}] must be a finite number >= 0, got {t}")
    if check_memory:
        _check_memory(weights, sources)


def _check_memory(weights, sources) -> None:
    # A weight may overlap nothing; a source nothing but sources (or its own weight: the in-place form).
    ranges = []
    for i, w in enumerate(weights):
        if w.numel():
            ranges.append((w.data_ptr(), w.data_ptr() + w.numel() * w.element_size(), True, i))
    for i, s in enumerate(sources or []):
        if s.numel() and s.data_ptr() != weights[i].data_ptr():
            ranges.append((s.data_ptr(), s.data_ptr() + s.numel() * s.element_size(), False, i))
    ranges.sort(key=lambda r: r[0])
    widest_any = widest_weight = None
    for r in ranges:
        other = widest_any if r[2] else widest_weight
        if other is not None and other[1] > r[0]:
            kind = lambda is_weight: "weights" if is_weight else "sources"  # noqa: E731
            raise ValueError(f"{_PREFIX} {kind(r[2])}[{r[3]}] shares memory with {kind(other[2])}[{other[3]}]; every "
                             "weight must have its own memory (a source may only be its own weight, for the in-place form)")
        if widest_any is None or r[1] > widest_any[1]:
            widest_any = r
        if r[2] and (widest_weight is None or r[1] > widest_weight[1]):
            widest_weight = r


def _thresholds(thresholds, n: int) -> list[float]:
    if isinstance(thresholds, bool):
        raise TypeError(f"{_PREFIX} thresholds must be a number or a sequence of numbers, got a bool")
    if isinstance(thresholds, Real):
        return [float(thresholds)] * n
    if isinstance(thresholds, torch.Tensor):
        if thresholds.dim() > 1:
            raise ValueError(f"{_PREFIX} thresholds must be a number or a 1-D sequence, got shape {list(thresholds.shape)}")
        return [float(v) for v in thresholds.reshape(-1).tolist()] if thresholds.dim() else [float(thresholds)] * n
    try:
        values = list(thresholds)
    except TypeError:
        raise TypeError(f"{_PREFIX} thresholds must be a number or a sequence of numbers, got "
                        f"{type(thresholds).__name__}") from None
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (Real, torch.Tensor)):
            raise TypeError(f"{_PREFIX} thresholds[{i}] must be a number, got {type(v).__name__}")
    return [float(v) for v in values]


def soft_threshold_(
    weights: Sequence[torch.Tensor],
    thresholds: Union[float, Sequence[float], torch.Tensor],
    *,
    sources: Optional[Sequence[torch.Tensor]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Writes ``sign(x) * max(|x| - t_i, 0)`` into every ``weights[i]`` (``x`` from ``sources[i]``, or from
    ``weights[i]`` itself when ``sources`` is None) in one fused call, and returns the number of zeros written
    per tensor (int64). See the module docstring for the rules.

    Raises:
        ValueError / TypeError: naming the argument (``weights[3]``, ``thresholds[0]``, ...); nothing is written.
    """
    weights = as_tensor_list(weights, "weights")
    sources = None if sources is None else as_tensor_list(sources, "sources")
    values = _thresholds(thresholds, len(weights))
    impl = resolve_backend(backend, weights[0].device)
    with torch.no_grad():
        if impl == "reference":
            check_soft_threshold_args(weights, sources, values)
            return reference_sparsity.soft_threshold_(weights, sources, values)
        if impl == "triton":
            return torch.ops.catalyst_fused.triton_soft_threshold_(weights, sources, values)
        return torch.ops.catalyst_fused.soft_threshold_(weights, sources, values)


def _register_fake() -> None:
    @torch.library.register_fake("catalyst_fused::soft_threshold_")
    def _soft_threshold_fake(weights, sources, thresholds):
        check_soft_threshold_args(weights, sources, thresholds, check_memory=False)
        return weights[0].new_empty((len(weights),), dtype=torch.int64)


if operators.cpp_available():
    _register_fake()

if triton_ops.TRITON_IMPORT_ERROR is None:
    from .backends import triton_soft_threshold  # noqa: F401,E402  (registers catalyst_fused::triton_soft_threshold_)
