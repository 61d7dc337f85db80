"""The typed report of a pruning run: what ``report.json`` holds, as dataclasses.

    report = Report.load("runs/digits/report.json")
    report.accuracy.after_finetune, report.cost.flops_ratio, report.stages.prune.margin_log10c

Every section is a dataclass with ``to_dict`` (JSON-ready) and ``from_dict``; :meth:`Report.to_json` writes
strict JSON (non-finite numbers become ``null``: a diverged run's NaN loss included).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from ..latency import LatencyRow, LatencyTable
from .config import PruneConfig

__all__ = [
    "StageEval", "Calibration", "Opt1Report", "PruneStageReport", "Opt2Report", "SparsifyReport", "MaskReport",
    "Stages", "Accuracy", "Cost", "Report", "Interrupted", "json_safe", "write_json_atomic", "LatencyRow",
    "LatencyTable",
]


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None and tuples by lists (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return json_safe(value.item())
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes strict JSON to ``path`` through a temporary file and a rename (no torn file on a crash)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(json_safe(data), f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Section:
    """to_dict / from_dict for a flat dataclass (unknown keys are ignored on load)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict]):
        if d is None:
            return None
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class StageEval(_Section):
    """Dense training or fine-tuning: epochs and the test figures at the end."""

    epochs: int
    accuracy: float
    loss: float
    samples: int
    loaded_from: Optional[str] = None  # dense weights read from a file instead of trained


@dataclass
class Calibration(_Section):
    """The ``calibrate`` stage: the sparsity strength and what the catalysts' dynamics predict for opt1."""

    gamma: float
    gamma_auto: bool
    opt1_lr: float
    rate_lam: float  # lr * gamma / (1 - momentum)
    budget_steps: Optional[int]
    steps_per_epoch: int
    target_speedup: Optional[float] = None
    predictions: dict = field(default_factory=dict)  # Pruner.predictions(): k, decision times, force step, ...
    warnings: list = field(default_factory=list)


@dataclass
class Opt1Report(_Section):
    method: str
    c0: float
    stopped_because: Optional[str] = None
    epochs_run: int = 0
    initial_fraction_decided: Optional[float] = None
    final_catalysts: Optional[dict] = None  # the decision statistic per layer at the end
    accuracy: Optional[float] = None
    loss: Optional[float] = None
    samples: Optional[int] = None
    final_threshold: Optional[float] = None  # soft-threshold methods: the cumulative threshold
    gamma: Optional[float] = None  # the (resolved) base gamma
    lr: Optional[float] = None  # the constant opt1 learning rate
    decisions: Optional[dict] = None  # Catalyst: decided / forced counts, decision steps, target feedback
    stop_rule_fired: Optional[bool] = None
    warnings: list = field(default_factory=list)


@dataclass
class PruneStageReport(_Section):
    method: str
    rule: str
    statistic: str
    channels_total: int
    channels_pruned: int
    undecided_total: int
    margin_log10c: Optional[float]
    margin_log10c_decided_only: Optional[float]
    margin_definition: str
    robustness: dict
    magnitude_bias: dict
    channels: dict  # one entry per channel: layer, initial_norm, statistic, pruned
    per_layer: dict
    accuracy_regularized: float
    accuracy_after_removal: float
    verification: dict
    warnings: list = field(default_factory=list)


@dataclass
class Opt2Report(_Section):
    epochs: int
    mu: float
    ramp: int
    lr: float
    initial_max_abs_coefficient: float
    objective: str
    residual_max_abs_coefficient: Optional[float] = None
    residual_tol: Optional[float] = None
    residual_ok: Optional[bool] = None
    accuracy_before_snap: Optional[float] = None
    accuracy_after_snap: Optional[float] = None
    snap_accuracy_change: Optional[float] = None
    snap_max_abs_logit_change: Optional[float] = None
    samples: Optional[int] = None


@dataclass
class SparsifyReport(_Section):
    """Unstructured path (workflow/unstructured.py): the sparsity-inducing training."""

    method: str
    target_sparsity: float
    scope: str
    schedule: Optional[str]
    beta: Optional[float]
    tensors: int
    elements: int
    total_steps: Optional[int]
    steps_per_epoch: int
    initial_sparsity: float
    lr_schedule: str
    epochs_run: int = 0
    steps: int = 0
    sparsity: Optional[float] = None
    final_threshold: Optional[list] = None
    threshold_history: list = field(default_factory=list)  # every re-estimate of the final threshold
    accuracy: Optional[float] = None
    loss: Optional[float] = None
    samples: Optional[int] = None


@dataclass
class MaskReport(_Section):
    """Unstructured path: the masks fixed, the real sparsity against the target."""

    method: str
    target_sparsity: float
    scope: str
    sparsity: float
    abs_error_points: float
    within_one_point: bool
    zeros: int
    elements: int
    per_tensor: dict
    model_params: int
    model_zeros: int
    model_sparsity: float
    final_threshold: list
    accuracy_before: float
    accuracy_after: float
    max_abs_logit_change: float
    samples: int
    dense_macs: int
    nonzero_macs: int
    macs_note: str
    sparsity_after_finetune: Optional[float] = None


_STAGE_TYPES = {"dense": StageEval, "calibration": Calibration, "opt1": Opt1Report, "prune": PruneStageReport,
                "opt2": Opt2Report, "finetune": StageEval, "sparsify": SparsifyReport, "masks": MaskReport}


@dataclass
class Stages:
    """One section per stage that ran (None: not run, or skipped)."""

    dense: Optional[StageEval] = None
    calibration: Optional[Calibration] = None
    opt1: Optional[Opt1Report] = None
    prune: Optional[PruneStageReport] = None
    opt2: Optional[Opt2Report] = None
    finetune: Optional[StageEval] = None
    sparsify: Optional[SparsifyReport] = None  # the unstructured path's two stages
    masks: Optional[MaskReport] = None

    def to_dict(self) -> dict:
        return {name: getattr(self, name).to_dict() for name in _STAGE_TYPES if getattr(self, name) is not None}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "Stages":
        d = d or {}
        return cls(**{name: t.from_dict(d.get(name)) for name, t in _STAGE_TYPES.items()})


@dataclass
class Accuracy(_Section):
    dense: Optional[float] = None
    regularized: Optional[float] = None
    after_removal: Optional[float] = None
    after_opt2: Optional[float] = None
    after_finetune: Optional[float] = None


@dataclass
class Cost(_Section):
    """FLOPs, parameters and latency of the dense and the pruned model. ``dense["latency"]`` /
    ``pruned["latency"]`` and ``latency_ratio`` are the headline figure (eager, batch ``latency_batch``, the
    most threads); ``latency_table`` has every runtime x batch x thread count with the machine's load."""

    dense: dict
    pruned: dict
    flops_ratio: float
    params_ratio: float
    latency_ratio: float
    flops_counting: str
    latency_table: Optional[LatencyTable] = None

    @classmethod
    def from_dict(cls, d: Optional[dict]):
        if d is None:
            return None
        cost = super().from_dict(d)
        cost.latency_table = LatencyTable.from_dict(d.get("latency_table"))
        return cost


@dataclass
class Report:
    """Everything ``report.json`` holds. ``status`` is ``"done"``, or ``"diverged"`` (then ``error`` says
    where and the later sections are missing)."""

    status: str
    config: PruneConfig
    dataset: dict
    input_shape: list
    targets: list
    targets_excluded: list
    c0_used: float
    stages: Stages
    accuracy: Accuracy
    cost: Optional[Cost]
    per_layer_kept: dict
    margin_log10c: Optional[float]
    decision_flips: Optional[dict]
    magnitude_bias: Optional[dict]
    undecided_total: Optional[int]
    history: list
    runtime_s: dict
    environment: dict
    method: str
    formulation: str
    opt2: Optional[dict] = None  # the opt2 section again (None for the regularizer formulation)
    evaluation: Optional[str] = None  # how the accuracies were measured (BatchNorm statistics)
    plots: list = field(default_factory=list)
    exports: Optional[dict] = None  # --export: format -> ExportResult.to_dict() (file, check against eager)
    error: Optional[str] = None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["config"] = self.config.to_dict()
        d["stages"] = self.stages.to_dict()
        d["accuracy"] = self.accuracy.to_dict()
        d["cost"] = None if self.cost is None else self.cost.to_dict()
        return json_safe(d)

    def to_json(self, path) -> None:
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["config"] = PruneConfig.from_dict(d["config"])
        kw["stages"] = Stages.from_dict(d.get("stages"))
        kw["accuracy"] = Accuracy.from_dict(d.get("accuracy") or {})
        kw["cost"] = Cost.from_dict(d.get("cost"))
        return cls(**kw)

    @classmethod
    def load(cls, path) -> "Report":
        """Reads a ``report.json``.

        Raises:
            ValueError: naming the file if it is not a report of this workflow.
        """
        try:
            data = json.loads(Path(path).read_text())
            return cls.from_dict(data)
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a readable report.json of catalyst_fused: {exc}") from exc


@dataclass
class Interrupted:
    """What :func:`run_pipeline` returns when it stops early on purpose (``stop_after_epochs``): the run
    can be continued with ``resume=True``."""

    stage: str
    epoch: int
    status: str = "interrupted"
