"""catalyst_fused: fused kernels and workflow for Catalyst structured pruning (Jung & Lee, 2025).

    import catalyst_fused as cf
    catalysts = cf.init_catalysts(weights, c0=1.0)
    loss = criterion(model(x), y) + gamma * cf.penalty(weights, catalysts)
"""
from . import reference
from .functional import (
    BACKENDS,
    PenaltyStats,
    group_norms,
    init_catalysts,
    penalty,
    penalty_,
    resolve_backend,
    split_per_weight,
)
from .layout import GroupLayout, Slices
from .backends.triton_ops import triton_available
from .operators import cpp_available, cuda_kernels_built

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "GroupLayout",
    "PenaltyStats",
    "Slices",
    "cpp_available",
    "cuda_kernels_built",
    "group_norms",
    "init_catalysts",
    "penalty",
    "penalty_",
    "reference",
    "resolve_backend",
    "split_per_weight",
    "triton_available",
]
