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
(input columns). Slice ``start + j`` of a member belongs to group ``offset + j`` of its segment.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["Slices", "GroupLayout"]

# Column order of the member table shared with csrc/penalty_math.h (MemberColumn).
_TENSOR, _DIM, _START, _COUNT, _SEGMENT, _SEGMENT_START, _WIDTH = range(7)


@dataclass(frozen=True)
class Slices:
    """Slices ``[start, start + count)`` of ``weights[tensor]`` along ``dim`` (0: rows, 1: input columns),
    mapped onto groups ``[offset, offset + count)`` of their segment. ``count=None`` takes the rest of
    the dimension."""

    tensor: int
    dim: int = 0
    start: int = 0
    count: Optional[int] = None
    offset: int = 0
    # TEMPORARY (branch kernels-gpu, to be replaced by branch kernels-cpu's layout.py): `width`
    # consecutive slices per group; the table gets the 7th column only when some width is not 1.
    width: int = 1


class GroupLayout:
    """An immutable description of channel groups over a fixed list of weight shapes.

    Build it with :meth:`build` (from tensors) or the constructor (from shapes). ``member_table`` is the
    int64 ``[members, 6]`` tensor the operators take as ``plan``.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], segments: Sequence[Sequence[Slices | tuple]]):
        self.shapes = tuple(tuple(int(s) for s in shape) for shape in shapes)
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
        columns = 7 if any(row[_WIDTH] != 1 for row in rows) else 6
        self.member_table = torch.tensor([row[:columns] for row in rows], dtype=torch.int64).reshape(-1, columns)
        self._check_coverage(rows)

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
        if not 0 <= m.tensor < len(self.shapes):
            raise ValueError(f"GroupLayout: {where} refers to weights[{m.tensor}] but there are {len(self.shapes)} weights")
        shape = self.shapes[m.tensor]
        if m.dim not in (0, 1):
            raise ValueError(f"GroupLayout: {where} has dim={m.dim}; only 0 (rows) and 1 (input columns) are supported")
        if m.dim >= len(shape):
            raise ValueError(f"GroupLayout: {where} slices weights[{m.tensor}] of shape {shape} along dim {m.dim}")
        size = shape[m.dim]
        count = size - m.start if m.count is None else m.count
        if m.start < 0 or count < 0 or m.start + count > size:
            raise ValueError(
                f"GroupLayout: {where} takes slices [{m.start}, {m.start + count}) of weights[{m.tensor}] along "
                f"dim {m.dim}, which has size {size}"
            )
        if m.offset < 0:
            raise ValueError(f"GroupLayout: {where} has a negative offset {m.offset}")
        if m.width < 1 or count % m.width:
            raise ValueError(f"GroupLayout: {where} has width={m.width}; it must be >= 1 and divide its count {count}")
        return [m.tensor, m.dim, m.start, count, segment, m.offset, m.width]

    def _check_coverage(self, rows: list[list[int]]) -> None:
        covered = [torch.zeros(size, dtype=torch.bool) for size in self.segment_sizes]
        used = {}  # (tensor, dim) -> bool mask of slices already taken
        for row in rows:
            t, dim, start, count, seg, off, width = row
            covered[seg][off : off + count // width] = True
            mask = used.setdefault((t, dim), torch.zeros(self.shapes[t][dim], dtype=torch.bool))
            if mask[start : start + count].any():
                raise ValueError(f"GroupLayout: slices of weights[{t}] along dim {dim} are used by more than one member")
            mask[start : start + count] = True
        for s, c in enumerate(covered):
            if not c.all():
                missing = int((~c).nonzero()[0])
                raise ValueError(f"GroupLayout: group {missing} of segment {s} has no slices")
        unused = sorted(set(range(len(self.shapes))) - {t for t, _ in used})
        if unused:
            raise ValueError(f"GroupLayout: weights{unused} are not used by any segment")
