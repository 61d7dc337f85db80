"""catalyst_fused: fused kernels and workflow for Catalyst structured pruning (Jung & Lee, 2025).

    import catalyst_fused as cf
    pruner = cf.Pruner(model, example_inputs, gamma=0.03)    # the pruner object (needs the [pruning] extra)
    model = cf.load_pruned(MyNet(), "runs/x/pruned_model")    # a pruned model from its safe files
    catalysts = cf.init_catalysts(weights, c0=1.0)           # or the kernels directly (torch and numpy only)
    loss = criterion(model(x), y) + gamma * cf.penalty(weights, catalysts)

The kernels and the operator layer need only torch and numpy. The pruner and the workflow
(``catalyst_fused.pruning``) need the ``[pruning]`` extra (torch-pruning, torchvision, scikit-learn, tqdm,
matplotlib, safetensors); ``cf.Pruner`` (and ``cf.load_pruned``, ``cf.save_pruned``, ``cf.export_model``) are
imported on first use and name the extra if something is missing.
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
from .sparsity import soft_threshold_
from .backends.triton_ops import triton_available
from .operators import cpp_available, cuda_kernels_built

__version__ = "0.1.0"

_PRUNING_NAMES = ("Pruner", "CatalystPruner", "PruneConfig", "run_pipeline", "recalibrate_bn", "load_pruned", "save_pruned",
                  "export_model")


def require_pruning_extra(what: str = "catalyst_fused.pruning") -> None:
    """Raises ImportError naming the ``[pruning]`` extra if one of its packages is missing."""
    import importlib.util

    missing = [name for module, name in (("torch_pruning", "torch-pruning"), ("torchvision", "torchvision"),
                                         ("sklearn", "scikit-learn"), ("tqdm", "tqdm"), ("matplotlib", "matplotlib"),
                                         ("safetensors", "safetensors"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"{what} needs the [pruning] extra; missing: {', '.join(missing)}. Install it with "
                          "pip install 'catalyst_fused[pruning]' (or: pip install " + " ".join(missing) + ")")


def __getattr__(name):
    # The pruner needs Torch-Pruning; import it on first use so that the kernels work without it.
    if name in _PRUNING_NAMES:
        try:
            from . import pruning
        except ImportError as exc:
            require_pruning_extra(f"catalyst_fused.{name}")
            raise exc
        return getattr(pruning, name)
    raise AttributeError(f"module 'catalyst_fused' has no attribute {name!r}")


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
    "soft_threshold_",
    "split_per_weight",
    "triton_available",
]
