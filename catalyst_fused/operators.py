"""The operator layer: loads the C++ library and registers fake (meta) functions and autograd.

Operators (schemas in csrc/penalty.cpp):

* ``catalyst_fused::penalty_forward(weights, catalysts, plan) -> (penalty, norms, ratios)``
* ``catalyst_fused::penalty_backward(grad_penalty, weights, catalysts, norms, plan) -> (weight_grads, catalyst_grads)``
* ``catalyst_fused::penalty_accumulate_(weights, catalysts, weight_grads!, catalyst_grads!, scale, plan)
  -> (penalty, norms, ratios)``

With the fake functions, ``torch.compile(fullgraph=True)`` traces through the operators; with the
autograd registration, ``penalty_forward`` is differentiable with respect to every weight and catalyst
(``norms`` and ``ratios`` are statistics, not differentiable outputs).
"""
from __future__ import annotations

import torch

from .reference import accumulation_dtype

try:
    from . import _C  # noqa: F401  (importing it runs the TORCH_LIBRARY registrations)

    CPP_IMPORT_ERROR: Exception | None = None
except ImportError as error:  # a source checkout that was not built
    CPP_IMPORT_ERROR = error


def cpp_available() -> bool:
    return CPP_IMPORT_ERROR is None


def _stats_like(weights, catalysts):
    acc = accumulation_dtype(weights[0].dtype)
    groups = sum(d.shape[0] for d in catalysts)
    first = weights[0]
    return first.new_empty((), dtype=acc), first.new_empty((groups,), dtype=acc), first.new_empty((groups,), dtype=acc)


def _register() -> None:
    ops = torch.ops.catalyst_fused

    @torch.library.register_fake("catalyst_fused::penalty_forward")
    def _penalty_forward_fake(weights, catalysts, plan):
        torch._check(len(weights) > 0, lambda: "catalyst_fused: weights must be a non-empty sequence of tensors")
        return _stats_like(weights, catalysts)

    @torch.library.register_fake("catalyst_fused::penalty_backward")
    def _penalty_backward_fake(grad_penalty, weights, catalysts, norms, plan):
        return [torch.empty_like(w) for w in weights], [torch.empty_like(d) for d in catalysts]

    @torch.library.register_fake("catalyst_fused::penalty_accumulate_")
    def _penalty_accumulate_fake(weights, catalysts, weight_grads, catalyst_grads, scale, plan):
        return _stats_like(weights, catalysts)

    def _setup_context(ctx, inputs, output):
        weights, catalysts, plan = inputs
        _, norms, _ = output
        ctx.num_weights = len(weights)
        ctx.has_plan = plan is not None
        ctx.save_for_backward(*weights, *catalysts, norms, *([plan] if plan is not None else []))

    def _backward(ctx, grad_penalty, grad_norms, grad_ratios):
        saved = ctx.saved_tensors
        k = ctx.num_weights
        plan = saved[-1] if ctx.has_plan else None
        end = len(saved) - (1 if ctx.has_plan else 0)
        weights, catalysts, norms = list(saved[:k]), list(saved[k : end - 1]), saved[end - 1]
        weight_grads, catalyst_grads = ops.penalty_backward(grad_penalty, weights, catalysts, norms, plan)
        return weight_grads, catalyst_grads, None

    torch.library.register_autograd("catalyst_fused::penalty_forward", _backward, setup_context=_setup_context)


if cpp_available():
    _register()
