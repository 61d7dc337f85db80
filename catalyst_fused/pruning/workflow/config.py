"""The configuration of a pruning run (what ``python -m catalyst_fused.prune`` exposes as flags)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Union

import torch

from ...data import DATASETS
from ...models import MODEL_NAMES
from ..formulations import FORMULATIONS
from ..methods import DEFAULT_MAX_PRUNE_FRACTION, check_max_prune_fraction, get_method
from ..targets import MODES
from ..unstructured import SCHEDULES, SCOPES, is_unstructured

__all__ = ["PruneConfig", "RUN_ONLY_FIELDS", "AFTER_RUN_FIELDS", "OPT1_LR_FACTOR"]

# Fields that change how a run is shown or where it is written, not what it computes, and
# what is measured and exported after it (AFTER_RUN_FIELDS: on resume, taken from the current call where set).
AFTER_RUN_FIELDS = ("export", "latency", "latency_threads", "latency_repeats")
RUN_ONLY_FIELDS = ("out", "progress", "plots") + AFTER_RUN_FIELDS

# opt1's default constant learning rate, as a fraction of the dense stage's peak lr: the dense stage ends
# annealed to ~0, and a jump back to the peak cost ResNet-56 real accuracy for two epochs (catalyst-method.md
# section 9); see the README's "opt1 learning rate" for the measurement behind the factor.
OPT1_LR_FACTOR = 0.1


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class PruneConfig:
    model: str = "small_cnn"
    dataset: str = "digits"
    data_root: Optional[str] = None
    method: str = "catalyst"
    mode: str = "group"
    formulation: str = "regularizer"  # or "bypass" (section 4b: extended model, then opt2)
    out: str = "prune_out"
    dense_epochs: int = 15
    epochs: int = 30  # opt1 budget (gamma="auto" fits the decisions into it)
    finetune_epochs: int = 5
    opt2_epochs: int = 5  # bypass only: epochs driving d - dbar to 0 before the fold
    opt2_mu: float = 10.0  # bypass only: weight of mu_t * sum (d - dbar)^2
    opt2_ramp: int = 2  # bypass only: epochs of linear mu ramp
    opt2_lr: Optional[float] = None  # bypass only: constant opt2 learning rate (default: finetune_lr)
    opt2_tol: float = 1e-2  # bypass only: largest |d - dbar| accepted as "small" at the snap
    gamma: Union[float, str] = "auto"  # Catalyst: "auto" = from the opt1 step budget (pruner.resolve_gamma)
    gamma_warmup: int = 0
    c0: float = 1.0  # corrected ratio u = c sqrt(k) every channel starts at (1: the threshold of every group)
    target_speedup: Optional[float] = None
    kappa: float = 1.0  # decided when |log10 u| > kappa (then frozen)
    prune_pull: bool = True  # Catalyst: the prune side's pull grows until a decided group is emptied (control step 5)
    lr: float = 0.05
    opt1_lr: Optional[float] = None  # constant opt1 learning rate (default: OPT1_LR_FACTOR * lr)
    bn_recalibration_batches: int = 8  # BN statistics re-estimated on this many training batches before every accuracy
    catalyst_lr: Optional[float] = None
    finetune_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    bn_beta: bool = True
    image_size: Optional[int] = None
    verify_rtol: float = 1e-2
    latency_batch: int = 64  # latency is measured at batch 1 and this batch size
    latency: str = "eager,compile,onnxruntime"  # runtimes timed after the run (eager always)
    latency_threads: str = "1,2"  # thread counts timed
    latency_repeats: int = 15  # timed samples per model and setting
    export: str = ""  # formats the pruned model is exported to: "onnx", "pt2" or "onnx,pt2"
    round_to: int = 1  # round kept widths up to a multiple of this (1: no rounding)
    max_prune_fraction: float = DEFAULT_MAX_PRUNE_FRACTION  # width floor: a layer keeps >= ceil((1 - this) n) channels
    progress: bool = True
    plots: bool = True
    train_limit: Optional[int] = None  # use only the first N training / test samples (smoke tests)
    test_limit: Optional[int] = None
    dense_checkpoint: Optional[str] = None  # start from these dense weights (a state_dict file) instead of training
    norm_threshold: float = 1e-2  # baselines without a target speed-up: remove groups with n_i <= this
    noise_level: float = 0.01  # relative weight noise for the decision-robustness figure
    noise_draws: int = 5
    # unstructured methods (lats, magnitude; workflow/unstructured.py)
    sparsity: Optional[float] = None  # target fraction of zero weights over the sparsified tensors
    sparsity_scope: str = "global"  # "global": one threshold over all tensors; "layer": each tensor at --sparsity
    schedule: str = "lats"  # LATS threshold schedule: lats | slats | continuation
    beta: float = 10.0  # continuation: growth of the L1 coefficient over the run
    sparsify_first: bool = False  # also sparsify the first conv/linear layer
    sparsify_classifier: bool = False  # also sparsify the last one (the classifier)

    def validate(self, *, named_model: bool = True, named_data: bool = True) -> None:
        """Raises ValueError naming the flag of the first bad option. ``named_model`` / ``named_data``: the
        model / the datasets come from their names (False when :func:`run_pipeline` was given objects)."""
        if named_model and self.model not in MODEL_NAMES:
            raise ValueError(f"--model: unknown model {self.model!r}; choose one of: {', '.join(MODEL_NAMES)}")
        if named_data and self.dataset not in DATASETS:
            raise ValueError(f"--dataset: unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        if self.mode not in MODES:
            raise ValueError(f"--mode: unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if is_unstructured(self.method):
            self._validate_unstructured()
        else:
            get_method(self.method)  # raises for an unknown --method
            if self.sparsity is not None:
                raise ValueError(f"--sparsity is the target of the unstructured methods (--method lats|magnitude); --method "
                                 f"{self.method} prunes channels (--target-speedup)")
        if self.formulation not in FORMULATIONS:
            raise ValueError(f"--formulation: unknown formulation {self.formulation!r}; choose one of: {', '.join(FORMULATIONS)}")
        if self.formulation == "bypass" and self.method != "catalyst":
            raise ValueError(f"--formulation bypass is Catalyst's extended model; --method {self.method} runs the "
                             "regularizer formulation only")
        for name in ("dense_epochs", "epochs", "finetune_epochs", "gamma_warmup", "opt2_epochs", "opt2_ramp", "seed",
                     "bn_recalibration_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{_flag(name)} must be >= 0 (an integer), got {value!r}")
        for name in ("train_limit", "test_limit", "image_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{_flag(name)} must be >= 1 (an integer), got {value!r}")
        for name in ("batch_size", "latency_batch", "noise_draws", "round_to"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{_flag(name)} must be >= 1 (an integer), got {value!r}")
        if isinstance(self.latency_repeats, bool) or not isinstance(self.latency_repeats, int) or self.latency_repeats < 3:
            raise ValueError(f"--latency-repeats must be >= 3 (an integer), got {self.latency_repeats!r}")
        from ..export import parse_formats, require_export_extra
        from ..latency import parse_runtimes, parse_threads

        parse_runtimes(self.latency, "--latency")
        parse_threads(self.latency_threads, "--latency-threads")
        if "onnx" in parse_formats(self.export, "--export"):
            try:  # before the run, not after it
                require_export_extra("--export onnx")
            except ImportError as exc:
                raise ValueError(str(exc)) from None
        if self.gamma == "auto":
            # the unstructured methods have no sparsity coefficient: their threshold follows the target sparsity
            if self.method != "catalyst" and not is_unstructured(self.method):
                raise ValueError(f"--gamma auto comes from Catalyst's decision dynamics; --method {self.method} needs a "
                                 "number (e.g. --gamma 0.01)")
        elif isinstance(self.gamma, str):
            raise ValueError(f"--gamma must be a finite number >= 0 or 'auto', got {self.gamma!r}")
        else:
            self._finite("gamma", minimum=0.0)
        self._finite("c0", positive=True)
        check_max_prune_fraction(self.max_prune_fraction, "--max-prune-fraction")
        self._finite("kappa", positive=True)
        self._finite("lr", positive=True)
        self._finite("finetune_lr", positive=True)
        self._finite("weight_decay", minimum=0.0)
        self._finite("verify_rtol", positive=True)
        self._finite("norm_threshold", positive=True)
        self._finite("noise_level", minimum=0.0)
        self._finite("opt2_mu", positive=True)
        self._finite("opt2_tol", positive=True)
        for name in ("catalyst_lr", "opt2_lr", "opt1_lr"):
            if getattr(self, name) is not None:
                self._finite(name, positive=True)
        self._finite("momentum", minimum=0.0)
        if not self.momentum < 1:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.target_speedup is not None:
            self._finite("target_speedup", positive=True)
            if self.target_speedup < 1:
                raise ValueError(f"--target-speedup must be a finite number >= 1, got {self.target_speedup}")
        if self.dense_checkpoint is not None and not Path(self.dense_checkpoint).is_file():
            raise ValueError(f"--dense-checkpoint: no file at {self.dense_checkpoint}")
        if self.formulation == "bypass":
            # mu * (d - dbar)^2 has curvature 4 mu along d - dbar: momentum SGD diverges unless 4 lr mu < 2 (1 + m).
            lr2 = self.opt2_learning_rate
            bound = 2 * (1 + self.momentum) / (4 * lr2)
            if not self.opt2_mu < bound:
                raise ValueError(f"--opt2-mu {self.opt2_mu} is too large for the opt2 learning rate {lr2} (--opt2-lr, default "
                                 f"--finetune-lr) and --momentum {self.momentum}: the bypass penalty's SGD step is stable only "
                                 f"for 4 * lr * mu < 2 * (1 + momentum), i.e. mu < {bound:.4g}")
        if named_data and self.dataset == "digits" and self.data_root is not None:
            raise ValueError("--data-root is not used by --dataset digits (it ships with scikit-learn); drop it or pick "
                             "a dataset read from disk (cifar10, cifar100, imagefolder)")
        if named_data and self.dataset != "digits" and self.data_root is None:
            raise ValueError(f"--data-root is required for --dataset {self.dataset}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device!r}: CUDA is not available on this machine")

    def _validate_unstructured(self) -> None:
        if self.sparsity is None:
            raise ValueError(f"--method {self.method} needs --sparsity (the target fraction of zero weights, e.g. 0.9); "
                             "the channel baseline that was called lats is now --method lats_channel")
        value = self.sparsity
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and 0 <= value < 1):
            raise ValueError(f"--sparsity must be a number in [0, 1), got {value!r}")
        if self.sparsity_scope not in SCOPES:
            raise ValueError(f"--sparsity-scope: unknown scope {self.sparsity_scope!r}; choose one of: {', '.join(SCOPES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule: unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        self._finite("beta", positive=True)
        if self.target_speedup is not None:
            raise ValueError(f"--target-speedup is a channel-pruning target; --method {self.method} takes --sparsity "
                             "(unstructured zeros do not change the dense FLOPs)")
        if self.method == "lats" and isinstance(self.epochs, int) and self.epochs < 1:
            raise ValueError("--epochs must be >= 1 for --method lats: its threshold rises over the sparsify epochs")

    def _finite(self, name: str, *, positive: bool = False, minimum: Optional[float] = None) -> None:
        value = getattr(self, name)
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        ok = ok and (value > 0 if positive else True) and (minimum is None or value >= minimum)
        if not ok:
            what = "a positive finite number" if positive else f"a finite number >= {minimum:g}"
            raise ValueError(f"{_flag(name)} must be {what}, got {value!r}")

    @property
    def opt1_learning_rate(self) -> float:
        return OPT1_LR_FACTOR * self.lr if self.opt1_lr is None else self.opt1_lr

    @property
    def opt2_learning_rate(self) -> float:
        return self.finetune_lr if self.opt2_lr is None else self.opt2_lr

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def ignored_overrides(self, saved: "PruneConfig") -> list[str]:
        """The options of this configuration that were set (differ from the defaults) and differ from
        ``saved``, as ``--flag value (saved: value)``: what a resumed run ignores."""
        default = PruneConfig()
        out = []
        for f in fields(self):
            if f.name in RUN_ONLY_FIELDS:
                continue
            mine, theirs = getattr(self, f.name), getattr(saved, f.name)
            if mine != getattr(default, f.name) and mine != theirs:
                out.append(f"{_flag(f.name)} {mine!r} (saved: {theirs!r})")
        return out
