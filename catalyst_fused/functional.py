"""Public functions: the penalty (autograd and in-place), group norms and catalyst initialisation."""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional, Sequence

import torch

from . import operators, reference, sharded
from .backends import triton_ops
from ._validation import (
    as_tensor_list,
    check_distinct,
    check_leaf,
    check_nan_policy,
    check_penalty_args,
    check_scale,
    raise_if_not_finite,
)
from .layout import GroupLayout

__all__ = [
    "PenaltyStats",
    "BACKENDS",
    "penalty",
    "penalty_",
    "group_norms",
    "init_catalysts",
    "release_cached_memory",
    "resolve_backend",
    "split_per_weight",
]

BACKENDS = ("auto", "cpp", "triton", "reference")


class PenaltyStats(NamedTuple):
    """What one penalty call computes. ``norms`` and ``ratios`` are flat over all groups (segments in
    order; ``layout.split`` or :func:`split_per_weight` cut them) and detached."""

    penalty: torch.Tensor
    norms: torch.Tensor
    ratios: torch.Tensor


_warned_fallback: set = set()


def _fallback(device: torch.device, why: str) -> str:
    if device.type not in _warned_fallback:
        _warned_fallback.add(device.type)
        warnings.warn(
            f"catalyst_fused: no fused backend for {device.type} tensors ({why}); using the plain-PyTorch "
            "reference, which is correct but slow",
            RuntimeWarning,
            stacklevel=4,
        )
    return "reference"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The implementation ``backend`` means for tensors on ``device``: "cpp", "triton" or "reference".

    "auto" picks the C++ operators for CPU tensors and for CUDA tensors when their CUDA kernels were
    built, else the Triton kernels for CUDA tensors, else the reference (with a one-time warning).
    """
    if backend not in BACKENDS:
        raise ValueError(f"catalyst_fused: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if not triton_ops.triton_available(device):
            raise RuntimeError(f"catalyst_fused: backend='triton' cannot run here: {triton_ops.unavailable_reason(device)}")
        return "triton"
    if backend == "cpp":
        if not operators.cpp_available():
            raise RuntimeError(
                f"catalyst_fused: backend='cpp' needs the compiled extension, which failed to import: "
                f"{operators.CPP_IMPORT_ERROR}. Install the package with `pip install --no-build-isolation .`"
            )
        if device.type == "cuda" and not operators.cuda_kernels_built():
            raise RuntimeError("catalyst_fused: backend='cpp' for CUDA tensors needs the extension built with CUDA")
        return "cpp"
    # auto
    if device.type == "cpu":
        return "cpp" if operators.cpp_available() else _fallback(device, f"extension not built: {operators.CPP_IMPORT_ERROR}")
    if device.type == "cuda":
        if operators.cuda_kernels_built():
            return "cpp"
        if triton_ops.triton_available(device):
            return "triton"
        return _fallback(device, "extension built without CUDA and Triton unavailable")
    return _fallback(device, "only CPU and CUDA have kernels")


_FORWARD = {"cpp": lambda: torch.ops.catalyst_fused.penalty_forward, "triton": lambda: torch.ops.catalyst_fused.triton_penalty_forward}
_ACCUMULATE = {
    "cpp": lambda: torch.ops.catalyst_fused.penalty_accumulate_,
    "triton": lambda: torch.ops.catalyst_fused.triton_penalty_accumulate_,
}


def _prepare(weights, catalysts, layout, nan_policy):
    weights = as_tensor_list(weights, "weights")
    catalysts = as_tensor_list(catalysts, "catalysts")
    check_nan_policy(nan_policy)
    if layout is not None:
        if not isinstance(layout, GroupLayout):
            raise TypeError(f"catalyst_fused: layout must be a GroupLayout or None, got {type(layout).__name__}")
        layout.check(weights, catalysts)
    return weights, catalysts


def _segment_sizes(catalysts):
    return [d.shape[0] for d in catalysts]


def penalty(
    weights: Sequence[torch.Tensor],
    catalysts: Sequence[torch.Tensor],
    *,
    layout: Optional[GroupLayout] = None,
    return_stats: bool = False,
    backend: str = "auto",
    nan_policy: str = "propagate",
):
    """``R = sum_i |d_i| * ||F_i||_2`` over every group of every weight, differentiable with respect to all
    weights and catalysts.

    Args:
        weights: tensors whose dim-0 slices (rows) are the channels (conv ``[N, C, k, k]``, linear
            ``[N, M]``, BN scale ``[N]``), or whatever ``layout`` says.
        catalysts: one 1-D tensor per weight (``[N]``), or one per layout segment.
        layout: a :class:`GroupLayout` for groups spanning several tensors or input columns.
        return_stats: also return the group norms ``n`` and ratios ``c = |d| / n`` of the same pass, as
            a :class:`PenaltyStats`.
        backend: "auto", "cpp" (C++ CPU kernels; CUDA C++ kernels for CUDA tensors), "triton" (CUDA
            tensors, or CPU tensors under TRITON_INTERPRET=1) or "reference" (plain PyTorch); see
            :func:`resolve_backend`.
        nan_policy: "propagate" (NaN/Inf in the inputs make the penalty and the affected norms NaN/Inf)
            or "raise" (a ValueError naming the segment and group; costs one device sync).

    The penalty, norms and ratios are in the accumulation dtype: fp32 for fp16/bf16 inputs.
    Non-contiguous weights are copied (``.contiguous()``) before the kernel runs.
    """
    weights, catalysts = _prepare(weights, catalysts, layout, nan_policy)
    if sharded.is_sharded(weights):  # DTensor weights (FSDP2): partial sums, one all-reduce, finish
        stats = PenaltyStats(*sharded.penalty(weights, catalysts, layout=layout, backend=backend))
        if nan_policy == "raise":
            raise_if_not_finite(catalysts, stats.norms, _segment_sizes(catalysts))
        return stats if return_stats else stats.penalty
    impl = resolve_backend(backend, weights[0].device)
    if impl != "cpp":  # the C++ operators run these checks themselves
        check_penalty_args(weights, catalysts, per_row=layout is None)
        check_distinct(weights=weights, catalysts=catalysts)
    if impl == "reference":
        stats = PenaltyStats(*reference.penalty_with_stats(weights, catalysts, layout))
    else:
        weights = [w if w.is_contiguous() else w.contiguous() for w in weights]
        plan = None if layout is None else layout.member_table
        value, norms, ratios = _FORWARD[impl]()(weights, catalysts, plan)
        stats = PenaltyStats(value, norms.detach(), ratios.detach())
    if nan_policy == "raise":
        raise_if_not_finite(catalysts, stats.norms, _segment_sizes(catalysts))
    return stats if return_stats else stats.penalty


def penalty_(
    weights: Sequence[torch.Tensor],
    catalysts: Sequence[torch.Tensor],
    *,
    scale: float = 1.0,
    layout: Optional[GroupLayout] = None,
    backend: str = "auto",
    nan_policy: str = "propagate",
) -> PenaltyStats:
    """Adds ``scale * dR/dW`` into every ``w.grad`` and ``scale * dR/dd`` into every ``d.grad`` in one
    fused call, without building an autograd graph, and returns the (detached) :class:`PenaltyStats`.

    Call it after ``loss.backward()`` and before ``optimizer.step()``, with ``scale = gamma`` (a finite real
    number). With AMP's ``GradScaler`` the gradients are still scaled at that point: pass
    ``scale = gamma * scaler.get_scale()`` (and call it before ``scaler.unscale_`` or ``scaler.step``), so
    that unscaling divides the penalty's share back to ``gamma * dR/dW``.

    Only tensors that require grad get a gradient, as with autograd: a frozen weight (``requires_grad=False``)
    or a constant catalyst (Group Lasso's ``d = 1``) is read, because it belongs to the groups, but its
    ``.grad`` is neither created nor changed. Missing ``.grad`` tensors of the others are created as zeros.
    A tensor that requires grad but is not a leaf (the result of an operation) is an error: it keeps no
    ``.grad``. Weights and their gradients must be contiguous.
    """
    lean = operators.penalty_inplace_lean
    if lean is not None and (backend == "auto" or backend == "cpp") and not torch.compiler.is_compiling():
        # Plain CPU tensors: one C++ call does the selection, the checks, the missing gradients and the kernels
        # (it returns None, having changed nothing, for anything the code below must handle).
        value = _lean_scale(scale)
        if value is not None and (nan_policy == "propagate" or nan_policy == "raise"):
            if layout is None:
                out = lean(weights, catalysts, value, None, None)
            elif type(layout) is GroupLayout:
                out = lean(weights, catalysts, value, layout.member_table, layout._shape_key)
            else:
                out = None
            if out is not None:
                stats = PenaltyStats._make(out)
                if nan_policy == "raise":
                    raise_if_not_finite(catalysts, stats.norms, _segment_sizes(catalysts))
                return stats
    weights, catalysts = _prepare(weights, catalysts, layout, nan_policy)
    scale = check_scale(scale)
    if sharded.is_sharded(weights):  # DTensor weights (FSDP2): partial sums, one all-reduce, finish
        stats = PenaltyStats(*sharded.penalty_(weights, catalysts, scale=scale, layout=layout, backend=backend))
        if nan_policy == "raise":
            raise_if_not_finite(catalysts, stats.norms, _segment_sizes(catalysts))
        return stats
    impl = resolve_backend(backend, weights[0].device)
    weight_index = check_leaf(weights, "weights")
    catalyst_index = check_leaf(catalysts, "catalysts")
    missing = [p for p in (*(weights[i] for i in weight_index), *(catalysts[j] for j in catalyst_index)) if p.grad is None]
    if impl != "cpp" or missing:
        # Check before creating gradients, so that a failing call changes nothing (the C++ operators repeat
        # these checks).
        check_penalty_args(weights, catalysts, per_row=layout is None)
        check_distinct(
            weights=weights,
            catalysts=catalysts,
            weight_grads=[weights[i].grad for i in weight_index],
            catalyst_grads=[catalysts[j].grad for j in catalyst_index],
        )
    with torch.no_grad():
        for p in missing:
            p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
        weight_grads = [weights[i].grad for i in weight_index]
        catalyst_grads = [catalysts[j].grad for j in catalyst_index]
        everything = len(weight_index) == len(weights) and len(catalyst_index) == len(catalysts)
        plan = None if layout is None else layout.member_table
        if impl != "cpp":  # the C++ operators check the gradient buffers themselves
            check_distinct(weights=weights, catalysts=catalysts, weight_grads=weight_grads, catalyst_grads=catalyst_grads)
        if impl == "reference":
            full_w = [None] * len(weights)
            full_d = [None] * len(catalysts)
            for i, g in zip(weight_index, weight_grads):
                full_w[i] = g
            for j, g in zip(catalyst_index, catalyst_grads):
                full_d[j] = g
            stats = PenaltyStats(*reference.penalty_(weights, catalysts, full_w, full_d, scale, layout))
        elif everything:
            # Under no_grad the operator needs no detached copies (110 detaches cost more than a ResNet-56
            # kernel).
            stats = PenaltyStats(*_ACCUMULATE[impl]()(weights, catalysts, weight_grads, catalyst_grads, scale, plan))
        elif impl == "cpp":
            stats = PenaltyStats(
                *torch.ops.catalyst_fused.penalty_accumulate_selected_(
                    weights, catalysts, weight_grads, weight_index, catalyst_grads, catalyst_index, scale, plan
                )
            )
        else:  # a backend without the selected operator: scratch gradients for the tensors that get none
            w_set, d_set = set(weight_index), set(catalyst_index)
            full_w = [w.grad if i in w_set else torch.zeros_like(w) for i, w in enumerate(weights)]
            full_d = [d.grad if j in d_set else torch.zeros_like(d) for j, d in enumerate(catalysts)]
            stats = PenaltyStats(*_ACCUMULATE[impl]()(weights, catalysts, full_w, full_d, scale, plan))
    if nan_policy == "raise":
        raise_if_not_finite(catalysts, stats.norms, _segment_sizes(catalysts))
    return stats


def _lean_scale(scale) -> Optional[float]:
    """``scale`` as a finite float for penalty_'s lean path, or None (then check_scale decides)."""
    if type(scale) is float:
        return scale if math.isfinite(scale) else None
    if type(scale) is int and -(2**53) <= scale <= 2**53:
        return float(scale)
    return None


def _unit_catalysts(weights, layout):
    sizes = [w.shape[0] if w.dim() > 0 else 0 for w in weights] if layout is None else layout.segment_sizes
    return [weights[0].new_ones(size) for size in sizes]


def group_norms(
    weights: Sequence[torch.Tensor], *, layout: Optional[GroupLayout] = None, backend: str = "auto"
) -> torch.Tensor:
    """Every group norm ``n_i`` as one flat detached vector (segments in order), in the accumulation dtype."""
    weights = as_tensor_list(weights, "weights")
    with torch.no_grad():
        ones = _unit_catalysts(weights, layout)
        return penalty(weights, ones, layout=layout, return_stats=True, backend=backend).norms


def init_catalysts(
    weights: Sequence[torch.Tensor],
    c0: float = 1.0,
    *,
    layout: Optional[GroupLayout] = None,
    backend: str = "auto",
) -> list[torch.nn.Parameter]:
    """One trainable catalyst vector per weight (or per layout segment), ``d_i = c0 * n_i``, so that every
    channel starts at ratio ``c_i = c0`` whatever its magnitude (catalyst-method.md section 3).
    Catalysts have the weights' dtype and device."""
    weights = as_tensor_list(weights, "weights")
    c0 = float(c0)
    if not (c0 > 0 and c0 != float("inf")):
        raise ValueError(f"catalyst_fused: c0 must be a positive finite number, got {c0}")
    norms = group_norms(weights, layout=layout, backend=backend)
    sizes = [w.shape[0] for w in weights] if layout is None else list(layout.segment_sizes)
    return [torch.nn.Parameter((c0 * n).to(weights[0].dtype)) for n in torch.split(norms, sizes)]


def split_per_weight(flat: torch.Tensor, catalysts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Cuts a flat per-group vector (``PenaltyStats.norms`` or ``.ratios``) into one view per catalyst."""
    return list(torch.split(flat, [d.shape[0] for d in catalysts]))


def release_cached_memory() -> None:
    """Frees the memory the C++ CPU kernels keep between calls so that training steps allocate nothing:
    scratch buffers (at most a sixteenth of the weights' size, plus per-group vectors) and the gradient
    buffers of recent autograd backward calls that nothing references any more (up to one set of weight
    gradients per call site). Kept memory is reused automatically; call this after training to return it."""
    if operators.cpp_available():
        torch.ops.catalyst_fused.release_cached_memory()
