"""Pruning under ``torch.distributed``: data-parallel training (DDP) for the pruner and the workflow.

Everything here is a no-op in a single process (no process group, or a group of one): the workflow then
runs exactly as before. Under ``torchrun --nproc_per_node N`` (or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``):

* **Process group**: :func:`init_from_env` starts it with the backend that follows the device: ``gloo`` on
  CPU, ``nccl`` on CUDA (each process on ``cuda:LOCAL_RANK``).
* **Data**: :func:`epoch_loader` draws the single-process order of an epoch (the workflow's generator
  seeded by (seed, stage, epoch)) and gives each rank its share of every *global* batch: ``--batch-size``
  stays the global batch, so N processes average the gradient of the same samples one process would see.
  A seed that must agree (data order, model initialisation, decision-robustness noise) is the run's seed on
  every rank; randomness of the forward pass (dropout) gets one seed per rank and epoch
  (:func:`seed_epoch`), so that resuming needs no per-rank RNG state.
* **Gradients**: the model is trained through a ``DistributedDataParallel`` wrapper (:func:`training_model`)
  whose all-reduce has finished when ``backward()`` returns; the pruner's fused in-place penalty runs after
  it on every rank on identical weights and catalysts, so catalysts that only the penalty touches (the
  regularizer formulation) stay identical on every rank **without any communication**. In the bypass
  formulation ``d`` and ``dbar`` are parameters of the model's forward pass and DDP averages their
  gradients like any other parameter.
* **Removal**: :meth:`Pruner.prune` checks that every rank removes the same channels
  (:func:`check_agreement`) before it changes anything, then every rank applies the same surgery; the
  narrower model has new parameter objects, so :func:`training_model` builds a new DDP wrapper on it (the
  pruner already moved the attached optimizers to the new parameters).
* **Files and output**: checkpoints and outputs are written by rank 0 only (:func:`is_main`) and read by
  every rank on resume (``--out`` must be on a file system every node sees); logs and progress bars come
  from rank 0; the report records the world size and backend (:func:`environment`).

BatchNorm statistics are computed per rank (``torch.nn.SyncBatchNorm`` runs on GPUs only; convert the model
before building the pruner if you want it there), so N processes do not train exactly like one process
with the same global batch: see the README for how closely decisions agree.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

__all__ = [
    "is_distributed", "rank", "world_size", "is_main", "backend_for", "init_from_env", "shutdown", "environment",
    "local_device", "check_agreement", "global_batches", "epoch_loader", "training_model", "sync_buffers",
    "global_mean", "seed_epoch", "output_lock", "main_only", "barrier",
]


def is_distributed() -> bool:
    """True when a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files, logs and shows progress."""
    return rank() == 0


def backend_for(device) -> str:
    """The collective backend for a device: nccl for CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


_STARTED_HERE = False


def init_from_env(device: str = "cpu") -> bool:
    """Starts the process group from a launcher's environment (``WORLD_SIZE`` > 1) if none runs yet, with
    :func:`backend_for` ``device``; on CUDA also selects ``cuda:LOCAL_RANK``. Returns whether a group of
    more than one process runs afterwards.

    Raises:
        ValueError: ``WORLD_SIZE`` > 1 without ``RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``, or a CUDA device
            with fewer GPUs than local ranks.
    """
    global _STARTED_HERE
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: launch with torchrun")
    backend = backend_for(device)
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: local rank {local} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    _STARTED_HERE = True
    return is_distributed()


def shutdown() -> None:
    """Ends the process group if :func:`init_from_env` started it."""
    global _STARTED_HERE
    if _STARTED_HERE and dist.is_initialized():
        dist.destroy_process_group()
    _STARTED_HERE = False


def environment() -> dict:
    """What the report records about the processes: world size and backend (None in a single process)."""
    return {"world_size": world_size(), "backend": dist.get_backend() if is_distributed() else None}


def local_device(device) -> torch.device:
    """``device`` for this process: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under a process group."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _fingerprint(obj) -> str:
    h = hashlib.sha256()
    for key in sorted(obj):
        value = obj[key]
        h.update(str(key).encode())
        h.update(torch.as_tensor(value).to(torch.int64).cpu().numpy().tobytes())
        h.update(b";")
    return h.hexdigest()


def check_agreement(keep: dict, what: str = "the channels to keep") -> None:
    """Raises on every rank when the ranks disagree on ``keep`` (target name -> kept indices): one
    ``all_gather_object`` of a digest. A no-op in a single process.

    Raises:
        RuntimeError: naming the ranks that differ from rank 0.
    """
    if not is_distributed():
        return
    digests = [None] * world_size()
    dist.all_gather_object(digests, _fingerprint(keep))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RuntimeError(f"distributed pruning: ranks {differ} disagree with rank 0 on {what}; nothing was removed "
                           "(the ranks' weights or catalysts are no longer identical)")


# ------------------------------------------------------------------------------------------ data
class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def global_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """The sample indices of every batch of one epoch in the single-process order (the workflow's
    ``make_loader(..., shuffle=True, seed=seed)``, drawn through the same loader so that it is the same
    order by construction)."""
    from ..data import make_loader

    return [b.tolist() for b in make_loader(_Indices(n), batch_size, shuffle=True, seed=seed)]


def epoch_loader(dataset, batch_size: int, seed: int):
    """One epoch's training loader: the single-process loader in a single process; under a process group,
    this rank's share of every global batch of ``batch_size`` (shares differ by at most one sample).

    Raises:
        ValueError: a global batch smaller than the number of processes (a rank would get no samples).
    """
    from ..data import make_loader

    if not is_distributed():
        return make_loader(dataset, batch_size, shuffle=True, seed=seed)
    size, r = world_size(), rank()
    if batch_size < size:
        raise ValueError(f"--batch-size {batch_size} is the global batch and must be >= the number of processes ({size})")
    shares = []
    for batch in global_batches(len(dataset), batch_size, seed):
        share = torch.tensor_split(torch.tensor(batch), size)[r].tolist()
        if share:  # the last global batch can be smaller than the world: ranks without samples skip it together
            shares.append(share)
    per_rank = [None] * size
    dist.all_gather_object(per_rank, len(shares))
    if len(set(per_rank)) != 1:
        shares = shares[: min(per_rank)]  # every rank must take part in every gradient all-reduce
    return DataLoader(dataset, batch_sampler=shares, num_workers=0)


def seed_epoch(data_seed: int) -> None:
    """Under a process group: seeds this rank's forward-pass randomness (dropout) for one epoch from the
    epoch's data seed and the rank (per rank on purpose; derived, so a resumed run needs no saved state)."""
    if is_distributed():
        torch.manual_seed(int(data_seed) * 1009 + 7919 * rank() + 1)


# ------------------------------------------------------------------------------------------ model
_WRAPPED: dict = {}


def training_model(model: torch.nn.Module, **ddp_kwargs) -> torch.nn.Module:
    """The module to train: ``model`` itself in a single process, else a ``DistributedDataParallel``
    wrapper of it, cached while the model's parameters are the same objects and rebuilt when they changed
    (after :meth:`Pruner.prune` or folding the bypass: new, narrower parameters)."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    key = tuple(id(p) for p in model.parameters())
    cached = _WRAPPED.get(id(model))
    if cached is not None and cached[0] == key and cached[1].module is model:
        return cached[1]
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    wrapper = DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)
    _WRAPPED.clear()  # one training model at a time: older wrappers hold hooks on replaced parameters
    _WRAPPED[id(model)] = (key, wrapper)
    return wrapper


def sync_buffers(model: torch.nn.Module) -> None:
    """Broadcasts rank 0's buffers (BatchNorm running statistics, which every rank updates from its own
    share of the batch) so that evaluation and checkpoints see one model."""
    if not is_distributed():
        return
    for b in model.buffers():
        dist.broadcast(b.data, src=0)


def global_mean(value: torch.Tensor) -> float:
    """The mean of a scalar over the ranks (the loss of the global batch, and one verdict on divergence for
    all ranks); the value itself in a single process."""
    if not is_distributed():
        return float(value.detach())
    t = value.detach().reshape(1).clone().float()
    dist.all_reduce(t)
    return float(t) / world_size()


# ------------------------------------------------------------------------------------------ files and logs
@contextlib.contextmanager
def output_lock(out):
    """The run's lock on the output directory: held by rank 0 only; when rank 0 cannot take it, every rank
    raises (so that no rank waits for a peer that gave up).

    Raises:
        OutputBusyError: another run holds ``out``.
    """
    from .workflow.runner import OutputBusyError, OutputLock

    if not is_distributed():
        with OutputLock(out) as lock:
            yield lock
        return
    lock, error = None, None
    if is_main():
        try:
            lock = OutputLock(out).__enter__()
        except OutputBusyError as exc:
            error = exc
    verdict = [str(error) if error is not None else None]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise OutputBusyError(verdict[0])
    try:
        yield lock
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def main_only(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` on rank 0, silence elsewhere."""
    if is_main():
        return log
    return lambda _msg: None


# ------------------------------------------------------------------------------------------ FSDP2
def shard(model: torch.nn.Module, pruner, modules=(), **fsdp_kwargs) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each of ``modules`` (e.g. the transformer blocks) and then ``model``, and
    points ``pruner`` at the DTensor parameters that replaced the model's own. Build the pruner on the
    unsharded model first (its trace needs plain tensors) and the optimizer after this call. The pruner's
    penalty then runs on the local shards with one all-reduce per step (:mod:`catalyst_fused.sharded`).

    Raises:
        ValueError: for the bypass formulation (its catalysts are model parameters; FSDP2 would shard them).
    """
    from torch.distributed.fsdp import fully_shard

    if pruner.formulation.is_attached(pruner.model):
        raise ValueError("distributed.shard: the bypass formulation's catalysts are model parameters; under FSDP2 "
                         "use the regularizer formulation (or DDP)")
    for m in modules:
        fully_shard(m, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    pruner._build_target_set()  # the target set held the replaced parameters
    return model


def gathered_state(model: torch.nn.Module) -> dict:
    """The model's full (unsharded) state dict on every rank: each DTensor gathered with ``full_tensor()``
    (collectives: call it on every rank). Step 1 of physical removal under FSDP2: gather, prune, re-shard."""
    from ..sharded import is_dtensor

    return {k: (v.full_tensor() if is_dtensor(v) else v).detach().clone() for k, v in model.state_dict().items()}
