"""Catalyst structured pruning of any model: the :class:`Pruner` object, and the whole workflow built on it.

    import catalyst_fused as cf
    pruner = cf.Pruner(model, example_inputs, gamma=0.03)      # see catalyst_fused.pruning.pruner
    ...
    from catalyst_fused.pruning import PruneConfig, run_pipeline
    report = run_pipeline(PruneConfig(model="small_cnn", dataset="digits", out="runs/digits"))

Needs the ``[pruning]`` extra (Torch-Pruning finds the coupled channel groups). Command line:
``python -m catalyst_fused.prune --help``. Layout: :mod:`.targets` (which channels are prunable),
:mod:`.surgery` (physical removal), :mod:`.methods` (Catalyst and the baselines), :mod:`.formulations` and
:mod:`.bypass` (regularizer / extended model), :mod:`.pruner` (the public object), :mod:`.metrics`,
:mod:`.workflow` (the pipeline's stages and runner), :mod:`.serialization` (the pruned model as safetensors +
JSON spec, :func:`load_pruned`), :mod:`.export` (ONNX / ``.pt2``, checked), :mod:`.latency` (dense vs pruned
in eager, compile and onnxruntime).
"""
from . import bypass
from .export import EXPORT_FORMATS, ExportCheckError, ExportResult, export_model
from .latency import RUNTIMES, LatencyTable, compare_latency
from .formulations import FORMULATIONS
from .methods import METHODS, Decision, round_widths
from .metrics import count_flops, count_params, evaluate, measure_latency
from .pruner import CatalystPruner, PruneSummary, Pruner, PruningStats, TargetStats
from .serialization import PrunedModelError, load_pruned, read_pruned_spec, save_pruned
from .surgery import keep_indices, mask_model, prune_model, slice_catalysts, slice_optimizer_state_
from .targets import MODES, ModuleSlice, Target, TargetSet, build_target_set, find_targets
from .bn import recalibrate_bn
from .workflow import Interrupted, PruneConfig, Report, run_pipeline

__all__ = [
    "EXPORT_FORMATS",
    "ExportCheckError",
    "ExportResult",
    "LatencyTable",
    "PrunedModelError",
    "RUNTIMES",
    "compare_latency",
    "export_model",
    "load_pruned",
    "read_pruned_spec",
    "round_widths",
    "save_pruned",
    "FORMULATIONS",
    "METHODS",
    "MODES",
    "CatalystPruner",
    "Decision",
    "Interrupted",
    "ModuleSlice",
    "PruneConfig",
    "PruneSummary",
    "Pruner",
    "PruningStats",
    "Report",
    "Target",
    "TargetSet",
    "TargetStats",
    "build_target_set",
    "bypass",
    "count_flops",
    "count_params",
    "evaluate",
    "find_targets",
    "keep_indices",
    "mask_model",
    "measure_latency",
    "prune_model",
    "recalibrate_bn",
    "run_pipeline",
    "slice_catalysts",
    "slice_optimizer_state_",
]
