"""The one training loop of the workflow: an epoch of cross-entropy steps with the pruner's hooks, and the
epoch loop every training stage (dense, opt1, opt2, fine-tuning) and every calibration trial runs."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from .. import distributed

__all__ = ["Diverged", "train_epoch", "epoch_loop", "epoch_seed", "STAGE_SEED"]

# Seeds of each stage's data order; fixed (opt2 came later) so that adding a stage changes no other one.
STAGE_SEED = {"dense": 0, "calibrate": 1, "opt1": 2, "prune": 3, "finetune": 4, "done": 5, "opt2": 6,
              "sparsify": 7, "masks": 8}


class Diverged(RuntimeError):
    """Training diverged: the loss became NaN or infinite (raised at that step, before its update), or the
    weights did (checked at the end of every epoch, before the epoch's checkpoint)."""

    def __init__(self, stage: str, epoch: int, what: str):
        self.stage, self.epoch = stage, epoch
        super().__init__(f"training diverged at {stage} epoch {epoch}: {what}. The last checkpoint is from before it. "
                         "Lower the learning rate (--lr / --finetune-lr) or the sparsity strength (--gamma)")


def epoch_seed(seed: int, stage: str, epoch: int) -> int:
    """The seed of the data order of one epoch: it depends on (seed, stage, epoch) only."""
    return int(seed) * 1000 + STAGE_SEED[stage] * 100 + int(epoch)


def _progress(loader, enabled: bool, desc: str):
    if not enabled:
        return loader
    try:
        from tqdm.auto import tqdm

        # tqdm is handed an iterator, not the loader: wrapping a DataLoader itself draws from its seeded
        # generator, which changed the data order whenever progress bars were on.
        return tqdm(iter(loader), total=len(loader), desc=desc, leave=False, dynamic_ncols=True)
    except ImportError:  # pragma: no cover - tqdm comes with the [pruning] extra
        print(f"  {desc} ...", flush=True)
        return loader


def train_epoch(model: nn.Module, loader, optimizer, device, *, after_backward: Optional[Callable[[], None]] = None,
                after_step: Optional[Callable[[], None]] = None, progress: bool = False, desc: str = "",
                where: tuple = ("train", 0), loss_fn: Optional[Callable] = None) -> dict:
    """One epoch of training on ``loss_fn(model(x), y)`` (default: cross-entropy): ``backward``,
    ``after_backward()`` (the pruner's ``regularize``), ``optimizer.step()``, ``after_step()`` (the pruner's
    ``after_step``).

    Raises:
        Diverged: at the first non-finite loss (``where`` = (stage, epoch) names it).
    """
    model.train()
    crit = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    total_loss = 0.0
    n = 0
    for step, (x, y) in enumerate(_progress(loader, progress, desc)):
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = crit(model(x), y)
        value = distributed.global_mean(loss)  # under DDP: the global batch's loss, one verdict for all ranks
        if not math.isfinite(value):
            raise Diverged(where[0], where[1], f"the training loss is {value} at step {step}")
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        total_loss += value * y.numel()
        n += y.numel()
    return {"train_loss": total_loss / max(n, 1)}


def epoch_loop(stage: str, epochs: int, *, start: int, model: nn.Module, optimizer, train_set, batch_size: int, seed: int,
               device, scheduler=None, before_epoch: Optional[Callable[[int], None]] = None,
               after_backward: Optional[Callable[[], None]] = None, after_step: Optional[Callable[[], None]] = None,
               after_epoch: Optional[Callable[[int, dict], bool]] = None, progress: bool = False,
               loss_fn: Optional[Callable] = None) -> tuple[int, bool]:
    """Epochs ``start .. epochs - 1`` of ``stage``: ``before_epoch(e)``, one :func:`train_epoch` over the
    epoch's seeded data order, ``scheduler.step()``, then ``after_epoch(e + 1, record)``, which returns True
    to stop early. Returns ``(epochs done, stopped early)``."""
    e = start
    while e < epochs:
        if before_epoch is not None:
            before_epoch(e)
        # under torch.distributed: this rank's share of the seeded order, through a DDP wrapper (distributed.py)
        loader = distributed.epoch_loader(train_set, batch_size, epoch_seed(seed, stage, e))
        distributed.seed_epoch(epoch_seed(seed, stage, e))
        rec = train_epoch(distributed.training_model(model), loader, optimizer, device, after_backward=after_backward,
                          after_step=after_step, progress=progress and distributed.is_main(),
                          desc=f"{stage} {e + 1}/{epochs}", where=(stage, e + 1), loss_fn=loss_fn)
        distributed.sync_buffers(model)
        bad = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            raise Diverged(stage, e + 1, f"parameter {bad} holds NaN or infinite values")
        if scheduler is not None:
            scheduler.step()
        e += 1
        if after_epoch is not None and after_epoch(e, rec):
            return e, True
    return e, False
