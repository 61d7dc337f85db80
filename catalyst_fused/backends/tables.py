"""Index tables that drive the multi-tensor GPU kernels (Triton), built once per set of shapes.

The kernels see every weight of a model in one launch. Two kinds of programs:

* norm programs, one per group: walk the members of the group's segment (CSR ``segment_members``) and
  sum the squares of the group's slices;
* gradient programs, one per row of every weight: the row's factor is the sum over the weight's
  row members that cover it, plus (per input-column block) the column members that cover the column;
  each element is written once, so no atomics are needed and results are deterministic.

Everything here depends only on shapes and the member table, so it is cached; per call only the data
pointers change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

# Columns of ``members`` (device int64 [M, MEMBER_FIELDS]).
M_TENSOR, M_DIM, M_START, M_COUNT, M_SEGMENT, M_GROUP_BEGIN, M_SLICE_STRIDE, M_OUTER, M_OUTER_STRIDE, M_INNER = range(10)
MEMBER_FIELDS = 10


@dataclass
class KernelTables:
    num_groups: int
    num_rows: int
    members: torch.Tensor  # int64 [M, MEMBER_FIELDS]
    segment_offsets: torch.Tensor  # int64 [S + 1]
    segment_of_group: torch.Tensor  # int32 [G]
    segment_member_offsets: torch.Tensor  # int64 [S + 1]
    segment_members: torch.Tensor  # int64 [M]
    tensor_of_row: torch.Tensor  # int32 [R]
    row_offsets: torch.Tensor  # int64 [T + 1]
    row_lengths: torch.Tensor  # int64 [T]
    column_block: torch.Tensor  # int64 [T]: elements per input column (0: no column members)
    tensor_member_offsets: torch.Tensor  # int64 [T + 1]
    tensor_members: torch.Tensor  # int64 [M]


def _csr(keys: list[int], num_keys: int) -> tuple[list[int], list[int]]:
    offsets = [0] * (num_keys + 1)
    for k in keys:
        offsets[k + 1] += 1
    for k in range(num_keys):
        offsets[k + 1] += offsets[k]
    fill = offsets[:-1].copy()
    items = [0] * len(keys)
    for i, k in enumerate(keys):
        items[fill[k]] = i
        fill[k] += 1
    return offsets, items


def member_rows(shapes: Sequence[tuple[int, ...]], segment_sizes: Sequence[int], plan: Optional[torch.Tensor]) -> list[list[int]]:
    """(tensor, dim, start, count, segment, segment_start) rows; the per-row layout when plan is None."""
    if plan is None:
        return [[t, 0, 0, shape[0], t, 0] for t, shape in enumerate(shapes)]
    if plan.dtype != torch.int64 or plan.dim() != 2 or plan.shape[1] != 6:
        raise ValueError(f"catalyst_fused: plan must be an int64 tensor of shape [members, 6], got {plan.dtype} {tuple(plan.shape)}")
    rows = [[int(v) for v in row] for row in plan.tolist()]
    for i, (t, dim, start, count, seg, seg_start) in enumerate(rows):
        if not 0 <= t < len(shapes):
            raise ValueError(f"catalyst_fused: plan member {i} refers to weights[{t}] but only {len(shapes)} weights were given")
        if dim not in (0, 1) or dim >= len(shapes[t]):
            raise ValueError(f"catalyst_fused: plan member {i} slices weights[{t}] of shape {shapes[t]} along dim {dim}")
        if start < 0 or count < 0 or start + count > shapes[t][dim]:
            raise ValueError(f"catalyst_fused: plan member {i} takes slices [{start}, {start + count}) of weights[{t}] along dim {dim}")
        if not 0 <= seg < len(segment_sizes) or seg_start < 0 or seg_start + count > segment_sizes[seg]:
            raise ValueError(f"catalyst_fused: plan member {i} maps outside catalysts[{seg}]")
    return rows


def build_tables(shapes: Sequence[tuple[int, ...]], segment_sizes: Sequence[int], plan: Optional[torch.Tensor], device) -> KernelTables:
    segment_offsets = [0]
    for size in segment_sizes:
        segment_offsets.append(segment_offsets[-1] + size)
    members = []
    for t, dim, start, count, seg, seg_start in member_rows(shapes, segment_sizes, plan):
        shape = shapes[t]
        if dim == 0:
            inner = 1
            for s in shape[1:]:
                inner *= s
            outer, outer_stride, slice_stride = 1, 0, inner
        else:
            inner = 1
            for s in shape[2:]:
                inner *= s
            outer, outer_stride, slice_stride = shape[0], shape[1] * inner, inner
        members.append([t, dim, start, count, seg, segment_offsets[seg] + seg_start, slice_stride, outer, outer_stride, inner])
    seg_offsets, seg_members = _csr([m[M_SEGMENT] for m in members], len(segment_sizes))
    ten_offsets, ten_members = _csr([m[M_TENSOR] for m in members], len(shapes))
    row_offsets, row_lengths, column_block = [0], [], []
    for t, shape in enumerate(shapes):
        rows = shape[0]
        length = 1
        for s in shape[1:]:
            length *= s
        row_offsets.append(row_offsets[-1] + rows)
        row_lengths.append(length)
        has_columns = any(members[k][M_DIM] == 1 for k in ten_members[ten_offsets[t] : ten_offsets[t + 1]])
        column_block.append(length // shape[1] if has_columns and shape[1] > 0 else 0)
    num_groups = segment_offsets[-1]

    def i64(values):
        return torch.tensor(values, dtype=torch.int64, device=device)

    sizes = torch.tensor(list(segment_sizes), dtype=torch.int64)
    rows_per_tensor = torch.tensor([s[0] for s in shapes], dtype=torch.int64)
    return KernelTables(
        num_groups=num_groups,
        num_rows=row_offsets[-1],
        members=i64(members).reshape(-1, MEMBER_FIELDS),
        segment_offsets=i64(segment_offsets),
        segment_of_group=torch.repeat_interleave(torch.arange(len(segment_sizes), dtype=torch.int32), sizes).to(device),
        segment_member_offsets=i64(seg_offsets),
        segment_members=i64(seg_members),
        tensor_of_row=torch.repeat_interleave(torch.arange(len(shapes), dtype=torch.int32), rows_per_tensor).to(device),
        row_offsets=i64(row_offsets),
        row_lengths=i64(row_lengths),
        column_block=i64(column_block),
        tensor_member_offsets=i64(ten_offsets),
        tensor_members=i64(ten_members),
    )


_CACHE: dict = {}
_CACHE_LIMIT = 64


def tables_for(weights: Sequence[torch.Tensor], catalysts: Sequence[torch.Tensor], plan: Optional[torch.Tensor]) -> KernelTables:
    shapes = tuple(tuple(w.shape) for w in weights)
    sizes = tuple(d.shape[0] for d in catalysts)
    plan_key = None if plan is None else plan.cpu().numpy().tobytes()
    key = (shapes, sizes, plan_key, weights[0].device)
    tables = _CACHE.get(key)
    if tables is None:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        tables = _CACHE[key] = build_tables(shapes, sizes, plan, weights[0].device)
    return tables


def pointer_table(tensors: Sequence[torch.Tensor], device) -> torch.Tensor:
    """Data pointers as an int64 tensor on ``device`` (a small host-to-device copy per call)."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device, non_blocking=True)
