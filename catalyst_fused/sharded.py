"""The penalty on sharded weights: DTensors sharded along dim 0 (what FSDP2's ``fully_shard`` makes of every
parameter), behind :func:`catalyst_fused.penalty` / :func:`catalyst_fused.penalty_`.

A group's norm needs the squares of all its slices. Rows of a weight sharded along dim 0 live on the process
that holds them (a row group whose rows are split across processes, or a group with input columns, has a
part on every process), so each process computes the sums of squares of the slices it holds for **every**
group (``penalty_partial_sums``: zeros for groups it holds nothing of), one ``all_reduce`` of that one flat
vector (``groups x 4`` bytes in fp32) gives the full sums on every process, and ``penalty_finish_`` turns
them into ``n = sqrt(sum)``, the penalty (computed once, identically on every process: it is not summed
over processes), the catalyst gradients (identical on every process, like the catalysts, which are plain
replicated tensors) and the weight gradients of the local slices (``|d| / n * W``). One collective per call,
none per tensor.

The group layout is given for the full (global) shapes; :func:`local_layout` maps it onto the slices this
process holds (a member cut by a shard boundary in the middle of a ``width``-group becomes up to three
members). Supported placements: ``Shard(0)`` on a one-dimensional device mesh (FSDP2's). Kernels: the C++
operators for CPU tensors; elsewhere (CUDA) the plain-PyTorch reference of the same two modes (correct,
not fused; not run here: no GPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import reference

__all__ = ["is_dtensor", "is_sharded", "local_layout", "LocalLayout", "penalty", "penalty_"]


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


# Plain tensors and parameters are not DTensors: is_sharded skips the import and isinstance for them (it
# runs on every penalty call, over every weight).
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def is_sharded(weights: Sequence[torch.Tensor]) -> bool:
    """Whether any weight is a DTensor (then all must be)."""
    return any(is_dtensor(w) for w in weights if type(w) not in _PLAIN_TYPES)


@dataclass(frozen=True)
class LocalLayout:
    """The member table of one process's slices (``members`` as in :class:`~catalyst_fused.GroupLayout`,
    groups still numbered globally; groups may be uncovered)."""

    members: tuple
    member_table: torch.Tensor
    rows: tuple  # (start, stop) of the global rows this process holds, per weight


def _row_range(w, index: int) -> tuple[int, int]:
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = w.device_mesh, w.placements
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], (Shard, Replicate)):
        raise ValueError(f"catalyst_fused: weights[{index}] is a DTensor with placements {placements} on a "
                         f"{mesh.ndim}-D mesh; the sharded penalty supports Shard(0) (FSDP2) on a 1-D mesh")
    if isinstance(placements[0], Replicate):
        raise ValueError(f"catalyst_fused: weights[{index}] is a replicated DTensor; the sharded penalty supports "
                         "Shard(0) (FSDP2); pass replicated weights as plain tensors in a separate call")
    if placements[0].dim != 0:
        raise ValueError(f"catalyst_fused: weights[{index}] is sharded along dim {placements[0].dim}; the sharded "
                         "penalty supports Shard(0) (FSDP2)")
    n, size, coord = w.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-n // size)  # torch.chunk's split, which Shard(0) and FSDP2 use
    start = min(coord * chunk, n)
    stop = min(start + chunk, n)
    local = w.to_local()
    if local.shape[0] != stop - start or tuple(local.shape[1:]) != tuple(w.shape[1:]):
        raise ValueError(f"catalyst_fused: weights[{index}] holds a local shard of shape {tuple(local.shape)}, not rows "
                         f"[{start}, {stop}) of {tuple(w.shape)} (uneven sharding is not supported)")
    return start, stop


def local_layout(layout, weights: Sequence[torch.Tensor]) -> LocalLayout:
    """The members of ``layout`` (``None``: the per-row layout) restricted to the rows each DTensor of
    ``weights`` holds on this process, in local row numbers."""
    rows = tuple(_row_range(w, i) for i, w in enumerate(weights))
    members = layout.members if layout is not None else [(i, 0, 0, w.shape[0], i, 0, 1) for i, w in enumerate(weights)]
    out = []
    for t, dim, start, count, seg, off, width in members:
        if dim != 0:  # input columns: every process holds a part (its rows) of each of them
            out.append((t, dim, start, count, seg, off, width))
            continue
        r0, r1 = rows[t]
        k, end = max(start, r0) - start, min(start + count, r1) - start  # member slices [k, end) are local
        while k < end:
            # the rest of a cut width-group first (a member of its own), then whole groups, then a cut tail
            if k % width:
                n = min(end, (k // width + 1) * width) - k
                piece_width = n
            elif end - k >= width:
                n = (end - k) // width * width
                piece_width = width
            else:
                n = piece_width = end - k
            out.append((t, 0, start + k - r0, n, seg, off + k // width, piece_width))
            k += n
    if not out:  # this process holds no slice of any group: an empty member keeps the table well-formed
        out.append((0, 0, 0, 0, 0, 0, 1))
    table = torch.tensor(out, dtype=torch.int64).reshape(-1, 7)
    return LocalLayout(tuple(out), table, rows)


def _catalysts(catalysts):
    from torch.distributed.tensor import Replicate

    out = []
    for j, d in enumerate(catalysts):
        if is_dtensor(d):
            if not all(isinstance(p, Replicate) for p in d.placements):
                raise ValueError(f"catalyst_fused: catalysts[{j}] is a sharded DTensor; catalysts must be replicated "
                                 "(plain tensors, or Replicate DTensors)")
            d = d.to_local()
        out.append(d)
    return out


def _check_weights(weights) -> None:
    plain = [i for i, w in enumerate(weights) if not is_dtensor(w)]
    if plain:
        raise ValueError(f"catalyst_fused: weights{plain} are plain tensors but others are DTensors; shard all the "
                         "weights of one call the same way (FSDP2), or make separate calls")
    if len({(str(w.device_mesh.mesh.tolist()), w.device_mesh.device_type) for w in weights}) != 1:
        raise ValueError("catalyst_fused: the DTensor weights of one call must live on one device mesh")


def _impl(backend: str, device: torch.device) -> str:
    from .functional import resolve_backend

    impl = resolve_backend(backend, device)
    return "cpp" if impl == "cpp" and device.type == "cpu" else "reference"


def _partial_sums(impl, local, catalysts, lay):
    if impl == "cpp":
        return torch.ops.catalyst_fused.penalty_partial_sums(local, catalysts, lay.member_table)
    return reference.partial_sums(local, catalysts, lay)


def _finish(impl, local, catalysts, wgrads, widx, dgrads, didx, scale, lay, sums):
    if impl == "cpp":
        return torch.ops.catalyst_fused.penalty_finish_(local, catalysts, wgrads, widx, dgrads, didx, float(scale),
                                                        lay.member_table, sums)
    full_w = [None] * len(local)
    full_d = [None] * len(catalysts)
    for i, g in zip(widx, wgrads):
        full_w[i] = g
    for j, g in zip(didx, dgrads):
        full_d[j] = g
    return reference.finish_(local, catalysts, full_w, full_d, scale, lay, sums)


def _all_reduce(sums: torch.Tensor, mesh) -> torch.Tensor:
    """The call's one collective: the flat vector of every group's sum of squares, summed over the mesh."""
    import torch.distributed as dist

    dist.all_reduce(sums, group=mesh.get_group())
    return sums


class _ShardedPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, lay, mesh, n_weights, *tensors):
        local, cats = list(tensors[:n_weights]), list(tensors[n_weights:])
        sums = _all_reduce(_partial_sums(impl, local, cats, lay), mesh)
        # no gradient buffers: the value, norms and ratios only (backward finishes again from the same sums)
        value, norms, ratios = _finish(impl, local, cats, [], [], [], [], 1.0, lay, sums)
        ctx.impl, ctx.lay, ctx.n_weights = impl, lay, n_weights
        ctx.save_for_backward(sums, *tensors)
        ctx.mark_non_differentiable(norms, ratios)
        return value, norms, ratios

    @staticmethod
    def backward(ctx, grad_value, _grad_norms, _grad_ratios):
        sums, *tensors = ctx.saved_tensors
        n = ctx.n_weights
        local, cats = tensors[:n], tensors[n:]
        wgrads = [torch.zeros_like(w) for w in local]
        dgrads = [torch.zeros_like(d) for d in cats]
        _finish(ctx.impl, local, cats, wgrads, list(range(len(local))), dgrads, list(range(len(cats))),
                float(grad_value), ctx.lay, sums)
        return (None, None, None, None, *wgrads, *dgrads)


def _setup(weights, catalysts, layout, backend):
    _check_weights(weights)
    mesh = weights[0].device_mesh
    lay = local_layout(layout, weights)
    cats = _catalysts(catalysts)
    impl = _impl(backend, weights[0].to_local().device)
    return mesh, lay, cats, impl


def penalty(weights, catalysts, *, layout=None, backend: str = "auto"):
    """``(R, norms, ratios)`` for DTensor weights, differentiable with respect to the weights (their local
    shards, as DTensor gradients) and the catalysts; one all-reduce."""
    mesh, lay, cats, impl = _setup(weights, catalysts, layout, backend)
    local = [w.to_local() for w in weights]
    local = [t if t.is_contiguous() else t.contiguous() for t in local]
    return _ShardedPenalty.apply(impl, lay, mesh, len(local), *local, *cats)


def penalty_(weights, catalysts, *, scale: float, layout=None, backend: str = "auto"):
    """The in-place call for DTensor weights: adds ``scale * dR/dW`` into every weight's (DTensor) ``.grad``
    shard and ``scale * dR/dd`` into every catalyst's ``.grad``; returns ``(R, norms, ratios)``. One
    all-reduce of ``groups`` values. Tensors that do not require grad are read but get no gradient."""
    from ._validation import check_leaf

    mesh, lay, cats, impl = _setup(weights, catalysts, layout, backend)
    widx = check_leaf(weights, "weights")
    didx = check_leaf(catalysts, "catalysts")
    with torch.no_grad():
        for i in widx:
            if weights[i].grad is None:
                weights[i].grad = torch.zeros_like(weights[i])
        for j in didx:
            if catalysts[j].grad is None:
                catalysts[j].grad = torch.zeros_like(catalysts[j])
        local = [w.to_local() for w in weights]
        wgrads = [weights[i].grad.to_local() for i in widx]
        dgrads = [catalysts[j].grad.to_local() if is_dtensor(catalysts[j].grad) else catalysts[j].grad for j in didx]
        for name, ts in (("weights", local), ("weight gradients", wgrads)):
            if any(not t.is_contiguous() for t in ts):
                raise ValueError(f"catalyst_fused: the local shards of the {name} must be contiguous")
        sums = _all_reduce(_partial_sums(impl, local, cats, lay), mesh)
        return _finish(impl, local, cats, wgrads, widx, dgrads, didx, scale, lay, sums)
