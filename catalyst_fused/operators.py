"""The operator layer: loads the C++ library and registers fake (meta) functions and autograd.

Operators (schemas in csrc/penalty.cpp):

* ``catalyst_fused::penalty_forward(weights, catalysts, plan) -> (penalty, norms, ratios)``
* ``catalyst_fused::penalty_backward(grad_penalty, weights, catalysts, norms, plan) -> (weight_grads, catalyst_grads)``
* ``catalyst_fused::penalty_accumulate_(weights, catalysts, weight_grads!, catalyst_grads!, scale, plan)
  -> (penalty, norms, ratios)``
* ``catalyst_fused::penalty_accumulate_selected_(weights, catalysts, weight_grads!, weight_index,
  catalyst_grads!, catalyst_index, scale, plan) -> (penalty, norms, ratios)``: the same for the tensors
  listed in the indices only (the others are read but get no gradient)
* ``catalyst_fused::penalty_partial_sums(weights, catalysts, plan) -> sums`` and
  ``catalyst_fused::penalty_finish_(weights, catalysts, weight_grads!, weight_index, catalyst_grads!,
  catalyst_index, scale, plan, sums) -> (penalty, norms, ratios)``: the two halves of the in-place op for
  sharded weights (every group's sum of squares over the local slices; then, from the sums all-reduced
  across processes, the statistics and the gradients of the local slices); see :mod:`catalyst_fused.sharded`
* ``catalyst_fused::release_cached_memory()``: frees the scratch and gradient buffers the CPU kernels keep
  between calls

With the fake functions registered here, ``torch.compile(fullgraph=True)`` traces through the operators.
Autograd of ``penalty_forward`` is registered in C++ (csrc/autograd.cpp: a Python registration costs more
per call than the fused kernel itself); it is differentiable with respect to every weight and catalyst
(``norms`` and ``ratios`` are statistics, not differentiable outputs), and its backward calls only
``penalty_backward``.
"""
from __future__ import annotations

import torch

from ._validation import check_plan
from .reference import accumulation_dtype

try:
    from . import _C  # noqa: F401  (importing it runs the TORCH_LIBRARY registrations)

    CPP_IMPORT_ERROR: Exception | None = None
except ImportError as error:  # a source checkout that was not built
    CPP_IMPORT_ERROR = error


# cf.penalty_ on plain CPU tensors without the dispatcher (csrc/module.cpp); None without the extension.
penalty_inplace_lean = getattr(_C, "penalty_inplace_lean", None) if CPP_IMPORT_ERROR is None else None


def cpp_available() -> bool:
    """Whether the compiled operator library loaded (its CPU kernels are always built)."""
    return CPP_IMPORT_ERROR is None


# Decided once at import (and so a constant for torch.compile's tracing).
_CUDA_KERNELS_BUILT = cpp_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "catalyst_fused::penalty_forward", "CUDA"
)


def cuda_kernels_built() -> bool:
    """Whether the operator library was compiled with its CUDA kernels (setup.py builds them whenever
    torch has CUDA and nvcc is found; no GPU is needed to build them)."""
    return _CUDA_KERNELS_BUILT


def stats_like(weights, catalysts):
    """Empty (penalty, norms, ratios) of the right dtype, shape and device: what fake functions return."""
    acc = accumulation_dtype(weights[0].dtype)
    groups = sum(d.shape[0] for d in catalysts)
    first = weights[0]
    return first.new_empty((), dtype=acc), first.new_empty((groups,), dtype=acc), first.new_empty((groups,), dtype=acc)


def _register() -> None:
    # The fake functions run the same argument checks as the kernels: they are what meta tensors and
    # torch.compile's tracing see.
    @torch.library.register_fake("catalyst_fused::penalty_forward")
    def _penalty_forward_fake(weights, catalysts, plan):
        check_plan(weights, catalysts, plan)
        return stats_like(weights, catalysts)

    @torch.library.register_fake("catalyst_fused::penalty_backward")
    def _penalty_backward_fake(grad_penalty, weights, catalysts, norms, plan):
        check_plan(weights, catalysts, plan)
        return [torch.empty_like(w) for w in weights], [torch.empty_like(d) for d in catalysts]

    @torch.library.register_fake("catalyst_fused::penalty_accumulate_")
    def _penalty_accumulate_fake(weights, catalysts, weight_grads, catalyst_grads, scale, plan):
        check_plan(weights, catalysts, plan)
        return stats_like(weights, catalysts)

    @torch.library.register_fake("catalyst_fused::penalty_accumulate_selected_")
    def _penalty_accumulate_selected_fake(weights, catalysts, weight_grads, weight_index, catalyst_grads, catalyst_index, scale, plan):
        check_plan(weights, catalysts, plan)
        for grads, index, like, name in (
            (weight_grads, weight_index, weights, "weight_grads"),
            (catalyst_grads, catalyst_index, catalysts, "catalyst_grads"),
        ):
            if len(grads) != len(index) or any(not 0 <= j < len(like) for j in index):
                raise ValueError(f"catalyst_fused: {name} and its index do not match the tensors they belong to")
        return stats_like(weights, catalysts)

    @torch.library.register_fake("catalyst_fused::penalty_partial_sums")
    def _penalty_partial_sums_fake(weights, catalysts, plan):
        check_plan(weights, catalysts, plan)
        return stats_like(weights, catalysts)[1]

    @torch.library.register_fake("catalyst_fused::penalty_finish_")
    def _penalty_finish_fake(weights, catalysts, weight_grads, weight_index, catalyst_grads, catalyst_index, scale, plan, sums):
        check_plan(weights, catalysts, plan)
        return stats_like(weights, catalysts)


if cpp_available():
    _register()
