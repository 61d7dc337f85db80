"""Group layouts: which slices of which tensors form the channel groups of the Catalyst penalty.

The default (``layout=None`` everywhere) is the per-row layout: row ``i`` of ``weights[k]`` (its slice
along dim 0) is group ``i`` of ``catalysts[k]``. A :class:`GroupLayout` describes anything else once, so
that every training step reuses it:

    # group i = conv1 row i + bn1 gamma_i + bn1 beta_i + conv2 input column i
    layout = GroupLayout.build(
        [conv1.weight, bn1.weight, bn1.bias, conv2.weight],
        segments=[[Slices(0), Slices(1), Slices(2), Slices(3, dim=1)]],
    )
    catalysts = init_catalysts(weights, layout=layout)

A segment owns one catalyst vector; its members are :class:`Slices` of weights along dim 0 (rows) or dim 1
(input columns). Slice ``start + j`` of a member belongs to group ``offset + j // width`` of its segment
(``width`` consecutive slices per group, 1 by default: attention heads are ``width = head_dim`` rows of the
q/k/v projections and as many input columns of the output projection).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["Slices", "GroupLayout"]

# Column order of the member table shared with csrc/penalty_math.h (MemberColumn).
_TENSOR, _DIM, _START, _COUNT, _SEGMENT, _SEGMENT_START, _WIDTH = range(7)
MEMBER_COLUMNS = 7


@dataclass(frozen=True)
class Slices:
    """Slices ``[start, start + count)`` of ``weights[tensor]`` along ``dim`` (0: rows, 1: input columns),
    ``width`` consecutive slices per group: slice ``start + k`` belongs to group ``offset + k // width`` of
    the segment, so the member covers groups ``[offset, offset + count // width)``. ``count=None`` takes
    the rest of the dimension; ``count`` must be a multiple of ``width``."""

    tensor: int
    dim: int = 0
    start: int = 0
    count: Optional[int] = None
    offset: int = 0
    width: int = 1


class GroupLayout:
    """An immutable description of channel groups over a fixed list of weight shapes.

    Build it with :meth:`build` (from tensors) or the constructor (from shapes). ``member_table`` is the
    int64 ``[members, 7]`` tensor the operators take as ``plan``, one row per member with the columns
    ``tensor, dim, start, count, segment, segment_start, width`` (``segment_start`` is the member's
    ``offset``).
    """

    def __init__(self, shapes: Sequence[Sequence[int]], segments: Sequence[Sequence[Slices | tuple]]):
        self.shapes = tuple(tuple(_as_int(s, "shapes") for s in shape) for shape in shapes)
        if not self.shapes:
            raise ValueError("GroupLayout: shapes must name at least one weight")
        if not segments:
            raise ValueError("GroupLayout: segments must contain at least one segment")
        rows = []
        sizes = []
        for s, members in enumerate(segments):
            if not members:
                raise ValueError(f"GroupLayout: segments[{s}] has no members")
            size = 0
            for k, member in enumerate(members):
                m = member if isinstance(member, Slices) else Slices(*member)
                row = self._member_row(m, s, f"segments[{s}][{k}]")
                rows.append(row)
                size = max(size, row[_SEGMENT_START] + row[_COUNT] // row[_WIDTH])
            sizes.append(size)
        self.segment_sizes = tuple(sizes)
        self._sizes = [torch.Size(shape) for shape in self.shapes]  # what check compares weights' shapes with
        self._segment_shapes = [torch.Size((size,)) for size in sizes]
        # The same shapes for the C++ lean path of penalty_ (csrc/module.cpp layout_matches): [T, S, ndim and
        # sizes of every weight, size of every segment].
        key = [len(self.shapes), len(sizes)]
        for shape in self.shapes:
            key += [len(shape), *shape]
        self._shape_key = torch.tensor(key + sizes, dtype=torch.int64)
        # Checked before anything of a segment's size is allocated: a huge offset leaves groups uncovered.
        self._check_coverage(rows)
        self.member_table = torch.tensor(rows, dtype=torch.int64).reshape(-1, MEMBER_COLUMNS)
        # The same rows as Python ints: (tensor, dim, start, count, segment, segment_start, width).
        self.members = tuple(tuple(row) for row in rows)

    @classmethod
    def build(cls, weights: Sequence[torch.Tensor], segments: Sequence[Sequence[Slices | tuple]]) -> "GroupLayout":
        """A layout for these weights' shapes."""
        return cls([tuple(w.shape) for w in weights], segments)

    @classmethod
    def per_row(cls, weights: Sequence[torch.Tensor]) -> "GroupLayout":
        """The default layout written out: one segment per weight, its rows as groups."""
        return cls.build(weights, [[Slices(i)] for i in range(len(weights))])

    @property
    def num_weights(self) -> int:
        return len(self.shapes)

    @property
    def num_segments(self) -> int:
        return len(self.segment_sizes)

    @property
    def num_groups(self) -> int:
        return sum(self.segment_sizes)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Splits a per-group vector (norms, ratios) into one view per segment."""
        return list(torch.split(flat, self.segment_sizes))

    def check(self, weights: Sequence[torch.Tensor], catalysts: Sequence[torch.Tensor]) -> None:
        """Raises ValueError if these tensors do not have the shapes the layout was built for."""
        if len(weights) != self.num_weights:
            raise ValueError(f"layout was built for {self.num_weights} weights, got {len(weights)}")
        if len(catalysts) != self.num_segments:
            raise ValueError(f"layout has {self.num_segments} segments (one catalyst each), got {len(catalysts)} catalysts")
        if [w.shape for w in weights] == self._sizes and [d.shape for d in catalysts] == self._segment_shapes:
            return  # the common case, without a Python loop per tensor (this runs on every penalty call)
        for i, (w, shape) in enumerate(zip(weights, self.shapes)):
            if tuple(w.shape) != shape:
                raise ValueError(
                    f"weights[{i}] has shape {tuple(w.shape)} but the layout was built for {shape}; "
                    "build a new GroupLayout after changing a model"
                )
        for s, (d, size) in enumerate(zip(catalysts, self.segment_sizes)):
            if tuple(d.shape) != (size,):
                raise ValueError(f"catalysts[{s}] has shape {tuple(d.shape)} but segment {s} has {size} groups")

    def __repr__(self) -> str:
        return (
            f"GroupLayout(weights={self.num_weights}, segments={self.num_segments}, groups={self.num_groups}, "
            f"members={self.member_table.shape[0]})"
        )

    def _member_row(self, m: Slices, segment: int, where: str) -> list[int]:
        tensor = _as_int(m.tensor, f"{where}.tensor")
        dim = _as_int(m.dim, f"{where}.dim")
        start = _as_int(m.start, f"{where}.start")
        offset = _as_int(m.offset, f"{where}.offset")
        width = _as_int(m.width, f"{where}.width")
        if not 0 <= tensor < len(self.shapes):
            raise ValueError(f"GroupLayout: {where} refers to weights[{tensor}] but there are {len(self.shapes)} weights")
        shape = self.shapes[tensor]
        if dim not in (0, 1):
            raise ValueError(f"GroupLayout: {where} has dim={dim}; only 0 (rows) and 1 (input columns) are supported")
        if dim >= len(shape):
            raise ValueError(f"GroupLayout: {where} slices weights[{tensor}] of shape {shape} along dim {dim}")
        size = shape[dim]
        count = size - start if m.count is None else _as_int(m.count, f"{where}.count")
        if start < 0 or count < 0 or start + count > size:
            raise ValueError(
                f"GroupLayout: {where} takes slices [{start}, {start + count}) of weights[{tensor}] along "
                f"dim {dim}, which has size {size}"
            )
        if offset < 0:
            raise ValueError(f"GroupLayout: {where} has a negative offset {offset}")
        if width < 1:
            raise ValueError(f"GroupLayout: {where} has width={width}; it must be >= 1")
        if count % width:
            raise ValueError(
                f"GroupLayout: {where} takes {count} slices, which is not a multiple of its width {width}"
            )
        if offset + count // width > _INT64_MAX:
            raise ValueError(f"GroupLayout: {where} has offset {offset}, beyond any catalyst vector")
        return [tensor, dim, start, count, segment, offset, width]

    def _check_coverage(self, rows: list[list[int]]) -> None:
        """Every group of every segment has slices, no slice is used twice, every weight is used. Works on
        sorted intervals, so its cost does not depend on the sizes (a huge offset cannot allocate)."""
        covered: dict[int, list[tuple[int, int]]] = {s: [] for s in range(len(self.segment_sizes))}
        used: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for t, dim, start, count, seg, off, width in rows:
            if count:
                covered[seg].append((off, off + count // width))
                used.setdefault((t, dim), []).append((start, start + count))
            else:
                used.setdefault((t, dim), [])
        for (t, dim), intervals in used.items():
            intervals.sort()
            for (_, end), (start, _) in zip(intervals, intervals[1:]):
                if start < end:
                    raise ValueError(
                        f"GroupLayout: slices of weights[{t}] along dim {dim} are used by more than one member "
                        f"(slice {start})"
                    )
        for s, size in enumerate(self.segment_sizes):
            reached = 0  # groups [0, reached) are covered
            for begin, end in sorted(covered[s]):
                if begin > reached:
                    break
                reached = max(reached, end)
            if reached < size:
                raise ValueError(f"GroupLayout: group {reached} of segment {s} has no slices")
        unused = sorted(set(range(len(self.shapes))) - {t for t, _ in used})
        if unused:
            raise ValueError(f"GroupLayout: weights{unused} are not used by any segment")


_INT64_MAX = 2**63 - 1


def _as_int(value, what: str) -> int:
    """``value`` as a Python int (bools and floats are rejected, numpy / torch integers accepted)."""
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(f"GroupLayout: {what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"GroupLayout: {what} must be an integer, got {type(value).__name__}") from None
