"""Triton kernel of the soft-threshold operator (:mod:`catalyst_fused.sparsity`): every tensor in one launch.

A host table cuts every tensor into chunks of ``CHUNK`` elements; one program per chunk reads its row of the
table (source and weight data pointers, element range, tensor index, threshold as fp64 bits), writes
``sign(x) * max(|x| - t, 0)`` block by block in the accumulation dtype, and adds the zeros it wrote to its
tensor's count with one integer atomic (integers: the result does not depend on the order). The table
depends on the shapes only and is cached; per call the pointers and thresholds are written into a copy.

Registered as ``catalyst_fused::triton_soft_threshold_`` (a ``torch.library.custom_op`` with a fake
function). Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""
from __future__ import annotations

import contextlib
import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference import accumulation_dtype
from .triton_ops import _check_device

CHUNK = 1 << 14  # elements per program (the C++ kernels' chunk, so tests share their boundary sizes)
BLOCK = 1024  # elements per step of a program
NUM_WARPS = 4
FIELDS = 6  # source pointer, weight pointer, begin, end, tensor index, threshold (fp64 bits)

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _soft_threshold_kernel(table, counts, DTYPE: tl.constexpr, ACC: tl.constexpr, FIELDS: tl.constexpr,
                           BLOCK: tl.constexpr):
    row = table + tl.program_id(0).to(tl.int64) * FIELDS
    src = tl.load(row + 0).to(tl.pointer_type(DTYPE))
    dst = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    begin = tl.load(row + 2)
    end = tl.load(row + 3)
    tensor = tl.load(row + 4)
    t = tl.load(row + 5).to(tl.float64, bitcast=True).to(ACC)
    zeros = tl.zeros([BLOCK], dtype=tl.int64)
    for b in range(begin, end, BLOCK):
        offs = b + tl.arange(0, BLOCK)
        mask = offs < end
        x = tl.load(src + offs, mask=mask, other=0).to(ACC)
        a = tl.abs(x)
        kept = tl.where(x < 0, t - a, a - t)  # sign(x) * (|x| - t); NaN fails both comparisons and stays NaN
        out = tl.where(a <= t, tl.zeros_like(a), kept).to(DTYPE)
        tl.store(dst + offs, out, mask=mask)
        zeros += ((out == 0) & mask).to(tl.int64)
    tl.atomic_add(counts + tensor, tl.sum(zeros, axis=0))


_TABLES: dict = {}
_TABLE_LIMIT = 64


def _chunk_table(numels: tuple) -> torch.Tensor:
    """(begin, end, tensor) of every chunk, as a CPU int64 [chunks, FIELDS] template (pointers and
    thresholds are filled in per call)."""
    key = (numels, CHUNK)
    table = _TABLES.get(key)
    if table is None:
        rows = [[0, 0, b, min(n, b + CHUNK), i, 0] for i, n in enumerate(numels) for b in range(0, n, CHUNK)]
        table = torch.tensor(rows, dtype=torch.int64).reshape(-1, FIELDS)
        if len(_TABLES) >= _TABLE_LIMIT:
            _TABLES.clear()
        _TABLES[key] = table
    return table


def _bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def soft_threshold(weights: list, sources: Optional[list], thresholds: list) -> torch.Tensor:
    device = weights[0].device
    template = _chunk_table(tuple(w.numel() for w in weights))
    counts = torch.zeros(len(weights), dtype=torch.int64, device=device)
    if template.shape[0] == 0:
        return counts
    table = template.clone()
    tensor = table[:, 4]
    srcs = sources if sources is not None else weights
    src_ptr = torch.tensor([s.data_ptr() for s in srcs], dtype=torch.int64)
    dst_ptr = torch.tensor([w.data_ptr() for w in weights], dtype=torch.int64)
    bits = torch.tensor([_bits(t) for t in thresholds], dtype=torch.int64)
    table[:, 0] = src_ptr[tensor]
    table[:, 1] = dst_ptr[tensor]
    table[:, 5] = bits[tensor]
    table = table.to(device, non_blocking=True)
    dtype = weights[0].dtype
    with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _soft_threshold_kernel[(template.shape[0],)](table, counts, DTYPE=_TL[dtype], ACC=_TL[accumulation_dtype(dtype)],
                                                     FIELDS=FIELDS, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return counts


# The schema is spelled out: Tensor[]? (the optional sources) is beyond custom_op's type inference.
@torch.library.custom_op("catalyst_fused::triton_soft_threshold_", mutates_args=("weights",),
                         schema="(Tensor(a!)[] weights, Tensor[]? sources, float[] thresholds) -> Tensor")
def triton_soft_threshold_(weights: list[torch.Tensor], sources: Optional[list[torch.Tensor]],
                           thresholds: list[float]) -> torch.Tensor:
    from ..sparsity import check_soft_threshold_args

    check_soft_threshold_args(weights, sources, thresholds)
    _check_device(weights)
    return soft_threshold(weights, sources, thresholds)


@triton_soft_threshold_.register_fake
def _(weights, sources, thresholds):
    from ..sparsity import check_soft_threshold_args

    check_soft_threshold_args(weights, sources, thresholds, check_memory=False)
    return weights[0].new_empty((len(weights),), dtype=torch.int64)
