"""Triton kernels of the fused Catalyst penalty: every weight of a model in one launch per pass.

Same semantics as the C++ operators and the reference (catalyst_fused/reference.py). The weights are
reached through an int64 table of data pointers; the index tables (backends/tables.py) say which slices
form which group. Two kernels:

* ``_norm_kernel``: one program per group, sums the squares of its slices in fp32 (fp64 for fp64)
  blocks of ``BLOCK`` elements (rows longer than a block are looped over), then writes ``n``, ``c``,
  ``|d| * n`` and, for the in-place op, adds ``scale * sign(d) * n`` into the catalyst gradient;
* ``_grad_kernel``: one program per row of every weight, writes (or adds) ``scale * |d| / n * x`` for
  each element of the row, the row's groups and its input-column groups summed. Every element is
  written by exactly one program: no atomics, deterministic.

The penalty is the fp64 sum of the per-group terms. Without a GPU these kernels run under
``TRITON_INTERPRET=1`` on CPU tensors (that is how CI tests them).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..reference import accumulation_dtype
from . import tables as _t
from .tables import MEMBER_FIELDS, pointer_table, tables_for

# The kernels read member fields at these literal offsets (Triton cannot index with Python globals).
assert (_t.M_TENSOR, _t.M_DIM, _t.M_START, _t.M_COUNT, _t.M_SEGMENT, _t.M_GROUP_BEGIN) == (0, 1, 2, 3, 4, 5)
assert (_t.M_SLICE_STRIDE, _t.M_OUTER, _t.M_OUTER_STRIDE, _t.M_INNER) == (6, 7, 8, 9)

BLOCK = 1024

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


@triton.jit
def _norm_kernel(
    weight_ptrs,
    catalyst_ptrs,
    catalyst_grad_ptrs,
    members,
    segment_of_group,
    segment_offsets,
    segment_member_offsets,
    segment_members,
    norms,
    ratios,
    terms,
    scale,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    FIELDS: tl.constexpr,
    HAS_CATALYST_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    g = tl.program_id(0)
    s = tl.load(segment_of_group + g)
    acc = tl.zeros([BLOCK], dtype=ACC)
    k_begin = tl.load(segment_member_offsets + s)
    k_end = tl.load(segment_member_offsets + s + 1)
    for k in range(k_begin, k_end):
        row = members + tl.load(segment_members + k) * FIELDS
        local = g - tl.load(row + 5)  # M_GROUP_BEGIN
        count = tl.load(row + 3)  # M_COUNT
        if (local >= 0) & (local < count):
            base = tl.load(weight_ptrs + tl.load(row + 0)).to(tl.pointer_type(DTYPE))
            base += (tl.load(row + 2) + local) * tl.load(row + 6)  # (start + local) * slice_stride
            outer = tl.load(row + 7)
            outer_stride = tl.load(row + 8)
            inner = tl.load(row + 9)
            numel = outer * inner
            for e0 in range(0, numel, BLOCK):
                e = e0 + tl.arange(0, BLOCK)
                offsets = (e // inner) * outer_stride + e % inner
                x = tl.load(base + offsets, mask=e < numel, other=0.0).to(ACC)
                acc += x * x
    n = tl.sqrt(tl.sum(acc, axis=0))
    j = g - tl.load(segment_offsets + s)
    d_ptr = tl.load(catalyst_ptrs + s).to(tl.pointer_type(DTYPE)) + j
    d = tl.load(d_ptr).to(ACC)
    abs_d = tl.abs(d)
    tl.store(norms + g, n)
    tl.store(ratios + g, tl.where(n == 0, float("inf"), abs_d / n))
    tl.store(terms + g, abs_d * n)
    if HAS_CATALYST_GRAD:
        gd_ptr = tl.load(catalyst_grad_ptrs + s).to(tl.pointer_type(DTYPE)) + j
        sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d * 0.0))
        gd = tl.load(gd_ptr).to(ACC) + scale * sign * n
        tl.store(gd_ptr, gd.to(DTYPE))


@triton.jit
def _group_scale(catalyst_ptrs, segment_offsets, norms, row, index, mask, DTYPE: tl.constexpr, ACC: tl.constexpr):
    """|d| / n (0 where n == 0) for slice `index` of the member at `row`; 0 where ~mask."""
    s = tl.load(row + 4)  # M_SEGMENT
    group = tl.load(row + 5) + index - tl.load(row + 2)  # group_begin + (index - start)
    d_base = tl.load(catalyst_ptrs + s).to(tl.pointer_type(DTYPE))
    d = tl.load(d_base + (group - tl.load(segment_offsets + s)), mask=mask, other=0.0).to(ACC)
    n = tl.load(norms + group, mask=mask, other=1.0)
    return tl.where(mask, tl.where(n == 0, 0.0, tl.abs(d) / n), 0.0)


@triton.jit
def _grad_kernel(
    weight_ptrs,
    grad_ptrs,
    catalyst_ptrs,
    members,
    segment_offsets,
    norms,
    tensor_of_row,
    row_offsets,
    row_lengths,
    column_block,
    tensor_member_offsets,
    tensor_members,
    grad_scale_ptr,
    scale,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    FIELDS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(tensor_of_row + pid)
    r = pid - tl.load(row_offsets + t)
    length = tl.load(row_lengths + t)
    block = tl.load(column_block + t)
    factor_scale = tl.load(grad_scale_ptr).to(ACC) * scale
    k_begin = tl.load(tensor_member_offsets + t)
    k_end = tl.load(tensor_member_offsets + t + 1)
    row_factor = tl.zeros([1], dtype=ACC)
    row_covered = tl.zeros([1], dtype=tl.int1)
    for k in range(k_begin, k_end):
        row = members + tl.load(tensor_members + k) * FIELDS
        start = tl.load(row + 2)
        hit = (tl.load(row + 1) == 0) & (r >= start) & (r < start + tl.load(row + 3))
        hit_v = tl.zeros([1], dtype=tl.int1) | hit
        row_factor += _group_scale(catalyst_ptrs, segment_offsets, norms, row, r + tl.zeros([1], tl.int64), hit_v, DTYPE, ACC)
        row_covered = row_covered | hit_v
    w = tl.load(weight_ptrs + t).to(tl.pointer_type(DTYPE)) + r * length
    out = tl.load(grad_ptrs + t).to(tl.pointer_type(DTYPE)) + r * length
    for e0 in range(0, length, BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        in_row = e < length
        factor = tl.zeros([BLOCK], dtype=ACC) + row_factor
        covered = (tl.zeros([BLOCK], dtype=tl.int1) | row_covered) & in_row
        if block > 0:
            column = e // tl.maximum(block, 1)
            for k in range(k_begin, k_end):
                row = members + tl.load(tensor_members + k) * FIELDS
                start = tl.load(row + 2)
                hit = (tl.load(row + 1) == 1) & (column >= start) & (column < start + tl.load(row + 3)) & in_row
                factor += _group_scale(catalyst_ptrs, segment_offsets, norms, row, column, hit, DTYPE, ACC)
                covered = covered | hit
        x = tl.load(w + e, mask=in_row, other=0.0).to(ACC)
        value = tl.where(covered, factor_scale * factor * x, 0.0)
        if ACCUMULATE:
            old = tl.load(out + e, mask=covered, other=0.0).to(ACC)
            tl.store(out + e, (old + value).to(DTYPE), mask=covered)
        else:
            tl.store(out + e, value.to(DTYPE), mask=in_row)


@triton.jit
def _catalyst_grad_kernel(
    catalyst_ptrs, catalyst_grad_ptrs, segment_of_group, segment_offsets, norms, grad_scale_ptr, num_groups,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = g < num_groups
    s = tl.load(segment_of_group + g, mask=mask, other=0)
    j = g - tl.load(segment_offsets + s, mask=mask, other=0)
    d_base = tl.load(catalyst_ptrs + s, mask=mask, other=0).to(tl.pointer_type(DTYPE))
    gd_base = tl.load(catalyst_grad_ptrs + s, mask=mask, other=0).to(tl.pointer_type(DTYPE))
    d = tl.load(d_base + j, mask=mask, other=0.0).to(ACC)
    n = tl.load(norms + g, mask=mask, other=0.0)
    sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d * 0.0))
    grad = tl.load(grad_scale_ptr).to(ACC) * sign * n
    tl.store(gd_base + j, grad.to(DTYPE), mask=mask)


def _meta(weights):
    dtype = weights[0].dtype
    acc = accumulation_dtype(dtype)
    return _TL_DTYPES[dtype], _TL_DTYPES[acc], acc


def _norm_pass(weights, catalysts, plan, catalyst_grads=None, scale=1.0):
    tables = tables_for(weights, catalysts, plan)
    device = weights[0].device
    dtype, acc_tl, acc = _meta(weights)
    norms = torch.empty(tables.num_groups, dtype=acc, device=device)
    ratios = torch.empty_like(norms)
    terms = torch.empty_like(norms)
    cat_ptrs = pointer_table(catalysts, device)
    grad_ptrs = pointer_table(catalyst_grads, device) if catalyst_grads is not None else cat_ptrs
    if tables.num_groups > 0:
        _norm_kernel[(tables.num_groups,)](
            pointer_table(weights, device), cat_ptrs, grad_ptrs, tables.members, tables.segment_of_group,
            tables.segment_offsets, tables.segment_member_offsets, tables.segment_members, norms, ratios, terms,
            float(scale), DTYPE=dtype, ACC=acc_tl, FIELDS=MEMBER_FIELDS,
            HAS_CATALYST_GRAD=catalyst_grads is not None, BLOCK=BLOCK,
        )
    penalty = terms.sum(dtype=torch.float64).to(acc)
    return tables, penalty, norms, ratios


def _grad_pass(tables, weights, catalysts, norms, outputs, grad_scale, scale, accumulate):
    device = weights[0].device
    dtype, acc_tl, _ = _meta(weights)
    if tables.num_rows == 0:
        return
    _grad_kernel[(tables.num_rows,)](
        pointer_table(weights, device), pointer_table(outputs, device), pointer_table(catalysts, device),
        tables.members, tables.segment_offsets, norms, tables.tensor_of_row, tables.row_offsets, tables.row_lengths,
        tables.column_block, tables.tensor_member_offsets, tables.tensor_members, grad_scale, float(scale),
        DTYPE=dtype, ACC=acc_tl, FIELDS=MEMBER_FIELDS, ACCUMULATE=accumulate, BLOCK=BLOCK,
    )


def penalty_forward(weights: Sequence[torch.Tensor], catalysts: Sequence[torch.Tensor], plan: Optional[torch.Tensor]):
    _, penalty, norms, ratios = _norm_pass(weights, catalysts, plan)
    return penalty, norms, ratios


def penalty_backward(grad_penalty, weights, catalysts, norms, plan):
    tables = tables_for(weights, catalysts, plan)
    dtype, acc_tl, acc = _meta(weights)
    grad = grad_penalty.reshape(1).to(acc)
    weight_grads = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
    catalyst_grads = [torch.empty_like(d) for d in catalysts]
    _grad_pass(tables, weights, catalysts, norms, weight_grads, grad, 1.0, accumulate=False)
    if tables.num_groups > 0:
        device = weights[0].device
        cblock = 256
        _catalyst_grad_kernel[(triton.cdiv(tables.num_groups, cblock),)](
            pointer_table(catalysts, device), pointer_table(catalyst_grads, device), tables.segment_of_group,
            tables.segment_offsets, norms, grad, tables.num_groups, DTYPE=dtype, ACC=acc_tl, BLOCK=cblock,
        )
    return weight_grads, catalyst_grads


def penalty_accumulate_(weights, catalysts, weight_grads, catalyst_grads, scale, plan):
    tables, penalty, norms, ratios = _norm_pass(weights, catalysts, plan, catalyst_grads=catalyst_grads, scale=scale)
    one = torch.ones(1, dtype=norms.dtype, device=norms.device)
    _grad_pass(tables, weights, catalysts, norms, weight_grads, one, scale, accumulate=True)
    return penalty, norms, ratios
