"""The runner: owns the run's state, checkpoints, interruption, timing and the output directory, and runs
the stages (:mod:`.stages`) in order, resuming at the stage and epoch a checkpoint recorded.

Files in the output directory: ``checkpoint.pt`` (after every epoch and every stage) and ``dense_model.pt``
(a ``state_dict``), both loadable with ``torch.load(..., weights_only=True)``; ``pruned_model.safetensors``
and ``pruned_model.json`` (weights and pruning spec, :mod:`..serialization`), with ``--export`` also
``pruned_model.onnx`` / ``pruned_model.pt2``; ``report.json``; all written through a temporary file and a rename, and ``.lock``, which keeps a second run out of the same
directory while one is running (an OS lock: it goes away with the process that held it).
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Subset

from ...data import load_dataset, make_loader
from ...models import build_model
from .. import distributed
from ..bn import recalibrate_bn
from ..metrics import count_flops, count_params, evaluate
from ..pruner import Pruner
from ..unstructured import is_unstructured
from .config import PruneConfig
from .report import Stages
from .training import Diverged

__all__ = ["RunState", "RunInputs", "Run", "Interrupt", "CHECKPOINT_FORMAT", "save_atomic", "load_checkpoint", "OutputLock",
           "OutputBusyError"]

CHECKPOINT_FORMAT = "catalyst_fused.checkpoint/2"
STAGE_ORDER = ("dense", "calibrate", "opt1", "prune", "opt2", "sparsify", "masks", "finetune", "done")


class Interrupt(Exception):
    """Raised by :meth:`Run.end_of_epoch` when ``stop_after_epochs`` is reached (a simulated interruption)."""

    def __init__(self, stage: str, epoch: int):
        self.stage, self.epoch = stage, epoch
        super().__init__(f"interrupted after {stage} epoch {epoch}")


@dataclass
class RunState:
    """What a checkpoint holds: where the run is and everything needed to continue it exactly."""

    stage: str = "dense"
    epoch: int = 0  # epochs of ``stage`` done
    config: dict = field(default_factory=dict)
    c0: float = 1.0
    history: list = field(default_factory=list)  # one record per training epoch, all stages
    stages: dict = field(default_factory=dict)  # Stages.to_dict() of the sections so far
    elapsed: dict = field(default_factory=dict)  # seconds per stage
    model: Optional[dict] = None  # the model's state_dict
    pruner: Optional[dict] = None  # Pruner.state_dict() once opt1 has started
    optimizer: Optional[dict] = None  # the current stage's optimizer (None between stages)
    scheduler: Optional[dict] = None
    rng: Optional[dict] = None
    initial_norms: Optional[torch.Tensor] = None  # group norms when opt1 started (magnitude-bias figure)

    def to_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, d: dict) -> "RunState":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename: a crash never leaves a torn file. Under
    torch.distributed only rank 0 writes (every rank holds the same state)."""
    if not distributed.is_main():
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> RunState:
    """Reads a checkpoint (``weights_only=True``: nothing in the file is executed).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming the file, if it is truncated, corrupted or not a checkpoint of this workflow.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError / pickle errors / EOFError for damaged files
        raise ValueError(f"--resume: {path} cannot be read as a checkpoint (truncated or corrupted?): "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"--resume: {path} is not a checkpoint of this workflow (format {found!r}, expected "
                         f"{CHECKPOINT_FORMAT!r})")
    try:
        state = RunState.from_dict(data)
    except TypeError as exc:
        raise ValueError(f"--resume: {path} is a damaged checkpoint: {exc}") from exc
    if state.stage not in STAGE_ORDER:
        raise ValueError(f"--resume: {path} records an unknown stage {state.stage!r}")
    return state


class OutputBusyError(RuntimeError):
    """Another run holds the output directory."""


class OutputLock:
    """An exclusive OS lock on ``<out>/.lock`` for the lifetime of a run.

    Raises:
        OutputBusyError: naming the directory when another process holds it.
    """

    def __init__(self, out: Path):
        self.path = Path(out) / ".lock"
        self._fd: Optional[int] = None

    def __enter__(self) -> "OutputLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputBusyError(f"--out {self.path.parent}: another run is using this directory ({holder}); "
                               "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def rng_state() -> dict:
    """Every RNG state, as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def input_format(cfg: PruneConfig) -> tuple[int, int]:
    """(channels, image size) a named model is fed."""
    if cfg.model == "small_cnn" and cfg.dataset == "digits":
        return 1, cfg.image_size or 8
    return 3, cfg.image_size or 32


@dataclass
class RunInputs:
    """What a run trains and on what: built from the configuration's names (:meth:`from_names`, what the
    CLI does) or from the caller's objects (:meth:`from_objects`)."""

    new_model: Callable[[], torch.nn.Module]  # the dense model (the first call may return the caller's object)
    train_set: object
    test_set: object
    input_shape: tuple  # one sample's shape (FLOPs, latency, the trace)
    info: dict  # dataset description for the report
    loss_fn: Optional[Callable] = None  # None: cross-entropy
    builder: Optional[dict] = None  # build_model's arguments when the model is built by name (saved with the model)

    @classmethod
    def from_names(cls, cfg: PruneConfig) -> "RunInputs":
        channels, size = input_format(cfg)
        train_set, test_set, info = load_dataset(cfg.dataset, cfg.data_root, image_size=size, channels=channels)
        return cls(lambda: build_model(cfg.model, num_classes=info.num_classes, in_channels=channels, image_size=size),
                   train_set, test_set, (channels, size, size), asdict(info),
                   builder={"name": cfg.model, "num_classes": info.num_classes, "in_channels": channels, "image_size": size})

    @classmethod
    def from_objects(cls, cfg: PruneConfig, model=None, train_data=None, test_data=None, example_inputs=None,
                     loss_fn=None) -> "RunInputs":
        """The caller's model (pruned in place) and/or datasets (a ``Dataset`` of ``(x, y)``, or a
        ``DataLoader``, whose dataset is used: batch size and order come from the configuration, so that runs
        can be resumed exactly); what is not given comes from the names."""
        named = cls.from_names(cfg) if model is None or train_data is None or test_data is None else None
        train_set = named.train_set if train_data is None else getattr(train_data, "dataset", train_data)
        test_set = named.test_set if test_data is None else getattr(test_data, "dataset", test_data)
        info = dict(named.info) if named is not None else {"name": "custom", "num_classes": None}
        if train_data is not None:
            info.update(name="custom", train_size=len(train_set), test_size=len(test_set))
        if example_inputs is not None:
            if not isinstance(example_inputs, torch.Tensor):
                raise ValueError("run_pipeline: example_inputs must be one batch tensor (its sample shape is used)")
            shape = tuple(example_inputs.shape[1:])
        elif train_data is not None:
            shape = tuple(train_set[0][0].shape)
        else:
            shape = named.input_shape
        if model is None:
            new_model = named.new_model
        else:
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"run_pipeline: model must be an nn.Module, got {type(model).__name__}")
            template = copy.deepcopy(model)
            handed = [model]
            # the first model is the caller's own (pruned in place); later ones are fresh dense copies
            new_model = lambda: handed.pop() if handed else copy.deepcopy(template)  # noqa: E731
        return cls(new_model, train_set, test_set, shape, info, loss_fn, builder=named.builder if model is None else None)


class Run:
    """One pruning run: configuration, data, model, pruner, state and output files (see the module
    docstring). Stages read and change it; only the runner writes files."""

    def __init__(self, cfg: PruneConfig, state: Optional[RunState], inputs: RunInputs, *, log: Callable[[str], None],
                 stop_after_epochs: Optional[int]):
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg.out)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.device = distributed.local_device(cfg.device)  # cuda -> cuda:LOCAL_RANK under torchrun
        self._stop_after = stop_after_epochs
        self._epochs_this_call = 0
        self._timing: Optional[list] = None  # [stage, perf_counter of the last banking] while a stage is timed
        self.inputs = inputs
        self.input_shape = tuple(inputs.input_shape)
        self.loss_fn = inputs.loss_fn
        train_set, test_set = inputs.train_set, inputs.test_set
        if cfg.train_limit is not None:
            train_set = Subset(train_set, range(min(cfg.train_limit, len(train_set))))
        if cfg.test_limit is not None:
            test_set = Subset(test_set, range(min(cfg.test_limit, len(test_set))))
        if len(train_set) < 1 or len(test_set) < 1:
            raise ValueError(f"--dataset {cfg.dataset}: the split has {len(train_set)} training and {len(test_set)} test "
                             "samples; both need at least one (more images, or a train/ and val/ folder)")
        self.info = dict(inputs.info, train_size=len(train_set), test_size=len(test_set))
        self.train_set, self.test_set = train_set, test_set
        self.test_loader = make_loader(test_set, 256, shuffle=False)

        fresh = state is None
        if fresh:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            state = RunState(config=cfg.to_dict(), c0=cfg.c0)
        self.state = state
        self.stages = Stages.from_dict(state.stages)
        self.model = self.new_model()
        # The groups this run regularises (config errors surface now); the pruner reuses them.
        if is_unstructured(cfg.method):  # the tensors it sparsifies (workflow/unstructured.py)
            from .unstructured import plan

            self.targets, self.excluded = plan(self.model, cfg, self.input_shape)
        else:
            self.targets, self.excluded = Pruner.plan(
                self.model, self.input_shape, method=cfg.method, mode=cfg.mode, formulation=cfg.formulation,
                bn_beta=cfg.bn_beta)
        self.dense_cost = {"flops": count_flops(self.model, self.input_shape), "params": count_params(self.model)}
        self.pruner: Optional[Pruner] = None
        if not fresh:
            if state.pruner is not None:
                self.pruner = self.new_pruner(state.c0)
                self.pruner.load_state_dict(state.pruner)
            self.model.load_state_dict(state.model)
            set_rng_state(state.rng)

    # ------------------------------------------------------------------------------------------ factories
    def new_model(self) -> torch.nn.Module:
        """The dense model (first call: the one the run prunes; later calls: fresh dense copies)."""
        return self.inputs.new_model().to(self.device)

    def new_pruner(self, c0: float) -> Pruner:
        """The run's pruner on the run's model (reusing the targets found at the start)."""
        if is_unstructured(self.cfg.method):
            from . import unstructured

            return unstructured.make_pruner(self)
        from .calibration import make_pruner, opt1_steps

        return make_pruner(self.model, self.cfg, c0, self.input_shape, self.targets,
                           budget_steps=opt1_steps(self.cfg, len(self.train_set)))

    def recalibrate(self, model: Optional[torch.nn.Module] = None) -> int:
        """Re-estimates the BatchNorm statistics of ``model`` (default: the run's) on ``bn_recalibration_batches``
        training batches, always the same ones (their own seeded order: no global random state is drawn)."""
        if not self.cfg.bn_recalibration_batches:
            return 0
        loader = make_loader(self.train_set, self.cfg.batch_size, shuffle=True, seed=self.cfg.seed * 1000 + 999)
        return recalibrate_bn(self.model if model is None else model, loader, self.cfg.bn_recalibration_batches, self.device)

    def evaluate(self, model: Optional[torch.nn.Module] = None, *, recalibrate: bool = True) -> dict:
        """Test accuracy and loss, BatchNorm statistics re-estimated first (see :meth:`recalibrate`)."""
        model = self.model if model is None else model
        if recalibrate:
            self.recalibrate(model)
        return evaluate(model, self.test_loader, self.device, self.loss_fn)

    def sgd(self, params, lr: float) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)

    # ------------------------------------------------------------------------------------------ state
    def save_state(self) -> None:
        self.state.stages = self.stages.to_dict()
        save_atomic(self.state.to_dict(), self.ckpt_path)

    def checkpoint(self, stage: str, epoch: int, *, optimizer=None, scheduler=None) -> None:
        """Records the run at (``stage``, ``epoch``) and writes ``checkpoint.pt``."""
        s = self.state
        s.stage, s.epoch = stage, epoch
        s.model = self.model.state_dict()
        s.pruner = None if self.pruner is None else self.pruner.state_dict()
        s.optimizer = None if optimizer is None else optimizer.state_dict()
        s.scheduler = None if scheduler is None else scheduler.state_dict()
        s.rng = rng_state()
        self._bank_time()
        self.save_state()

    def advance(self, stage: str) -> None:
        """The current stage is complete: checkpoint at the start of ``stage``."""
        self.checkpoint(stage, 0)

    def end_of_epoch(self, stage: str, epoch: int, record: dict, *, optimizer=None, scheduler=None) -> None:
        """Appends the epoch's record, checkpoints, and raises :class:`Interrupt` when the call's epoch
        budget (``stop_after_epochs``) is spent."""
        self.state.history.append(record)
        self.checkpoint(stage, epoch, optimizer=optimizer, scheduler=scheduler)
        self._epochs_this_call += 1
        if self._stop_after is not None and self._epochs_this_call >= self._stop_after:
            raise Interrupt(stage, epoch)

    @contextlib.contextmanager
    def timed(self, stage: str):
        self._timing = [stage, time.perf_counter()]
        try:
            yield
        finally:
            self._bank_time()
            self._timing = None

    def _bank_time(self) -> None:
        """Adds the time the timed stage has run since it was last banked to ``state.elapsed``. Every
        checkpoint banks, so that a resumed run's runtime includes the epochs made before the interruption
        (only the time since the last checkpoint is lost with a crash)."""
        if self._timing is None:
            return
        stage, since = self._timing
        now = time.perf_counter()
        self.state.elapsed[stage] = self.state.elapsed.get(stage, 0.0) + now - since
        self._timing[1] = now

    def test_batch(self, n: int = 256) -> torch.Tensor:
        """Up to ``n`` test inputs (the verification batch)."""
        return torch.cat([b[0] for b, _ in zip(self.test_loader, range(1))])[:n].to(self.device)

    def load_state_into(self, optimizer, scheduler=None) -> None:
        """Restores the optimizer (and scheduler) state a mid-stage checkpoint recorded."""
        if self.state.optimizer is not None:
            optimizer.load_state_dict(self.state.optimizer)
        if scheduler is not None and self.state.scheduler is not None:
            scheduler.load_state_dict(self.state.scheduler)


__all__ += ["rng_state", "set_rng_state", "input_format", "Diverged"]
