"""The work decomposition of the GPU kernels (CUDA C++ and Triton): one int64 table per set of shapes.

Both GPU backends read the same table; ``csrc/cuda/tiles.h`` builds it in C++ for the CUDA kernels and
:func:`build_table` builds it here for the Triton kernels (``tests/test_gpu_tables.py`` checks that the
two are identical word for word). Everything in it depends only on the shapes and the member table, so
it is built once per set of shapes, copied to the device once and cached.

**Tiles.** Every weight ``W`` is viewed as ``[R, L]`` (``R = shape[0]`` rows of ``L`` elements; the
input columns of a ``[R, C, *k]`` weight are runs of ``K = prod(k)`` elements, ``L = C * K``). It is cut
into tiles ``rows [r0, r1) x elements [e0, e1)``, each read by one GPU block / Triton program:

* a weight without column members is cut into runs of whole rows (rows longer than ``row_e = tile / 8``
  elements into pieces of ``row_e``, so that a tile always spans 8 rows or more), about ``tile`` elements
  per tile;
* a weight with column members is cut into element ranges of at most ``COL_E`` elements that start and
  end on input-column boundaries (a column of more than ``COL_E`` elements into pieces), and runs of
  rows, about ``tile`` elements per tile.

``tile`` grows with the model (``TILE_MIN`` .. ``TILE_MAX`` elements, aiming at ``TARGET_TILES`` tiles) so
that a small model still spreads over the GPU and a big one keeps blocks busy; it depends only on the
shapes, so results do not depend on the GPU either.

**One pass per phase.** A tile reads each of its elements once and accumulates both the sum of squares
of each of its rows and of each of its input columns (per-lane column accumulators, combined in a fixed
order). A group's sum of squares is the sum of the *contributions* of its slices: a row slice gets one
contribution per element range of its weight, a column slice one per row tile (times the pieces of a
long column). A group with exactly one contribution is finished by the tile that computes it
("direct"); otherwise every contribution goes to its own *slot* in a partials buffer, the tile
increments the group's counter, and the tile that brings the counter to the number of contributions
adds the slots in slot order and finishes the group (norm, ratio, ``|d| n``, catalyst gradient). The
last tile of the launch adds the groups' terms in group order into the penalty. The order of every sum
is fixed by the table, so results are bitwise reproducible, with no floating-point atomics.

Table layout (int64 words; offsets in the header):

* header ``[HEADER]``: see the ``H_*`` constants;
* tensors ``[T, TENSOR_FIELDS]``: ``R, L, K, row_base, col_base (-1: no column members), n_r (row
  tiles), pieces (per column; 1 unless K > COL_E), C``;
* tiles ``[num_tiles, TILE_FIELDS]``: ``t, r0, r1, e0, e1, i (row tile), j (element range), 0``;
* ``segment_offsets [S + 1]``, ``slot_begin [G + 1]``, ``group_segment [G]``;
* ``lookup_group [NL]`` and ``lookup_slot [NL]``: for every row of every weight (at ``row_base + r``)
  and every input column of weights with column members (at ``col_base + c``), the global group it
  belongs to (-1: none) and its first slot (-1: the group is direct);
* ``zero_groups [Z]``: groups with no element at all (finished by the last tile: n = 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

TILE_MIN = 1024
TILE_MAX = 16384
TARGET_TILES = 2048
COL_E = 128
ROW_PIECES = 8  # rows are cut into pieces of at most tile // ROW_PIECES elements: at least 8 rows per tile

HEADER = 16
(
    H_NUM_TILES,
    H_GROUPS,
    H_SEGMENTS,
    H_TENSORS,
    H_ZERO,
    H_SLOTS,
    H_TENSORS_OFF,
    H_TILES_OFF,
    H_SEGOFF_OFF,
    H_SLOT_BEGIN_OFF,
    H_GROUP_SEG_OFF,
    H_LOOKUP_GROUP_OFF,
    H_LOOKUP_SLOT_OFF,
    H_ZERO_OFF,
    H_TILE,
    H_WORDS,
) = range(HEADER)

TENSOR_FIELDS = 8
T_R, T_L, T_K, T_ROW_BASE, T_COL_BASE, T_NR, T_PIECES, T_C = range(TENSOR_FIELDS)
TILE_FIELDS = 8
F_T, F_R0, F_R1, F_E0, F_E1, F_I, F_J = range(7)

MEMBER_COLUMNS_V1 = 6  # tensor, dim, start, count, segment, segment_start
MEMBER_COLUMNS = 7  # ... and width


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def tile_elements(total: int) -> int:
    """Elements per tile for a model of ``total`` elements."""
    tile = TILE_MIN
    while tile < TILE_MAX and tile * TARGET_TILES < total:
        tile *= 2
    return tile


def member_rows(shapes: Sequence[tuple[int, ...]], segment_sizes: Sequence[int], plan: Optional[torch.Tensor]) -> list[list[int]]:
    """(tensor, dim, start, count, segment, segment_start, width) rows, checked; the per-row layout when
    ``plan`` is None. Accepts the 6-column table of older layouts (width 1)."""
    if plan is None:
        return [[t, 0, 0, shape[0], t, 0, 1] for t, shape in enumerate(shapes)]
    if (
        not isinstance(plan, torch.Tensor)
        or plan.dtype != torch.int64
        or plan.dim() != 2
        or plan.shape[1] not in (MEMBER_COLUMNS_V1, MEMBER_COLUMNS)
        or plan.device.type != "cpu"
    ):
        raise ValueError(
            "catalyst_fused: plan must be an int64 CPU tensor of shape [members, 7] (build it with "
            f"catalyst_fused.GroupLayout), got {getattr(plan, 'dtype', type(plan).__name__)} "
            f"{tuple(getattr(plan, 'shape', ()))}"
        )
    rows = [[int(v) for v in row] + ([1] if plan.shape[1] == MEMBER_COLUMNS_V1 else []) for row in plan.tolist()]
    for i, (t, dim, start, count, seg, seg_start, width) in enumerate(rows):
        if not 0 <= t < len(shapes):
            raise ValueError(f"catalyst_fused: plan member {i} refers to weights[{t}] but only {len(shapes)} weights were given")
        if dim not in (0, 1) or dim >= len(shapes[t]):
            raise ValueError(f"catalyst_fused: plan member {i} slices weights[{t}] of shape {shapes[t]} along dim {dim}")
        if start < 0 or count < 0 or start + count > shapes[t][dim]:
            raise ValueError(f"catalyst_fused: plan member {i} takes slices [{start}, {start + count}) of weights[{t}] along dim {dim}")
        if width < 1 or count % width:
            raise ValueError(f"catalyst_fused: plan member {i} has width {width}; it must be >= 1 and divide its slice count {count}")
        if not 0 <= seg < len(segment_sizes) or seg_start < 0 or seg_start + count // width > segment_sizes[seg]:
            raise ValueError(f"catalyst_fused: plan member {i} maps outside catalysts[{seg}]")
    return rows


@dataclass
class TableInfo:
    """The table on the host (``words``, int64) and the figures the launches need."""

    words: torch.Tensor
    num_tiles: int
    num_groups: int
    num_segments: int
    num_tensors: int
    num_slots: int
    tile: int
    offsets: dict = field(default_factory=dict)


def _ranges(R: int, L: int, C: int, K: int, has_cols: bool, row_e: int) -> tuple[torch.Tensor, int]:
    """The element ranges [e0, e1) of a tile row (int64 [n_e, 2]) and the pieces per column."""
    i64 = dict(dtype=torch.int64)
    if R * L == 0:
        return torch.empty(0, 2, **i64), 1
    if not has_cols:
        e0 = torch.arange(0, L, row_e, **i64)
        return torch.stack([e0, (e0 + row_e).clamp(max=L)], 1), 1
    if K <= COL_E:
        per = COL_E // K
        c = torch.arange(0, C, per, **i64)
        return torch.stack([c * K, (c + per).clamp(max=C) * K], 1), 1
    pieces = -(-K // COL_E)
    c = torch.arange(C, **i64)[:, None]
    p = torch.arange(pieces, **i64)[None, :]
    e0 = c * K + p * COL_E
    e1 = c * K + ((p + 1) * COL_E).clamp(max=K)
    return torch.stack([e0.reshape(-1), e1.reshape(-1)], 1), pieces


def build_table(shapes: Sequence[Sequence[int]], segment_sizes: Sequence[int], plan: Optional[torch.Tensor]) -> TableInfo:
    """The tile table for weights of these ``shapes``, catalyst segments of these sizes and this member
    table (None: per-row layout). Pure host code (vectorised: a model with millions of rows takes
    seconds); see the module docstring for the layout."""
    shapes = [tuple(int(s) for s in shape) for shape in shapes]
    segment_sizes = [int(s) for s in segment_sizes]
    members = member_rows(shapes, segment_sizes, plan)
    T, S = len(shapes), len(segment_sizes)
    i64 = dict(dtype=torch.int64)
    total = sum(_prod(s) for s in shapes)
    tile = tile_elements(total)
    row_e = max(1, tile // ROW_PIECES)

    has_cols = [False] * T
    for t, dim, start, count, seg, seg_start, width in members:
        if dim == 1 and count > 0:
            has_cols[t] = True

    tensors, tiles = [], []
    n_e_of, n_r_of, pieces_of = [0] * T, [0] * T, [1] * T
    lookup_size = 0
    row_base, col_base = [0] * T, [-1] * T
    for t, shape in enumerate(shapes):
        R = shape[0]
        L = _prod(shape[1:])
        C = shape[1] if len(shape) >= 2 else 1
        K = _prod(shape[2:])
        ranges, pieces = _ranges(R, L, C, K, has_cols[t], row_e)
        n_e, n_r = ranges.shape[0], 0
        if n_e:
            longest = int((ranges[:, 1] - ranges[:, 0]).max())
            rows_per_tile = max(1, tile // longest)
            n_r = -(-R // rows_per_tile)
            i = torch.arange(n_r, **i64)[:, None].expand(n_r, n_e)
            j = torch.arange(n_e, **i64)[None, :].expand(n_r, n_e)
            block = torch.stack(
                [
                    torch.full((n_r, n_e), t, **i64),
                    i * rows_per_tile,
                    ((i + 1) * rows_per_tile).clamp(max=R),
                    ranges[:, 0][None, :].expand(n_r, n_e),
                    ranges[:, 1][None, :].expand(n_r, n_e),
                    i,
                    j,
                    torch.zeros(n_r, n_e, **i64),
                ],
                2,
            )
            tiles.append(block.reshape(-1, TILE_FIELDS))
        n_e_of[t], n_r_of[t], pieces_of[t] = n_e, n_r, pieces
        row_base[t] = lookup_size
        lookup_size += R
        if has_cols[t]:
            col_base[t] = lookup_size
            lookup_size += C
        tensors.append([R, L, K, row_base[t], col_base[t], n_r, pieces, C])
    tiles = torch.cat(tiles) if tiles else torch.empty(0, TILE_FIELDS, **i64)

    segment_offsets = [0]
    for size in segment_sizes:
        segment_offsets.append(segment_offsets[-1] + size)
    G = segment_offsets[-1]
    group_segment = torch.repeat_interleave(torch.arange(S, **i64), torch.tensor(segment_sizes, **i64))

    def contributions(t: int, dim: int) -> int:
        return n_e_of[t] if dim == 0 else n_r_of[t] * pieces_of[t]

    # A member's slice start + k belongs to group g0 + k // width: it touches the `count // width` groups
    # from g0, each with `width` slices of `contributions` each.
    group_count = torch.zeros(G, **i64)
    for t, dim, start, count, seg, seg_start, width in members:
        g0 = segment_offsets[seg] + seg_start
        group_count[g0 : g0 + count // width] += width * contributions(t, dim)
    shared = group_count >= 2
    slot_begin = torch.zeros(G + 1, **i64)
    torch.cumsum(torch.where(shared, group_count, 0), 0, out=slot_begin[1:])
    fill = slot_begin[:-1].clone()
    lookup_group = torch.full((lookup_size,), -1, **i64)
    lookup_slot = torch.full((lookup_size,), -1, **i64)
    for t, dim, start, count, seg, seg_start, width in members:
        c = contributions(t, dim)
        first = (row_base[t] if dim == 0 else col_base[t]) + start
        taken = (lookup_group[first : first + count] != -1).nonzero()
        if taken.numel():
            raise ValueError(
                f"catalyst_fused: slice {start + int(taken[0])} of weights[{t}] along dim {dim} is used by more than one "
                "plan member"
            )
        g0 = segment_offsets[seg] + seg_start
        k = torch.arange(count, **i64)
        g = g0 + k // width
        lookup_group[first : first + count] = g
        lookup_slot[first : first + count] = torch.where(shared[g], fill[g] + (k % width) * c, -1)
        fill[g0 : g0 + count // width] += width * c
    zero_groups = (group_count == 0).nonzero().reshape(-1)

    sections = [
        ("tensors", torch.tensor(tensors, **i64).reshape(-1)),
        ("tiles", tiles.reshape(-1)),
        ("segment_offsets", torch.tensor(segment_offsets, **i64)),
        ("slot_begin", slot_begin),
        ("group_segment", group_segment),
        ("lookup_group", lookup_group),
        ("lookup_slot", lookup_slot),
        ("zero_groups", zero_groups),
    ]
    offsets, position = {}, HEADER
    for name, section in sections:
        offsets[name] = position
        position += section.numel()
    num_slots = int(slot_begin[G])
    header = torch.zeros(HEADER, **i64)
    for k, v in {
        H_NUM_TILES: tiles.shape[0],
        H_GROUPS: G,
        H_SEGMENTS: S,
        H_TENSORS: T,
        H_ZERO: zero_groups.numel(),
        H_SLOTS: num_slots,
        H_TENSORS_OFF: offsets["tensors"],
        H_TILES_OFF: offsets["tiles"],
        H_SEGOFF_OFF: offsets["segment_offsets"],
        H_SLOT_BEGIN_OFF: offsets["slot_begin"],
        H_GROUP_SEG_OFF: offsets["group_segment"],
        H_LOOKUP_GROUP_OFF: offsets["lookup_group"],
        H_LOOKUP_SLOT_OFF: offsets["lookup_slot"],
        H_ZERO_OFF: offsets["zero_groups"],
        H_TILE: tile,
        H_WORDS: position,
    }.items():
        header[k] = v
    words = torch.cat([header] + [section for _, section in sections])
    return TableInfo(words, tiles.shape[0], G, S, T, num_slots, tile, offsets)
