"""Triton kernels of the fused Catalyst penalty: every weight of a model in one launch per pass.

Same semantics as the C++ operators and the reference (catalyst_fused/reference.py), same work
decomposition as the CUDA kernels (the tile table of ``backends/tables.py``; read its docstring first).
Two kernels:

* ``_norm_kernel``: one program per tile. It reads each element of its tile once and sums the squares
  per row and per input column together; a group with one contribution is finished on the spot, the
  others through slots and a per-group counter (the program that brings the counter to the number of
  contributions adds the slots in order and finishes the group: ``n``, ``c``, ``|d| n`` and, for the
  in-place op, ``scale * sign(d) * n`` added into the catalyst gradient). The last program adds the
  groups' ``|d| n`` in fp64, in group order, into the penalty. One launch computes everything.
* ``_grad_kernel``: one program per tile writes (or adds) ``scale * (row factor + column factor) * x``
  for each element, factor ``|d| / n`` of the element's row group and column group; extra programs
  write the catalyst gradients (autograd backward only). Every element has one writer.

Launches per call: forward 1, backward 1, in-place 2; a first call with new shapes also uploads the
table, and a call with new data pointers uploads a pointer table (both cached on the device). No host
synchronisation, no floating-point atomics; results are bitwise reproducible.

A program picks one of three block shapes ``[rows, elements]`` from its tile's element-range length
``E``: ``[1024, 1]`` for BN vectors (E = 1), ``[64, 16]`` up to 16 (depthwise filters, short rows),
``[8, 128]`` beyond, looping over 128-element chunks (a tile of long rows spans at least 8 rows), so
that most lanes do work. ``scale`` is passed as the bits of a float64 (a Python float argument would be rounded to
fp32). Without a GPU these kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (that is how CI tests
them); ``scripts/aot_compile_triton.py`` compiles every variant for sm_80 and sm_90 without a GPU.
"""
from __future__ import annotations

import contextlib
import struct
import weakref
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..reference import accumulation_dtype
from . import tables as _t

BLOCK = 1024  # elements per block step (the shapes below are [BLOCK // BE, BE])
CATALYST_BLOCK = 256  # groups per catalyst-gradient program
NUM_WARPS = 4

# Table positions as Triton constants (checked against backends/tables.py below).
_H_NUM_TILES = tl.constexpr(0)
_H_GROUPS = tl.constexpr(1)
_H_SEGMENTS = tl.constexpr(2)
_H_TENSORS = tl.constexpr(3)
_H_ZERO = tl.constexpr(4)
_H_TENSORS_OFF = tl.constexpr(6)
_H_TILES_OFF = tl.constexpr(7)
_H_SEGOFF_OFF = tl.constexpr(8)
_H_SLOT_BEGIN_OFF = tl.constexpr(9)
_H_GROUP_SEG_OFF = tl.constexpr(10)
_H_LOOKUP_GROUP_OFF = tl.constexpr(11)
_H_LOOKUP_SLOT_OFF = tl.constexpr(12)
_H_ZERO_OFF = tl.constexpr(13)
_TENSOR_FIELDS = tl.constexpr(8)
_TILE_FIELDS = tl.constexpr(8)
_COL_E = tl.constexpr(128)
assert (_t.H_NUM_TILES, _t.H_GROUPS, _t.H_SEGMENTS, _t.H_TENSORS, _t.H_ZERO) == (0, 1, 2, 3, 4)
assert (_t.H_TENSORS_OFF, _t.H_TILES_OFF, _t.H_SEGOFF_OFF, _t.H_SLOT_BEGIN_OFF) == (6, 7, 8, 9)
assert (_t.H_GROUP_SEG_OFF, _t.H_LOOKUP_GROUP_OFF, _t.H_LOOKUP_SLOT_OFF, _t.H_ZERO_OFF) == (10, 11, 12, 13)
assert (_t.T_R, _t.T_L, _t.T_K, _t.T_ROW_BASE, _t.T_COL_BASE, _t.T_NR, _t.T_PIECES) == (0, 1, 2, 3, 4, 5, 6)
assert (_t.F_T, _t.F_R0, _t.F_R1, _t.F_E0, _t.F_E1, _t.F_I, _t.F_J) == (0, 1, 2, 3, 4, 5, 6)
assert _t.TENSOR_FIELDS == 8 and _t.TILE_FIELDS == 8 and _t.COL_E == 128

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


# ----------------------------------------------------------------------------------------------------
# Per-group math (same conventions as csrc/penalty_math.h)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _catalyst(table, ptrs, g, mask, T, DTYPE: tl.constexpr, ACC: tl.constexpr):
    """d of global group g, its segment s and index j in the segment."""
    s = tl.load(table + tl.load(table + _H_GROUP_SEG_OFF) + g, mask=mask, other=0)
    j = g - tl.load(table + tl.load(table + _H_SEGOFF_OFF) + s, mask=mask, other=0)
    d_ptr = tl.load(ptrs + 2 * T + s, mask=mask, other=0).to(tl.pointer_type(DTYPE))
    d = tl.load(d_ptr + j, mask=mask, other=0.0).to(ACC)
    return d, s, j


@triton.jit
def _sign(d):
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d * 0.0))


@triton.jit
def _factor(table, ptrs, norms, g, mask, T, DTYPE: tl.constexpr, ACC: tl.constexpr):
    """|d| / n of group g (|d| * 0 where n == 0), 0 where ~mask."""
    d, s, j = _catalyst(table, ptrs, g, mask, T, DTYPE, ACC)
    n = tl.load(norms + g, mask=mask, other=1.0)
    abs_d = tl.abs(d)
    return tl.where(mask, tl.where(n == 0, abs_d * 0.0, abs_d / n), 0.0)


@triton.jit
def _finalize(table, ptrs, norms, ratios, terms, g, sumsq, mask, scale, T, S,
              DTYPE: tl.constexpr, ACC: tl.constexpr, CATALYST_GRAD: tl.constexpr):
    """Writes n, c = |d| / n and |d| n of group g from its sum of squares (and adds scale * sign(d) * n
    into the catalyst gradient for the in-place op)."""
    d, s, j = _catalyst(table, ptrs, g, mask, T, DTYPE, ACC)
    n = tl.sqrt(sumsq)
    abs_d = tl.abs(d)
    tl.store(norms + g, n, mask=mask)
    tl.store(ratios + g, tl.where(n == 0, tl.where(abs_d != abs_d, abs_d, float("inf")), abs_d / n), mask=mask)
    tl.store(terms + g, abs_d * n, mask=mask)
    if CATALYST_GRAD:
        gd_ptr = tl.load(ptrs + 2 * T + S + s, mask=mask, other=0).to(tl.pointer_type(DTYPE)) + j
        gd = tl.load(gd_ptr, mask=mask, other=0.0).to(ACC) + scale * (_sign(d) * n)
        tl.store(gd_ptr, gd.to(DTYPE), mask=mask)


@triton.jit
def _contribute(table, ptrs, partials, counters, norms, ratios, terms, g, slot, value, mask, scale, T, S,
                DTYPE: tl.constexpr, ACC: tl.constexpr, CATALYST_GRAD: tl.constexpr):
    """One contribution `value` (a sum of squares) to group g: finished here if it is the group's only
    one (slot < 0), else stored in its slot; the contribution that completes the group finishes it."""
    direct = mask & (slot < 0)
    shared = mask & (slot >= 0)
    tl.store(partials + slot, value, mask=shared)
    tl.debug_barrier()  # every thread's slot store happens before any of the program's releases
    old = tl.atomic_add(counters + g, 1, mask=shared, sem="acq_rel", scope="gpu")
    slot_begin = table + tl.load(table + _H_SLOT_BEGIN_OFF)
    begin = tl.load(slot_begin + g, mask=shared, other=0)
    count = tl.load(slot_begin + g + 1, mask=shared, other=0) - begin
    last = shared & (old + 1 == count)
    tl.debug_barrier()
    # In fp64: a row of 10^9 elements has 500,000 partial sums, added here in order.
    total = tl.zeros_like(value).to(tl.float64)
    longest = tl.max(tl.where(last, count, 0), axis=0)
    for k in range(0, longest):
        total += tl.load(partials + begin + k, mask=last & (k < count), other=0.0, cache_modifier=".cg").to(tl.float64)
    tl.store(counters + g, 0, mask=last)  # ready for the next launch
    _finalize(table, ptrs, norms, ratios, terms, g, tl.where(direct, value, total.to(ACC)), direct | last, scale, T,
              S, DTYPE, ACC, CATALYST_GRAD)


@triton.jit
def _segmented_add(a_value, a_first, b_value, b_first):
    return tl.where(b_first, b_value, a_value + b_value), a_first | b_first


# ----------------------------------------------------------------------------------------------------
# Norm pass
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _norm_tile(table, ptrs, partials, counters, norms, ratios, terms, scale, T, S, t, r0, r1, e0, e1, i, j,
               DTYPE: tl.constexpr, ACC: tl.constexpr, CATALYST_GRAD: tl.constexpr, BR: tl.constexpr,
               BE: tl.constexpr):
    info = table + tl.load(table + _H_TENSORS_OFF) + t * _TENSOR_FIELDS
    L = tl.load(info + 1)
    K = tl.load(info + 2)
    row_base = tl.load(info + 3)
    col_base = tl.load(info + 4)
    pieces = tl.load(info + 6)
    lookup_group = table + tl.load(table + _H_LOOKUP_GROUP_OFF)
    lookup_slot = table + tl.load(table + _H_LOOKUP_SLOT_OFF)
    x_base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    lanes = tl.arange(0, BE)
    # Column tiles have one element range of at most BE lanes; the per-lane column sums of squares
    # accumulate over the tile's rows and are combined per column at the end.
    columns = tl.zeros([BR, BE], dtype=ACC)
    for rs in range(r0, r1, BR):
        rows = rs + tl.arange(0, BR)
        row_mask = rows < r1
        squares = tl.zeros([BR, BE], dtype=ACC)
        for es in range(e0, e1, BE):
            e = es + lanes
            mask = row_mask[:, None] & (e < e1)[None, :]
            x = tl.load(x_base + (rows.to(tl.int64) * L)[:, None] + e[None, :], mask=mask, other=0.0).to(ACC)
            squares += x * x
        columns += squares
        g = tl.load(lookup_group + row_base + rows, mask=row_mask, other=-1)
        slot = tl.load(lookup_slot + row_base + rows, mask=row_mask, other=-1)
        slot = tl.where(slot >= 0, slot + j, slot)
        _contribute(table, ptrs, partials, counters, norms, ratios, terms, g, slot, tl.sum(squares, axis=1),
                    row_mask & (g >= 0), scale, T, S, DTYPE, ACC, CATALYST_GRAD)
    if col_base >= 0:
        position = e0 + lanes
        lane_mask = position < e1
        # A column of more than COL_E elements is cut into `pieces`: the tile is piece j % pieces of column
        # j // pieces. Otherwise the tile holds whole columns (one division per lane and tile).
        column = tl.where(pieces == 1, position // K, j // pieces)
        piece = j % pieces
        first = (lanes == 0) | (position == column * K)
        last = lane_mask & ((position + 1 == e1) | (position + 1 == (column + 1) * K))
        sums, _ = tl.associative_scan((tl.sum(columns, axis=0), first), 0, _segmented_add)
        g = tl.load(lookup_group + col_base + column, mask=lane_mask, other=-1)
        slot = tl.load(lookup_slot + col_base + column, mask=lane_mask, other=-1)
        slot = tl.where(slot >= 0, slot + i * pieces + piece, slot)
        _contribute(table, ptrs, partials, counters, norms, ratios, terms, g, slot, sums, last & (g >= 0), scale,
                    T, S, DTYPE, ACC, CATALYST_GRAD)


@triton.jit(do_not_specialize=["scale_bits"])
def _norm_kernel(table, ptrs, partials, counters, terms, norms, ratios, penalty, scale_bits,
                 DTYPE: tl.constexpr, ACC: tl.constexpr, CATALYST_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    scale = scale_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    num_tiles = tl.load(table + _H_NUM_TILES)
    G = tl.load(table + _H_GROUPS)
    S = tl.load(table + _H_SEGMENTS)
    T = tl.load(table + _H_TENSORS)
    if pid < num_tiles:
        tile = table + tl.load(table + _H_TILES_OFF) + pid * _TILE_FIELDS
        t = tl.load(tile + 0)
        r0 = tl.load(tile + 1)
        r1 = tl.load(tile + 2)
        e0 = tl.load(tile + 3)
        e1 = tl.load(tile + 4)
        i = tl.load(tile + 5)
        j = tl.load(tile + 6)
        E = e1 - e0
        if E == 1:
            _norm_tile(table, ptrs, partials, counters, norms, ratios, terms, scale, T, S, t, r0, r1, e0, e1, i, j,
                       DTYPE, ACC, CATALYST_GRAD, BLOCK, 1)
        elif E <= 16:
            _norm_tile(table, ptrs, partials, counters, norms, ratios, terms, scale, T, S, t, r0, r1, e0, e1, i, j,
                       DTYPE, ACC, CATALYST_GRAD, BLOCK // 16, 16)
        else:  # longer rows: 128 lanes per step (a tile of long rows spans 8 rows or more)
            _norm_tile(table, ptrs, partials, counters, norms, ratios, terms, scale, T, S, t, r0, r1, e0, e1, i, j,
                       DTYPE, ACC, CATALYST_GRAD, BLOCK // 128, 128)
    # The last program to finish adds up the penalty (every group is finished by then).
    tl.debug_barrier()
    done = tl.atomic_add(counters + G, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        tl.debug_barrier()
        num_zero = tl.load(table + _H_ZERO)
        zero_groups = table + tl.load(table + _H_ZERO_OFF)
        for z0 in range(0, num_zero, BLOCK):
            z = z0 + tl.arange(0, BLOCK)
            g = tl.load(zero_groups + z, mask=z < num_zero, other=0)
            _finalize(table, ptrs, norms, ratios, terms, g, tl.zeros([BLOCK], dtype=ACC), z < num_zero, scale, T, S,
                      DTYPE, ACC, CATALYST_GRAD)
        tl.debug_barrier()
        total = tl.zeros([BLOCK], dtype=tl.float64)
        for g0 in range(0, G, BLOCK):
            g = g0 + tl.arange(0, BLOCK)
            total += tl.load(terms + g, mask=g < G, other=0.0, cache_modifier=".cg").to(tl.float64)
        tl.store(penalty, tl.sum(total, axis=0).to(ACC))
        tl.store(counters + G, 0)


# ----------------------------------------------------------------------------------------------------
# Gradient pass
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _grad_tile(table, ptrs, norms, factor_scale, T, t, r0, r1, e0, e1, j,
               DTYPE: tl.constexpr, ACC: tl.constexpr, ACCUMULATE: tl.constexpr, BR: tl.constexpr, BE: tl.constexpr):
    info = table + tl.load(table + _H_TENSORS_OFF) + t * _TENSOR_FIELDS
    L = tl.load(info + 1)
    K = tl.load(info + 2)
    row_base = tl.load(info + 3)
    col_base = tl.load(info + 4)
    pieces = tl.load(info + 6)
    lookup_group = table + tl.load(table + _H_LOOKUP_GROUP_OFF)
    x_base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    out_base = tl.load(ptrs + T + t).to(tl.pointer_type(DTYPE))
    lanes = tl.arange(0, BE)
    column_factor = tl.zeros([BE], dtype=ACC)
    column_covered = tl.zeros([BE], dtype=tl.int1)
    if col_base >= 0:  # one element range of at most BE lanes: the column factors are per lane
        position = e0 + lanes
        lane_mask = position < e1
        column = tl.where(pieces == 1, position // K, j // pieces)
        g = tl.load(lookup_group + col_base + column, mask=lane_mask, other=-1)
        column_covered = g >= 0
        column_factor = _factor(table, ptrs, norms, g, column_covered, T, DTYPE, ACC)
    for rs in range(r0, r1, BR):
        rows = rs + tl.arange(0, BR)
        row_mask = rows < r1
        g = tl.load(lookup_group + row_base + rows, mask=row_mask, other=-1)
        row_covered = g >= 0
        row_factor = _factor(table, ptrs, norms, g, row_covered, T, DTYPE, ACC)
        factor = factor_scale * (row_factor[:, None] + column_factor[None, :])
        covered = row_covered[:, None] | column_covered[None, :]
        for es in range(e0, e1, BE):
            e = es + lanes
            mask = row_mask[:, None] & (e < e1)[None, :]
            offsets = (rows.to(tl.int64) * L)[:, None] + e[None, :]
            x = tl.load(x_base + offsets, mask=mask, other=0.0).to(ACC)
            value = factor * x
            if ACCUMULATE:
                old = tl.load(out_base + offsets, mask=mask & covered, other=0.0).to(ACC)
                tl.store(out_base + offsets, (old + value).to(DTYPE), mask=mask & covered)
            else:
                tl.store(out_base + offsets, tl.where(covered, value, 0.0).to(DTYPE), mask=mask)


@triton.jit(do_not_specialize=["scale_bits"])
def _grad_kernel(table, ptrs, norms, grad_penalty, scale_bits,
                 DTYPE: tl.constexpr, ACC: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr,
                 CATALYST_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    scale = scale_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    if ACCUMULATE:
        factor_scale = scale  # in-place op: no incoming gradient
    else:
        factor_scale = tl.load(grad_penalty).to(ACC) * scale
    num_tiles = tl.load(table + _H_NUM_TILES)
    T = tl.load(table + _H_TENSORS)
    if pid < num_tiles:
        tile = table + tl.load(table + _H_TILES_OFF) + pid * _TILE_FIELDS
        t = tl.load(tile + 0)
        r0 = tl.load(tile + 1)
        r1 = tl.load(tile + 2)
        e0 = tl.load(tile + 3)
        e1 = tl.load(tile + 4)
        j = tl.load(tile + 6)
        E = e1 - e0
        if E == 1:
            _grad_tile(table, ptrs, norms, factor_scale, T, t, r0, r1, e0, e1, j, DTYPE, ACC, ACCUMULATE, BLOCK, 1)
        elif E <= 16:
            _grad_tile(table, ptrs, norms, factor_scale, T, t, r0, r1, e0, e1, j, DTYPE, ACC, ACCUMULATE, BLOCK // 16, 16)
        else:
            _grad_tile(table, ptrs, norms, factor_scale, T, t, r0, r1, e0, e1, j, DTYPE, ACC, ACCUMULATE, BLOCK // 128, 128)
    elif not ACCUMULATE:
        # Catalyst gradients of the autograd backward: grad * sign(d) * n.
        G = tl.load(table + _H_GROUPS)
        S = tl.load(table + _H_SEGMENTS)
        g = (pid - num_tiles) * CATALYST_BLOCK + tl.arange(0, CATALYST_BLOCK)
        mask = g < G
        d, s, jj = _catalyst(table, ptrs, g, mask, T, DTYPE, ACC)
        n = tl.load(norms + g, mask=mask, other=0.0)
        gd_ptr = tl.load(ptrs + 2 * T + S + s, mask=mask, other=0).to(tl.pointer_type(DTYPE)) + jj
        tl.store(gd_ptr, (factor_scale * (_sign(d) * n)).to(DTYPE), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Host side: cached device tables, launches
# ----------------------------------------------------------------------------------------------------

LAUNCHES = 0  # kernel launches so far (tests count them)
POINTER_UPLOADS = 0  # pointer tables copied to the device so far (cache misses)
_ENTRY_LIMIT = 16
_POINTER_LIMIT = 8


class _Entry:
    """Device state for one set of shapes: the table, and per stream the pointer tables and workspace."""

    def __init__(self, info: _t.TableInfo, device: torch.device):
        self.info = info
        self.device = device
        host = info.words
        if device.type == "cuda":
            # Once per set of shapes: pinned copy, then wait for it, so that any stream may use the table.
            self.table = host.pin_memory().to(device, non_blocking=True)
            torch.cuda.current_stream(device).synchronize()
        else:
            self.table = host
        self.pointers: OrderedDict = OrderedDict()
        self.workspaces: dict = {}

    def pointer_table(self, tensors: Sequence[Optional[torch.Tensor]], stream) -> torch.Tensor:
        """Data pointers (0 for None), on the device; cached per stream, so a steady training loop (same
        parameters, same gradient buffers) copies nothing."""
        key = (stream, tuple(0 if t is None else t.data_ptr() for t in tensors))
        table = self.pointers.get(key)
        if table is None:
            global POINTER_UPLOADS
            POINTER_UPLOADS += 1
            host = torch.tensor(key[1], dtype=torch.int64)
            if self.device.type == "cuda":
                table = host.pin_memory().to(self.device, non_blocking=True)
            else:
                table = host
            self.pointers[key] = table
            while len(self.pointers) > _POINTER_LIMIT:
                self.pointers.popitem(last=False)  # used on this stream only: freeing it is stream-ordered
        else:
            self.pointers.move_to_end(key)
        return table

    def workspace(self, acc: torch.dtype, stream):
        """(partials, counters, terms) for launches on `stream`; the counters are zero between launches."""
        key = (stream, acc)
        space = self.workspaces.get(key)
        if space is None:
            info = self.info
            space = self.workspaces[key] = (
                torch.empty(max(info.num_slots, 1), dtype=acc, device=self.device),
                torch.zeros(info.num_groups + 1, dtype=torch.int32, device=self.device),
                torch.empty(max(info.num_groups, 1), dtype=acc, device=self.device),
            )
        return space


_ENTRIES: OrderedDict = OrderedDict()
_PLAN_KEYS: dict = {}  # id(member table) -> (weakref, version, key)


def _plan_key(plan: torch.Tensor) -> tuple:
    """The member table's contents as a hashable key, remembered per table object (a layout passes the
    same one every step)."""
    known = _PLAN_KEYS.get(id(plan))
    if known is None or known[0]() is not plan or known[1] != plan._version:

        def forget(ref, i=id(plan)):
            if _PLAN_KEYS.get(i, (None,))[0] is ref:
                del _PLAN_KEYS[i]

        known = (weakref.ref(plan, forget), plan._version, (tuple(plan.shape), tuple(map(tuple, plan.tolist()))))
        _PLAN_KEYS[id(plan)] = known
    return known[2]


def _entry(weights, catalysts, plan) -> _Entry:
    device = weights[0].device
    shapes = tuple(tuple(w.shape) for w in weights)
    sizes = tuple(int(d.shape[0]) for d in catalysts)
    plan_key = None if plan is None else _plan_key(plan)
    key = (shapes, sizes, plan_key, device)
    entry = _ENTRIES.get(key)
    if entry is None:
        entry = _Entry(_t.build_table(shapes, sizes, plan), device)
        _ENTRIES[key] = entry
        while len(_ENTRIES) > _ENTRY_LIMIT:
            _, old = _ENTRIES.popitem(last=False)
            if old.device.type == "cuda":
                torch.cuda.synchronize(old.device)  # its tables may still be read on another stream
    else:
        _ENTRIES.move_to_end(key)
    return entry


def _check_capture(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "catalyst_fused: the Triton backend cannot be captured in a CUDA graph (its pointer tables are "
            "copied from host memory when the data pointers change); use backend='cpp' (the CUDA C++ "
            "kernels support capture) or call it outside the graph"
        )


def _context(device: torch.device):
    # Triton launches on the current device: run under the tensors' device (cuda:1 while cuda:0 is current).
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _stream(device: torch.device):
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


def _scale_bits(scale: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(scale)))[0]


def _types(weights):
    dtype = weights[0].dtype
    acc = accumulation_dtype(dtype)
    return _TL_DTYPES[dtype], _TL_DTYPES[acc], acc


def _launch(kernel, grid, *args, **meta):
    global LAUNCHES
    LAUNCHES += 1
    kernel[grid](*args, **meta)


def _norm_pass(weights, catalysts, plan, weight_grads=None, catalyst_grads=None, scale=1.0):
    device = weights[0].device
    _check_capture(device)
    entry = _entry(weights, catalysts, plan)
    dtype, acc_tl, acc = _types(weights)
    info = entry.info
    norms = torch.empty(info.num_groups, dtype=acc, device=device)
    ratios = torch.empty_like(norms)
    penalty = torch.empty((), dtype=acc, device=device)
    stream = _stream(device)
    with _context(device):
        # The in-place op uses the same pointer table (with the gradients) for both of its launches.
        grads = weight_grads if weight_grads is not None else [None] * len(weights)
        cgrads = catalyst_grads if catalyst_grads is not None else [None] * len(catalysts)
        ptrs = entry.pointer_table([*weights, *grads, *catalysts, *cgrads], stream)
        partials, counters, terms = entry.workspace(acc, stream)
        _launch(
            _norm_kernel, (max(info.num_tiles, 1),), entry.table, ptrs, partials, counters, terms, norms, ratios, penalty,
            _scale_bits(scale), DTYPE=dtype, ACC=acc_tl, CATALYST_GRAD=catalyst_grads is not None, BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return entry, penalty, norms, ratios


def penalty_forward(weights: Sequence[torch.Tensor], catalysts: Sequence[torch.Tensor], plan: Optional[torch.Tensor]):
    _, penalty, norms, ratios = _norm_pass(weights, catalysts, plan)
    return penalty, norms, ratios


def penalty_backward(grad_penalty, weights, catalysts, norms, plan):
    device = weights[0].device
    _check_capture(device)
    entry = _entry(weights, catalysts, plan)
    dtype, acc_tl, acc = _types(weights)
    info = entry.info
    grad = grad_penalty.reshape(1)
    if grad.dtype != acc:
        grad = grad.to(acc)
    weight_grads = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
    catalyst_grads = [torch.empty_like(d, memory_format=torch.contiguous_format) for d in catalysts]
    programs = info.num_tiles + triton.cdiv(info.num_groups, CATALYST_BLOCK)
    if programs > 0:
        with _context(device):
            ptrs = entry.pointer_table([*weights, *weight_grads, *catalysts, *catalyst_grads], _stream(device))
            _launch(
                _grad_kernel, (programs,), entry.table, ptrs, norms, grad, _scale_bits(1.0), DTYPE=dtype, ACC=acc_tl,
                ACCUMULATE=False, BLOCK=BLOCK, CATALYST_BLOCK=CATALYST_BLOCK, num_warps=NUM_WARPS,
            )
    return weight_grads, catalyst_grads


def penalty_accumulate_(weights, catalysts, weight_grads, catalyst_grads, scale, plan):
    entry, penalty, norms, ratios = _norm_pass(weights, catalysts, plan, weight_grads, catalyst_grads, scale)
    device = weights[0].device
    dtype, acc_tl, _ = _types(weights)
    if entry.info.num_tiles > 0:
        with _context(device):
            ptrs = entry.pointer_table([*weights, *weight_grads, *catalysts, *catalyst_grads], _stream(device))
            _launch(
                _grad_kernel, (entry.info.num_tiles,), entry.table, ptrs, norms, norms, _scale_bits(scale), DTYPE=dtype,
                ACC=acc_tl, ACCUMULATE=True, BLOCK=BLOCK, CATALYST_BLOCK=CATALYST_BLOCK, num_warps=NUM_WARPS,
            )
    return penalty, norms, ratios
