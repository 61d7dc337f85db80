"""Registers the Triton kernels as operators ``catalyst_fused::triton_penalty_*``.

They are ``torch.library.custom_op``s with fake functions and autograd, so ``torch.compile(fullgraph=True)``
treats them as opaque nodes, like the C++ operators. They run on CUDA tensors when Triton compiles for the
GPU, or on CPU tensors under ``TRITON_INTERPRET=1`` (how GPU-less CI runs them) -- never on CUDA tensors
while interpreted: the interpreter would read the device addresses in the pointer tables as host memory.
They are tagged ``cudagraph_unsafe`` (where torch has the tag) and refuse CUDA graph capture.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .._validation import check_penalty_args
from ..operators import stats_like as _stats_like
from ..reference import accumulation_dtype

try:
    from . import triton_penalty as _kernels

    TRITON_IMPORT_ERROR: Exception | None = None
except Exception as error:  # triton missing or broken: the backend is reported unavailable
    _kernels = None
    TRITON_IMPORT_ERROR = error


# Triton reads TRITON_INTERPRET when its kernels are defined (at import), so this is fixed from then on.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors on ``device``: CUDA tensors when Triton compiles
    (TRITON_INTERPRET unset or 0), CPU tensors under TRITON_INTERPRET=1."""
    if _kernels is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return not _INTERPRETED
    return device.type == "cpu" and _INTERPRETED


def unavailable_reason(device: torch.device) -> str:
    """Why triton_available(device) is False (empty when it is True)."""
    device = torch.device(device)
    if _kernels is None:
        return f"triton is not importable: {TRITON_IMPORT_ERROR}"
    if device.type == "cuda" and _INTERPRETED:
        return "TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors only (set TRITON_INTERPRET=0 for CUDA)"
    if device.type == "cpu" and not _INTERPRETED:
        return "CPU tensors need TRITON_INTERPRET=1, set before triton is imported"
    if device.type not in ("cpu", "cuda"):
        return f"no Triton kernels for {device.type} tensors"
    return ""


def _check_device(weights):
    device = weights[0].device
    if not triton_available(device):
        raise RuntimeError(f"catalyst_fused: the Triton backend cannot run here: {unavailable_reason(device)}")


def _check_contiguous(tensors, name):
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise ValueError(f"catalyst_fused: {name}[{i}] must be contiguous")


# Inductor keeps ops with this tag out of CUDA graphs (reduce-overhead mode) instead of failing the capture.
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("catalyst_fused::triton_penalty_forward", mutates_args=(), tags=_TAGS)
def triton_penalty_forward(
    weights: list[torch.Tensor], catalysts: list[torch.Tensor], plan: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_penalty_args(weights, catalysts, per_row=plan is None)
    _check_contiguous(weights, "weights")
    _check_contiguous(catalysts, "catalysts")
    _check_device(weights)
    return _kernels.penalty_forward(weights, catalysts, plan)


@triton_penalty_forward.register_fake
def _(weights, catalysts, plan):
    check_penalty_args(weights, catalysts, per_row=plan is None)
    return _stats_like(weights, catalysts)


def _check_norms(grad_penalty, weights, catalysts, norms):
    acc = accumulation_dtype(weights[0].dtype)
    groups = sum(d.shape[0] for d in catalysts)
    if norms.dim() != 1 or norms.shape[0] != groups or norms.dtype != acc or not norms.is_contiguous() or norms.device != weights[0].device:
        raise ValueError(
            f"catalyst_fused: norms must be the contiguous {acc} [{groups}] tensor returned by penalty_forward, "
            f"on {weights[0].device}; got {norms.dtype} {tuple(norms.shape)} on {norms.device}"
        )
    if grad_penalty.numel() != 1 or grad_penalty.device != weights[0].device:
        raise ValueError(
            f"catalyst_fused: grad_penalty must have one element on {weights[0].device}, got shape "
            f"{tuple(grad_penalty.shape)} on {grad_penalty.device}"
        )


@torch.library.custom_op("catalyst_fused::triton_penalty_backward", mutates_args=(), tags=_TAGS)
def triton_penalty_backward(
    grad_penalty: torch.Tensor,
    weights: list[torch.Tensor],
    catalysts: list[torch.Tensor],
    norms: torch.Tensor,
    plan: Optional[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    check_penalty_args(weights, catalysts, per_row=plan is None)
    _check_contiguous(weights, "weights")
    _check_contiguous(catalysts, "catalysts")
    _check_norms(grad_penalty, weights, catalysts, norms)
    _check_device(weights)
    return _kernels.penalty_backward(grad_penalty, weights, catalysts, norms, plan)


@triton_penalty_backward.register_fake
def _(grad_penalty, weights, catalysts, norms, plan):
    return [torch.empty_like(w) for w in weights], [torch.empty_like(d) for d in catalysts]


@torch.library.custom_op(
    "catalyst_fused::triton_penalty_accumulate_", mutates_args=("weight_grads", "catalyst_grads"), tags=_TAGS
)
def triton_penalty_accumulate_(
    weights: list[torch.Tensor],
    catalysts: list[torch.Tensor],
    weight_grads: list[torch.Tensor],
    catalyst_grads: list[torch.Tensor],
    scale: float,
    plan: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_penalty_args(weights, catalysts, per_row=plan is None)
    for name, grads, like in (("weight_grads", weight_grads, weights), ("catalyst_grads", catalyst_grads, catalysts)):
        if len(grads) != len(like):
            raise ValueError(f"catalyst_fused: got {len(grads)} {name} for {len(like)} tensors")
        for i, (g, t) in enumerate(zip(grads, like)):
            if g.shape != t.shape or g.dtype != t.dtype or g.device != t.device or not g.is_contiguous():
                raise ValueError(
                    f"catalyst_fused: {name}[{i}] must be a contiguous {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
                )
    _check_contiguous(weights, "weights")
    _check_contiguous(catalysts, "catalysts")
    _check_device(weights)
    return _kernels.penalty_accumulate_(weights, catalysts, weight_grads, catalyst_grads, scale, plan)


@triton_penalty_accumulate_.register_fake
def _(weights, catalysts, weight_grads, catalyst_grads, scale, plan):
    return _stats_like(weights, catalysts)


def _setup_context(ctx, inputs, output):
    weights, catalysts, plan = inputs
    ctx.num_weights = len(weights)
    ctx.plan = plan
    ctx.save_for_backward(*weights, *catalysts, output[1])


def _backward(ctx, grad_penalty, grad_norms, grad_ratios):
    saved = ctx.saved_tensors
    k = ctx.num_weights
    weights, catalysts, norms = list(saved[:k]), list(saved[k:-1]), saved[-1]
    weight_grads, catalyst_grads = triton_penalty_backward(grad_penalty, weights, catalysts, norms, ctx.plan)
    return weight_grads, catalyst_grads, None


triton_penalty_forward.register_autograd(_backward, setup_context=_setup_context)
