"""Argument checks for the Python-side paths (the reference backend, layouts, init).

The C++ operators run the same checks themselves (csrc/plan.cpp), with the same wording, so that a
direct ``torch.ops.catalyst_fused`` call is as safe as the public functions.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch


def comma_items(text) -> list[str]:
    """The items of a comma-separated option (``"a, b,,c"``) or of a sequence, stripped, empty ones dropped."""
    raw = text.split(",") if isinstance(text, str) else list(text)
    return [s for s in (str(x).strip() for x in raw) if s]


def check_choices(items: Sequence[str], choices: Sequence[str], where: str, what: str, note: str = "") -> None:
    """Raises a ValueError naming ``where`` for items that are not among ``choices``."""
    unknown = [s for s in items if s not in choices]
    if unknown:
        raise ValueError(f"{where}: unknown {what}(s) {', '.join(map(repr, unknown))}; choose from {', '.join(choices)} "
                         f"(comma-separated{note})")


def as_tensor_list(values, name: str) -> list[torch.Tensor]:
    if isinstance(values, torch.Tensor):
        raise TypeError(f"catalyst_fused: {name} must be a sequence of tensors, got a single tensor; wrap it in a list")
    try:
        out = list(values)
    except TypeError:
        raise TypeError(f"catalyst_fused: {name} must be a sequence of tensors, got {type(values).__name__}") from None
    if not out:
        raise ValueError(f"catalyst_fused: {name} must be a non-empty sequence of tensors")
    for i, v in enumerate(out):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"catalyst_fused: {name}[{i}] must be a torch.Tensor, got {type(v).__name__}")
    return out


def check_penalty_args(weights: Sequence[torch.Tensor], catalysts: Sequence[torch.Tensor], per_row: bool) -> None:
    """Same rules and messages as csrc/plan.cpp (contiguity excepted: the reference takes any strides)."""
    if not weights:
        raise ValueError("catalyst_fused: weights must be a non-empty sequence of tensors")
    if not catalysts:
        raise ValueError("catalyst_fused: catalysts must be a non-empty sequence of tensors")
    first = weights[0]
    if not first.is_floating_point():
        raise TypeError(f"catalyst_fused: weights[0] must be a floating-point tensor, got {first.dtype}")
    for i, w in enumerate(weights):
        if w.dtype != first.dtype:
            raise TypeError(
                f"catalyst_fused: weights[{i}] has dtype {w.dtype} but weights[0] has dtype {first.dtype}; "
                "all weights and catalysts must share one dtype"
            )
        if w.device != first.device:
            raise ValueError(f"catalyst_fused: weights[{i}] is on {w.device} but weights[0] is on {first.device}")
        if w.dim() < 1:
            raise ValueError(
                f"catalyst_fused: weights[{i}] must have at least one dimension (channels along dim 0), got a 0-d tensor"
            )
    for i, d in enumerate(catalysts):
        if d.dtype != first.dtype:
            raise TypeError(
                f"catalyst_fused: catalysts[{i}] has dtype {d.dtype} but weights[0] has dtype {first.dtype}; "
                "all weights and catalysts must share one dtype"
            )
        if d.device != first.device:
            raise ValueError(f"catalyst_fused: catalysts[{i}] is on {d.device} but weights[0] is on {first.device}")
        if d.dim() != 1:
            raise ValueError(f"catalyst_fused: catalysts[{i}] must be 1-D, got shape {tuple(d.shape)}")
    if per_row:
        if len(weights) != len(catalysts):
            raise ValueError(
                f"catalyst_fused: got {len(weights)} weights but {len(catalysts)} catalysts; "
                "the per-row layout needs one catalyst vector per weight"
            )
        for i, (w, d) in enumerate(zip(weights, catalysts)):
            if d.numel() != w.shape[0]:
                raise ValueError(
                    f"catalyst_fused: catalysts[{i}] has {d.numel()} entries but weights[{i}] has {w.shape[0]} "
                    f"channels (dim 0 of shape {tuple(w.shape)})"
                )


def _is_fake(t: torch.Tensor) -> bool:
    """A tensor without readable data (FakeTensor under torch.compile / opcheck, or a meta tensor)."""
    if t.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return is_fake(t)


MEMBER_COLUMNS = 7  # csrc/penalty_math.h MemberColumn


def check_plan(weights: Sequence[torch.Tensor], catalysts: Sequence[torch.Tensor], plan) -> None:
    """The member table checks of csrc/plan.cpp (same messages), for the fake functions and Python backends.
    Values are checked only when the table has data (not under fake tensors)."""
    if plan is None:
        check_penalty_args(weights, catalysts, per_row=True)
        return
    check_penalty_args(weights, catalysts, per_row=False)
    if plan.dtype != torch.int64 or plan.dim() != 2 or plan.shape[1] != MEMBER_COLUMNS or plan.device.type not in ("cpu", "meta"):
        raise ValueError(
            f"catalyst_fused: plan must be a contiguous int64 CPU tensor of shape [members, {MEMBER_COLUMNS}] (build it "
            f"with catalyst_fused.GroupLayout), got {plan.dtype} {tuple(plan.shape)} on {plan.device}"
        )
    if _is_fake(plan):
        return
    for i, (t, dim, start, count, seg, seg_start, width) in enumerate(plan.tolist()):
        if not 0 <= t < len(weights):
            raise ValueError(f"catalyst_fused: plan member {i} refers to weights[{t}] but only {len(weights)} weights were given")
        shape = tuple(weights[t].shape)
        if dim not in (0, 1):
            raise ValueError(f"catalyst_fused: plan member {i} has dim {dim}; only 0 (rows) and 1 (input columns) are supported")
        if dim >= len(shape):
            raise ValueError(f"catalyst_fused: plan member {i} slices weights[{t}] along dim {dim} but it has shape {list(shape)}")
        size = shape[dim]
        if not (start >= 0 and count >= 0 and start + count <= size):
            raise ValueError(
                f"catalyst_fused: plan member {i} takes {count} slices from index {start} of weights[{t}] along dim {dim} "
                f"but that dim has size {size}"
            )
        if width < 1 or count % width:
            raise ValueError(f"catalyst_fused: plan member {i} has width {width}; it must be >= 1 and divide its slice count {count}")
        if not 0 <= seg < len(catalysts):
            raise ValueError(f"catalyst_fused: plan member {i} refers to catalysts[{seg}] but only {len(catalysts)} catalysts were given")
        groups = catalysts[seg].shape[0]
        if not (seg_start >= 0 and seg_start + count // width <= groups):
            raise ValueError(
                f"catalyst_fused: plan member {i} maps to {count // width} groups from group {seg_start} of catalysts[{seg}] "
                f"which has {groups} entries"
            )


NAN_POLICIES = ("propagate", "raise")


def check_nan_policy(nan_policy: str) -> None:
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"catalyst_fused: nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")


def raise_if_not_finite(catalysts, norms: torch.Tensor, segment_sizes) -> None:
    """nan_policy='raise': names the first catalyst segment whose norms or catalysts are NaN/Inf.

    One device synchronisation per call when everything is finite (a single reduction over all norms and
    catalysts); locating the offending entry for the message costs more, but only on the way to the error.
    """
    flat = torch.cat([d.detach().reshape(-1).to(norms.dtype) for d in catalysts] + [norms.reshape(-1)])
    if bool(torch.isfinite(flat).all()):
        return
    offset = 0
    for s, size in enumerate(segment_sizes):
        n = norms[offset : offset + size]
        if not bool(torch.isfinite(n).all()):
            j = int((~torch.isfinite(n)).nonzero()[0])
            raise ValueError(
                f"catalyst_fused: group {j} of segment {s} has a non-finite norm ({float(n[j])}): "
                "the weights feeding it contain NaN or Inf"
            )
        if not bool(torch.isfinite(catalysts[s]).all()):
            j = int((~torch.isfinite(catalysts[s])).nonzero()[0])
            raise ValueError(f"catalyst_fused: catalysts[{s}][{j}] is {float(catalysts[s][j])}")
        offset += size


def check_scale(scale) -> float:
    """``scale`` of the in-place call as a float: a finite real number (or a one-element tensor holding one)."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.dtype.is_complex or scale.dtype == torch.bool:
            raise TypeError(f"catalyst_fused: scale must be a real number, got a tensor of shape {tuple(scale.shape)}")
        value = float(scale)
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        value = float(scale)
    else:
        raise TypeError(f"catalyst_fused: scale must be a real number, got {type(scale).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"catalyst_fused: scale must be finite, got {value}")
    return value


def check_distinct(**lists: Sequence[torch.Tensor]) -> None:
    """No two tensors share memory (a tied weight or a catalyst listed twice): their gradients would be
    written twice, racing on a GPU. The same rule as csrc/plan.cpp check_distinct, for the Python backends;
    spans are compared, so two disjoint interleaved views of one tensor also count as sharing."""
    spans = []
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if t is None or t.numel() == 0 or _is_fake(t):
                continue
            extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
            begin = t.data_ptr()
            spans.append((begin, begin + extent * t.element_size(), f"{name}[{i}]", t.device))
    spans.sort(key=lambda s: (str(s[3]), s[0]))
    # Sorted by start, two spans overlap only if some neighbouring pair does.
    for (b0, e0, n0, dev0), (b1, e1, n1, dev1) in zip(spans, spans[1:]):
        if dev0 == dev1 and b1 < e0:
            raise ValueError(
                f"catalyst_fused: {n0} and {n1} share memory (a tied weight or a tensor listed twice?); each tensor "
                "may appear once, or two gradient writers would race"
            )


def check_leaf(tensors: Sequence[torch.Tensor], name: str) -> list[int]:
    """Indices of the tensors that get a gradient from the in-place call: those that require grad. Each of
    them must be a leaf tensor, because only leaves keep ``.grad``."""
    selected = []
    for i, t in enumerate(tensors):
        if not t.requires_grad:
            continue
        if not t.is_leaf:
            raise ValueError(
                f"catalyst_fused: {name}[{i}] requires grad but is not a leaf tensor (it is the result of an "
                "operation, e.g. a view or a product): penalty_ writes into .grad, which only leaf tensors keep. "
                "Pass the parameter itself, or use catalyst_fused.penalty with autograd"
            )
        selected.append(i)
    return selected
