"""Catalyst structured-pruning workflow: targets, training with the fused penalty, decision, physical
channel removal, fine-tuning and reporting.

    from catalyst_fused.pruning import PruneConfig, run_pipeline
    report = run_pipeline(PruneConfig(model="small_cnn", dataset="digits", out="runs/digits"))

Command line: ``python -m catalyst_fused.prune --help``. See :mod:`catalyst_fused.pruning.workflow` for the
choices the workflow makes and :mod:`catalyst_fused.pruning.targets` for which channels are prunable.
"""
from . import bypass
from .metrics import count_flops, count_params, evaluate, measure_latency
from .surgery import mask_model, prune_model, slice_catalysts
from .targets import MODES, ModuleSlice, Target, TargetSet, build_target_set, find_targets
from .workflow import FORMULATIONS, PruneConfig, calibrate_c0, decide, predict_speedup, run_pipeline

__all__ = [
    "FORMULATIONS",
    "MODES",
    "ModuleSlice",
    "PruneConfig",
    "Target",
    "TargetSet",
    "build_target_set",
    "bypass",
    "calibrate_c0",
    "predict_speedup",
    "count_flops",
    "count_params",
    "decide",
    "evaluate",
    "find_targets",
    "mask_model",
    "measure_latency",
    "prune_model",
    "run_pipeline",
    "slice_catalysts",
]
