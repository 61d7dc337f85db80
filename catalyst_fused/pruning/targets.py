"""Finding the prunable channels of a model and expressing them as Catalyst groups.

Coupled channels come from Torch-Pruning's ``DependencyGraph`` (``torch-pruning==1.6.1``, pinned): it traces
one forward pass of the model and, for every layer whose output channels can be removed, returns the
*pruning group* of those channels: every layer slice that must go with channel ``i``, across residual
additions and concatenations. The same forward pass is recorded call by call (:mod:`.tracing`) and the
channels are followed through it: every operation they pass must keep them apart, and the layers the
tracking reaches must be the ones DepGraph lists. A group becomes one :class:`Target` with

* ``producers``: what creates the channels: ``Linear``/convolution output rows (weight dim 0 and bias), the
  embedding dimension of an ``nn.Embedding`` (weight dim 1), the query/key/value rows of an attention
  module's packed projection (head targets); e.g. in a ResNet stage the stem or shortcut convolution *and*
  the last convolution of every block, whose outputs are added;
* ``bns``: BatchNorm entries (scale, shift, running statistics);
* ``consumers``: ``Linear``/convolution input columns (weight dim 1) that read them, and the embedding
  columns of an ``nn.MultiheadAttention``'s packed projection;
* ``channelwise``: depthwise convolutions the channels pass (their rows and biases: a depthwise
  convolution couples its input and output channel);
* ``norms``: ``nn.LayerNorm`` and RMSNorm entries (scale, shift) of layers normalising over the channels.
  **Removing such channels changes the normalisation statistics** (mean and variance are taken over fewer
  channels), so it is not exact even for channels that are entirely zero;
* ``params``: free parameters holding the channels (layer scales, a ViT's class token and position
  embedding), as :class:`ParamSlice`.

Each is a slice: indices ``[start, start + count)`` of one module along the role's axis, ``width``
consecutive indices per channel, covering channels ``[offset, offset + count // width)`` of the target (a
channel concatenation puts a producer's channels at an offset of its consumer's columns; a flattened
``C x H x W`` map gives each channel ``H * W`` consecutive input columns of the ``Linear`` reading it). A
target is keyed everywhere by ``name``, its first producer in ``model.named_modules()`` order.

**Grouped convolutions** (``1 < groups``, not depthwise) keep the same number of channels in every group, so
the unit that can go is one *position* in every group: a target whose channels feed a grouped convolution
with ``F`` input channels per group has ``F`` channels, channel ``j`` being the original channels ``j, F + j,
2F + j, ...`` (the same for a grouped convolution's own output channels, ``F`` per group); its slices are
repeated once per group. **Attention heads** (:mod:`.attention`) are targets of their own: one channel is a
head (with grouped-query attention, a key/value head with its query heads); ``attention`` names the module
whose head counts follow a removal, ``head_dim`` is the rows per head.

A group is **excluded** (listed with its reason by ``find_targets(..., return_excluded=True)``) when its
channels are a model output, when they pass an operation the tracking cannot follow (a split, a reduction or
softmax over them, an unknown function, a reshape that interleaves them: see :mod:`.tracing`), when they
reach a layer kind not listed above (GroupNorm, PReLU, RNNs, transposed convolutions, a parameter shared by
two modules), when the tracking and DepGraph disagree, or when DepGraph's own search for it runs past its
time limit.

Analysis is bounded (:mod:`.limits`): ``find_targets`` stops with an :class:`~.limits.AnalysisLimitError`
past ``time_limit`` seconds or ``memory_limit`` bytes of memory growth, and a single group whose search runs
past ``group_time_limit`` is excluded with that reason.

Modes (catalyst-method.md section 1):

* ``"group"``: every coupled slice (producer rows and biases, BN ``gamma_i, beta_i``, depthwise rows, norm
  entries, consumer input columns, free parameters along dim 0 or 1) in one ``cf.GroupLayout`` segment per
  target. Free parameters whose channels lie along a later dimension (a ViT's class token and position
  embedding) are removed with their group but are not part of its norm.
* ``"bn"``: group ``i`` = the scales ``gamma_i`` **and shifts** ``beta_i`` of every BN of the target; targets
  without BatchNorm are left out. **[our reading]** The paper's BN mode regularises ``gamma_i``; we include
  ``beta_i`` (``bn_beta=True``, the default) so that a pruned channel's BN output is ~0 and removing it
  leaves the network's function unchanged. ``bn_beta=False`` gives the pure gamma-only BN mode, whose
  removal leaves the constant ``relu(beta_i)`` unaccounted for.
* ``"filter"``: group ``i`` = row ``W[i]`` (plus ``bias[i]``) of every producer.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Optional

import torch
import torch_pruning as tp
from torch import nn

from ..layout import GroupLayout, Slices
from .attention import AttentionSite, find_attention
from .layers import axis_size, axis_tensors, describe, is_depthwise
from .limits import AnalysisLimitError, bounded
from .tracing import Trace, follow, is_rms_norm, record

__all__ = ["MODES", "ModuleSlice", "NormSlice", "ParamSlice", "Target", "find_targets", "TargetSet", "build_target_set",
           "example_batch", "run_example", "AnalysisLimitError"]

MODES = ("bn", "filter", "group")

_OPTYPE = tp.ops.OPTYPE
_CONV_ROOTS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class _ChannelCount:
    """``channels`` of a slice: its ``count`` indices in groups of ``width``."""

    @property
    def channels(self) -> int:
        return self.count // self.width


@dataclass(frozen=True)
class ModuleSlice(_ChannelCount):
    """Indices ``[start, start + count)`` of module ``module`` (a name in ``model.named_modules()``) along the
    axis its role prunes, ``width`` consecutive indices per channel: index ``start + k`` is channel
    ``offset + k // width`` of the target."""

    module: str
    start: int
    count: int
    offset: int = 0
    width: int = 1


@dataclass(frozen=True)
class NormSlice(ModuleSlice):
    """A :class:`ModuleSlice` of a LayerNorm / RMSNorm; ``axis``: the dimension of the module's input that
    holds the channels (-1 for ``nn.LayerNorm``, -3 for a channels-first ``LayerNorm2d``)."""

    axis: int = -1


@dataclass(frozen=True)
class ParamSlice(_ChannelCount):
    """Indices ``[start, start + count)`` of parameter ``param`` (a name in ``model.named_parameters()``)
    along ``dim``, ``width`` per channel, covering channels ``[offset, offset + count // width)``."""

    param: str
    dim: int
    start: int
    count: int
    offset: int = 0
    width: int = 1


@dataclass
class Target:
    """One group of coupled channels: ``channels`` channels, removed together from every slice listed (see
    the module docstring for the roles)."""

    name: str
    channels: int
    producers: list  # ModuleSlice: output rows (axis 0)
    bns: list  # ModuleSlice: BatchNorm entries
    consumers: list  # ModuleSlice: input columns (axis 1)
    channelwise: list = field(default_factory=list)  # ModuleSlice: depthwise convolutions
    norms: list = field(default_factory=list)  # NormSlice: LayerNorm / RMSNorm entries
    params: list = field(default_factory=list)  # ParamSlice: free parameters
    attention: Optional[str] = None  # head targets: the attention module whose head counts follow a removal
    head_dim: int = 0  # head targets: rows per head

    def module_slices(self):
        """``(slice, axis)`` of every module slice: axis 0 for producers, BNs, depthwise convolutions and
        norms, axis 1 for consumers."""
        for pieces, axis in ((self.producers, 0), (self.bns, 0), (self.channelwise, 0), (self.norms, 0), (self.consumers, 1)):
            for p in pieces:
                yield p, axis

    @property
    def exact(self) -> bool:
        """False when removing channels changes a normalisation's statistics (LayerNorm / RMSNorm entries)."""
        return not self.norms


def target_from_dict(d: Mapping) -> Target:
    """The :class:`Target` that ``dataclasses.asdict`` turned into ``d`` (a pruner's saved history)."""
    slices = {k: [ModuleSlice(**p) for p in d.get(k, [])] for k in ("producers", "bns", "consumers", "channelwise")}
    return Target(str(d["name"]), int(d["channels"]), **slices, norms=[NormSlice(**p) for p in d.get("norms", [])],
                  params=[ParamSlice(**p) for p in d.get("params", [])], attention=d.get("attention"),
                  head_dim=int(d.get("head_dim", 0)))


def _fit(item, size: int):
    """``(start, count, offset, width)`` when a DepGraph group item's indices are consecutive blocks of
    ``width`` indices per channel over consecutive channels, else None."""
    if any(r is None for r in item.root_idxs) or not item.idxs:
        return None
    pairs = sorted(zip(item.idxs, item.root_idxs))
    idxs = [i for i, _ in pairs]
    roots = [r for _, r in pairs]
    start, first = idxs[0], roots[0]
    if idxs != list(range(start, start + len(idxs))) or start < 0 or start + len(idxs) > size:
        return None
    width = next((k for k, r in enumerate(roots) if r != first), len(roots))
    if len(roots) % width or any(r != first + k // width for k, r in enumerate(roots)):
        return None
    return start, len(idxs), first, width


class _Analysis:
    """What one find_targets call knows about the model: names, the trace, DepGraph, per-layer outputs."""

    def __init__(self, model: nn.Module, dg, trace: Trace, groups_inputs=None):
        self.model = model
        self.dg = dg
        self.trace = trace
        self.names = {m: n for n, m in model.named_modules()}
        self.modules = dict(model.named_modules())
        self.order = {n: i for i, n in enumerate(self.modules)}
        self.param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        owners: dict = {}
        for name, mod in model.named_modules(remove_duplicate=False):
            for _, p in mod.named_parameters(recurse=False):
                owners.setdefault(id(p), set()).add(name)
        self.shared = {pid for pid, names in owners.items() if len(names) > 1}
        self.outputs_of: dict = {}  # layer -> [(tensor key, channel dim)] of its outputs in the trace
        self.called: set = set()
        for call in trace.calls:
            if call.name in ("linear", "conv1d", "conv2d", "conv3d", "embedding"):
                w = call.arg(1, "weight")
                pname = call.params.get(getattr(w, "index", None))
                if pname is not None:
                    owner = pname.rpartition(".")[0]
                    self.called.add(owner)
                    dim = -1 if call.name in ("linear", "embedding") else -(int(call.name[-2]) + 1)
                    self.outputs_of.setdefault(owner, []).append((call.outputs[0][0], dim))
            elif call.name == "module:MultiheadAttention" or (call.name.startswith("module:") and isinstance(
                    self.modules.get(call.module), nn.MultiheadAttention)):
                self.called.add(call.module)
                self.outputs_of.setdefault(call.module + ".out_proj", []).append((call.outputs[0][0], -1))

    def key(self, name: str) -> int:
        return self.order.get(name, self.order.get(name.rpartition(".")[0], len(self.order)))


def _add(pieces: list, piece) -> None:
    if piece not in pieces:
        pieces.append(piece)


def _group_to_target(an: _Analysis, group):
    """A :class:`Target` for a DepGraph group, or the reason it is excluded (a string)."""
    dg = an.dg
    roles = {"producers": [], "bns": [], "consumers": [], "channelwise": [], "norms": [], "params": []}
    grouped = {}  # (module, axis) -> channels per group
    attention_in = set()
    channels = len(group[0].idxs)
    output = False
    for item in group:
        node = item.dep.target
        module = node.module
        out = dg.is_out_channel_pruning_fn(item.dep.handler)
        if node.type == _OPTYPE.OUTPUT:
            output = True
            continue
        if isinstance(module, nn.Parameter):
            pname = an.param_names.get(id(module))
            if pname is None:
                return "a parameter outside the model holds the channels"
            owner_name = pname.rpartition(".")[0]
            owner = an.modules.get(owner_name)
            if owner is not None and is_rms_norm(owner) and pname.endswith(".weight"):
                fit = _fit(item, axis_size(owner, 0))
                if fit is None:
                    return f"the indices of {owner_name} are not a block pattern of the channels"
                _add(roles["norms"], ModuleSlice(owner_name, *fit))
            else:
                dim = int(node.pruning_dim)
                fit = _fit(item, module.shape[dim])
                if fit is None:
                    return f"the indices of parameter {pname} are not a block pattern of the channels"
                _add(roles["params"], ParamSlice(pname, dim, *fit))
            continue
        if module not in an.names:
            continue  # an operation: the channel tracking checks it
        name = an.names[module]
        kind = describe(module)
        if kind is None:
            return f"{name} is a {type(module).__name__}, which is not mapped"
        if kind == "attention":
            fit = _fit(item, module.embed_dim)
            if fit is None:
                return f"the indices of {name} are not a block pattern of the channels"
            _add(roles["consumers"], ModuleSlice(name, *fit))
            _add(roles["producers"], ModuleSlice(name + ".out_proj", *fit))
            attention_in.add(name)
            continue
        if kind == "batchnorm":
            role, axis = "bns", 0
        elif kind == "norm":
            role, axis = "norms", 0
        elif kind == "embedding":
            role, axis = "producers", 0
        elif kind == "conv" and is_depthwise(module):
            role, axis = "channelwise", 0
        else:
            role, axis = ("producers", 0) if out else ("consumers", 1)
            if kind == "conv" and module.groups > 1:
                grouped[(name, axis)] = (module.out_channels if axis == 0 else module.in_channels) // module.groups
        size = module.in_channels if (name, axis) in grouped and axis == 1 else axis_size(module, axis)
        fit = _fit(item, size)
        if fit is None:
            return f"the indices of {name} are not a block pattern of the channels"
        _add(roles[role], ModuleSlice(name, *fit))
    producers = roles["producers"]
    as_output = "its channels are a model output" + (f" ({sorted(p.module for p in producers)[0]})" if producers else "")
    if output:
        return as_output
    if not producers and not roles["params"]:
        return "no layer produces these channels (they come from the model input)"

    # follow the channels through the recorded forward pass from every source
    sources = {}
    for p in producers:
        outs = an.outputs_of.get(p.module)
        if not outs:
            return f"{p.module} is not called in the traced forward pass"
        for key, dim in outs:
            sources[key] = (dim, 1)
    for prm in roles["params"]:
        param = an.model.get_parameter(prm.param)
        sources[("leaf", id(param))] = (prm.dim - param.dim(), 1)
    try:
        flow = follow(an.trace, an.modules, sources)
    except ValueError as exc:
        return str(exc)
    if flow.outputs:
        return as_output
    consumers = {p.module for p in roles["consumers"] if p.module not in attention_in}
    checks = (("consumers", consumers, set(flow.consumers)), ("attention inputs", attention_in, flow.attention_inputs),
              ("BatchNorms", {b.module for b in roles["bns"]}, flow.bns),
              ("norms", {n.module for n in roles["norms"]}, set(flow.norms)),
              ("depthwise convolutions", {c.module for c in roles["channelwise"]}, flow.depthwise))
    for what, ours, theirs in checks:
        if ours != theirs:
            diff = sorted(ours ^ theirs)
            return f"the channel tracking and DepGraph disagree on the {what} ({', '.join(diff)})"
    for p in roles["consumers"]:
        if p.module in flow.consumers and p.width != flow.consumers[p.module]:
            return f"the channel tracking and DepGraph disagree on the columns per channel of {p.module}"
    roles["norms"] = [NormSlice(n.module, n.start, n.count, n.offset, n.width, axis=flow.norms[n.module] or -1)
                      for n in roles["norms"]]

    for (name, axis), per_group in grouped.items():
        if axis == 1 and flow.grouped.get(name, (None,))[0] != an.modules[name].in_channels:
            return f"the channel tracking and DepGraph disagree on grouped convolution {name}"
    if grouped:
        folded = _fold(roles, grouped, channels)
        if isinstance(folded, str):
            return folded
        channels = folded

    def by_position(pieces):
        return sorted(pieces, key=lambda p: (an.key(getattr(p, "module", None) or p.param), p.offset, p.start))

    target = Target("", channels, by_position(roles["producers"]), by_position(roles["bns"]), by_position(roles["consumers"]),
                    by_position(roles["channelwise"]), by_position(roles["norms"]), by_position(roles["params"]))
    shared = _shared(an, target)
    if shared:
        return shared
    first = target.producers[0].module if target.producers else target.params[0].param
    target.name = first
    return target


def _fold(roles: dict, grouped: dict, channels: int):
    """Rewrites the slices of a target with grouped convolutions to one channel per position in a group;
    returns the new channel count or the reason it cannot."""
    sizes = set(grouped.values())
    if len(sizes) != 1:
        return f"grouped convolutions with different channels per group ({sorted(sizes)}) share these channels"
    per_group = sizes.pop()
    if per_group == 1:
        names = ", ".join(sorted(n for n, _ in grouped))
        return (f"grouped convolution {names} has one channel per group (a depthwise channel multiplier): these "
                "channels can only go with whole groups")
    if channels % per_group:
        return f"{channels} channels are not whole groups of {per_group}"
    for role in ("producers", "bns", "consumers", "channelwise", "norms", "params"):
        new = []
        for p in roles[role]:
            if role == "consumers" and (p.module, 1) in grouped:
                if (p.start, p.count, p.offset, p.width) != (0, channels, 0, 1):
                    return f"grouped convolution {p.module} reads only part of the channels"
                new.append(ModuleSlice(p.module, 0, per_group, 0))
                continue
            if p.width != 1:
                return "a flattened map and a grouped convolution share these channels"
            a, end = p.offset, p.offset + p.count
            while a < end:
                b = min((a // per_group + 1) * per_group, end)
                new.append(replace(p, start=p.start + a - p.offset, count=b - a, offset=a % per_group))
                a = b
        roles[role] = new
    return per_group


def _shared(an: _Analysis, t: Target) -> Optional[str]:
    """The reason a target cannot be pruned because one of its tensors belongs to two modules (tied weights)."""
    for p, axis in t.module_slices():
        mod = an.modules[p.module]
        for attr, _ in axis_tensors(mod, axis) if describe(mod) else []:
            if id(getattr(mod, attr)) in an.shared:
                return f"{p.module}.{attr} is shared with another module (tied weights), which is not mapped"
    for prm in t.params:
        if id(an.model.get_parameter(prm.param)) in an.shared:
            return f"parameter {prm.param} is shared with another module (tied weights), which is not mapped"
    return None


def _head_target(an: _Analysis, site: AttentionSite):
    """The :class:`Target` of an attention module's heads, or the reason it is excluded."""
    for m in site.projections + ([] if site.kind == "multihead" else [site.out]):
        if m not in an.called:
            return f"{m} is not called in the traced forward pass (attention heads of {site.module})"
    producers = [ModuleSlice(m, start, rows, 0, width) for m, start, rows, width in site.qkv]
    consumers = [ModuleSlice(site.out, 0, site.heads * site.head_dim, 0, site.qkv[0][3])]
    t = Target(producers[0].module, site.kv_heads, producers, [], consumers, attention=site.module, head_dim=site.head_dim)
    return _shared(an, t) or t


def example_batch(model: nn.Module, example_inputs):
    """The example inputs a trace feeds ``model``: a tensor, a tuple/list of positional tensors or a dict of
    keyword tensors as given, or, for a sequence of positive ints (one sample's shape), a zero batch of one
    sample on the model's device and dtype.

    Raises:
        ValueError: for anything else (an empty or non-positive shape, a non-tensor input).
    """
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs
    if isinstance(example_inputs, dict):
        if not example_inputs:
            raise ValueError("example_inputs: an empty dict")
        return example_inputs
    if isinstance(example_inputs, (tuple, list, torch.Size)) and example_inputs and all(
            isinstance(s, int) and not isinstance(s, bool) for s in example_inputs):
        shape = tuple(example_inputs)
        if not all(s > 0 for s in shape):
            raise ValueError(f"example_inputs / input_shape: a sample shape must be positive ints, got {shape}")
        ref = next(model.parameters(), None)
        return torch.zeros(1, *shape, device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise ValueError(
        "example_inputs / input_shape must be a tensor (a batch), a tuple of tensors, a dict of tensors, or one "
        f"sample's shape as a sequence of positive ints; got {example_inputs!r}"
    )


def run_example(model: nn.Module, example):
    """``model`` applied to an :func:`example_batch` result."""
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, tuple):
        return model(*example)
    return model(example)


def run_example_observed(model: nn.Module, example_inputs, handles) -> None:
    """One no-grad, eval-mode forward of ``example_inputs`` for the hooks behind ``handles`` to observe; the
    hooks are removed and every module's training flag restored afterwards, also on error."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            run_example(model, example_batch(model, example_inputs))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training


def _ignored_names(model: nn.Module, ignored_layers) -> set:
    """Names of every module in or under ``ignored_layers`` (modules or names of ``model``)."""
    if not ignored_layers:
        return set()
    modules = dict(model.named_modules())
    by_id = {id(m): n for n, m in modules.items()}
    roots = []
    for k, layer in enumerate(ignored_layers):
        if isinstance(layer, str):
            if layer not in modules:
                raise ValueError(f"ignored_layers[{k}]: {layer!r} is not a module of the model")
            roots.append(layer)
        elif isinstance(layer, nn.Module):
            if id(layer) not in by_id:
                raise ValueError(f"ignored_layers[{k}]: a {type(layer).__name__} that is not part of the model")
            roots.append(by_id[id(layer)])
        else:
            raise ValueError(f"ignored_layers[{k}]: expected an nn.Module of the model or its name, got {type(layer).__name__}")
    names = set()
    for name in modules:
        if any(name == r or r == "" or name.startswith(r + ".") for r in roots):
            names.add(name)
    return names




def _roots(an: _Analysis, skip: set):
    """DepGraph's groups rooted at every layer whose outputs are not in an earlier group (Torch-Pruning's
    ``get_all_groups`` loop, one root at a time so that each can be bounded): ``(root name, thunk)``."""
    dg = an.dg
    visited: set = set()
    for m in list(dg.module2node):
        if not isinstance(m, _CONV_ROOTS) or m in visited or m not in an.names or an.names[m] in skip:
            continue
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        n = pruner.get_out_channels(m)

        def thunk(m=m, pruner=pruner, n=n):
            group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(n)))
            for it in group:
                if dg.is_out_channel_pruning_fn(it.dep.handler):
                    visited.add(it.dep.target.module)
            return group

        visited.add(m)
        yield an.names[m], thunk


def find_targets(model: nn.Module, example_inputs, *, return_excluded: bool = False, ignored_layers=None,
                 time_limit: Optional[float] = 900.0, memory_limit: Optional[float] = 8 * 2**30,
                 group_time_limit: Optional[float] = 60.0, verify: bool = True):
    """Every prunable group of coupled channels of ``model`` (see the module docstring), in the order of
    the targets' names in ``model.named_modules()``.

    Args:
        model: the network; it is traced once in eval mode (its train/eval flags are restored, its
            parameters and buffers are not changed).
        example_inputs: what ``model`` is called with for the trace: a batch tensor, a tuple of tensors, a
            dict of keyword tensors, or one sample's shape (e.g. ``(3, 32, 32)``).
        return_excluded: also return the excluded groups, as ``{"producers": [...], "reason": ...}``.
        ignored_layers: modules (or their names) whose output channels must not be pruned: a group with one
            of them (or a module inside one of them) as producer, BatchNorm, norm, depthwise convolution or
            parameter owner is excluded, as are the heads of an attention module inside one of them.
        time_limit: seconds the whole analysis may take (None: no limit).
        memory_limit: bytes the process's resident memory may grow by during the analysis (None: no limit).
        group_time_limit: seconds DepGraph's search for one group may take; a group past it (or past half of
            ``memory_limit``) is excluded with that reason and the analysis goes on (None: no limit).
        verify: remove one channel of every target from a copy of the model and check that it computes what
            the masked model does (:func:`~catalyst_fused.pruning.surgery.mask_model`) on random inputs of
            the example's shape; targets that fail (e.g. a width written in the forward code) are excluded.

    Raises:
        ValueError: for bad ``example_inputs``, ``ignored_layers`` or limits, or a model that DepGraph cannot
            trace.
        AnalysisLimitError: past ``time_limit`` or ``memory_limit`` (the message names the limit).
    """
    example = example_batch(model, example_inputs)
    ignored = _ignored_names(model, ignored_layers)
    for what, value in (("time_limit", time_limit), ("memory_limit", memory_limit), ("group_time_limit", group_time_limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"find_targets: {what} must be a positive number or None, got {value!r}")
    modes = {m: m.training for m in model.modules()}
    hint = "pass a larger time_limit / memory_limit to find_targets, or ignored_layers to leave a part of the model out"
    try:
        with bounded(f"find_targets on {type(model).__name__}", time_limit, memory_limit, hint=hint):
            return _find(model, example, ignored, return_excluded, group_time_limit,
                         None if memory_limit is None else memory_limit / 2, verify)
    finally:
        for m, training in modes.items():  # build_dependency leaves the model in eval mode
            m.training = training


def _find(model, example, ignored: set, return_excluded: bool, group_time_limit, group_memory_limit, verify: bool):
    sites, excluded = find_attention(model)
    skip = {m for s in sites for m in s.projections}
    try:
        with torch.enable_grad(), record(model) as rec:  # DepGraph traces through autograd
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example, forward_fn=run_example, verbose=False,
                output_transform=rec.set_outputs)
    except AnalysisLimitError:
        raise
    except Exception as exc:
        what = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise ValueError(f"find_targets: DepGraph cannot trace {type(model).__name__} with example inputs {what}: {exc}") from exc
    an = _Analysis(model, dg, rec.trace)
    targets = []
    for root, thunk in _roots(an, skip):
        try:
            with bounded(f"Torch-Pruning's search for the group of {root}", group_time_limit, group_memory_limit):
                group = thunk()
        except AnalysisLimitError as exc:
            excluded.append({"producers": [root], "reason": f"{exc} (a known blow-up of its index mapping)"})
            continue
        except Exception as exc:  # DepGraph's own failures (e.g. a ZeroDivisionError in its index mapping)
            excluded.append({"producers": [root], "reason": f"Torch-Pruning's group search failed: "
                                                             f"{type(exc).__name__}: {exc}"})
            continue
        result = _group_to_target(an, group)
        if isinstance(result, Target):
            targets.append(result)
        else:
            roots = sorted({an.names[it.dep.target.module] for it in group if it.dep.target.module in an.names
                            and an.dg.is_out_channel_pruning_fn(it.dep.handler)
                            and isinstance(it.dep.target.module, _CONV_ROOTS)}, key=an.key) or [root]
            excluded.append({"producers": roots, "reason": result})
    for site in sites:
        result = _head_target(an, site)
        if isinstance(result, Target):
            targets.append(result)
        else:
            excluded.append({"producers": [site.module], "reason": result})
    if ignored:
        kept = []
        for t in targets:
            owners = [p.module for p, axis in t.module_slices() if axis == 0] + [p.param.rpartition(".")[0] for p in t.params]
            hit = [m for m in dict.fromkeys(owners) if m in ignored]
            if t.attention is not None and t.attention in ignored:
                hit.append(t.attention)
            if hit:
                excluded.append({"producers": [p.module for p in t.producers], "reason": f"ignored_layers: {', '.join(hit)}"})
            else:
                kept.append(t)
        targets = kept
    names = [t.name for t in targets]
    if len(set(names)) != len(names):  # two groups with the same first producer: cannot be keyed apart
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"find_targets: several groups share their first producer {dup}")
    targets.sort(key=lambda t: an.key(t.name))
    if verify and targets:
        targets = _verify(model, example, targets, excluded)
    return (targets, excluded) if return_excluded else targets


def _trial_inputs(example):
    """The example with its floating-point tensors replaced by seeded random values (zeros can hide errors)."""
    gen = torch.Generator().manual_seed(0)

    def rand(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
        return t

    if isinstance(example, dict):
        return {k: rand(v) for k, v in example.items()}
    if isinstance(example, tuple):
        return tuple(rand(t) for t in example)
    return rand(example)


def _verify(model: nn.Module, example, targets: list, excluded: list) -> list:
    """Removes one channel of every target from a copy of the model and compares it with the masked copy on
    the example inputs; targets whose removal breaks the forward pass or changes its result (sizes written
    in the forward code, a mapping error) are moved to ``excluded``. One check for all targets, then one
    per target only if that fails."""
    from .surgery import mask_model, prune_model  # surgery imports this module

    x = _trial_inputs(example)

    def outputs(m):
        tensors: list = []
        with torch.no_grad():
            _flatten_outputs(run_example(m.eval(), x), tensors)
        return [t for t in tensors if t.is_floating_point()]

    def problem(subset) -> Optional[str]:
        keep = {t.name: list(range(1, t.channels)) for t in subset if t.channels > 1}
        try:
            got, want = outputs(prune_model(model, subset, keep)), outputs(mask_model(model, subset, keep))
        except Exception as exc:
            return f"removing channels breaks the forward pass ({type(exc).__name__}: {exc})"
        if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
            return "removing channels changes the shapes of the model's outputs"
        for a, b in zip(got, want):
            scale = max(float(b.abs().max()) if b.numel() else 0.0, 1.0)
            if not bool(torch.isfinite(a).all()) or float((a - b).abs().max()) > 1e-4 * scale:
                return "removing channels does not give the masked model's outputs (sizes in the forward code?)"
        return None

    if problem(targets) is None:
        return targets
    kept = []
    for t in targets:
        reason = problem([t])
        if reason is None:
            kept.append(t)
        else:
            excluded.append({"producers": [p.module for p in t.producers], "reason": reason})
    return kept


def _flatten_outputs(out, into: list) -> None:
    if isinstance(out, torch.Tensor):
        into.append(out)
    elif isinstance(out, dict):
        for v in out.values():
            _flatten_outputs(v, into)
    elif isinstance(out, (list, tuple)):
        for v in out:
            _flatten_outputs(v, into)


@dataclass
class TargetSet:
    """The targets of a model in one mode: the weights and layout handed to :func:`catalyst_fused.penalty`.

    ``segment_names[s]`` is the name of target ``targets[s]``; ``layout`` is None for the per-row layout.
    ``excluded`` lists the targets this mode leaves out (BN mode: targets without BatchNorm).
    """

    mode: str
    targets: list
    weights: list
    layout: Optional[GroupLayout]
    segment_names: list = field(default_factory=list)
    excluded: list = field(default_factory=list)

    @property
    def sizes(self) -> list[int]:
        return [t.channels for t in self.targets]


def build_target_set(model: nn.Module, mode: str, *, input_shape=None, bn_beta: bool = True,
                     targets: Optional[list] = None) -> TargetSet:
    """The Catalyst groups of ``model`` in ``mode`` ("bn", "filter" or "group").

    ``targets`` defaults to ``find_targets(model, input_shape)`` (``input_shape``: one sample's shape or
    example inputs, as :func:`find_targets` takes them).

    Raises:
        ValueError: for an unknown ``mode``, neither ``targets`` nor ``input_shape`` given, or a model with
            no prunable layer (in BN mode: none with BatchNorm).
    """
    if mode not in MODES:
        raise ValueError(f"unknown pruning mode {mode!r}; choose one of: {', '.join(MODES)}")
    if targets is None:
        if input_shape is None:
            raise ValueError("build_target_set: pass input_shape (one sample's shape) or targets")
        targets = find_targets(model, input_shape)
    excluded = []
    if mode == "bn":
        excluded = [{"producers": [p.module for p in t.producers], "reason": "no BatchNorm (mode 'bn')"}
                    for t in targets if not t.bns]
        targets = [t for t in targets if t.bns]
    if not targets:
        raise ValueError(
            f"model {type(model).__name__} has no prunable layer in mode {mode!r}: no layer whose output channels "
            "reach other layers through mapped operations only" + (" and pass a BatchNorm" if mode == "bn" else "")
        )
    modules = dict(model.named_modules())
    weights: list[torch.Tensor] = []
    index: dict[int, int] = {}

    def member(tensor, dim: int, piece) -> list[Slices]:
        if tensor is None:
            return []
        if id(tensor) not in index:
            index[id(tensor)] = len(weights)
            weights.append(tensor)
        whole = piece.start == 0 and piece.offset == 0 and piece.count == tensor.shape[dim] and piece.width == 1
        # count=None on a whole tensor keeps the per-row layout recognisable below
        count = None if whole else piece.count
        extra = (piece.width,) if piece.width != 1 else ()
        return [Slices(index[id(tensor)], dim, piece.start, count, piece.offset, *extra)]

    def module_members(piece: ModuleSlice, axis: int, attrs=None) -> list[Slices]:
        mod = modules[piece.module]
        return [m for attr, dim in axis_tensors(mod, axis) if attrs is None or attr in attrs
                for m in member(getattr(mod, attr), dim, piece)]

    segments = []
    for t in targets:
        seg = []
        if mode in ("filter", "group"):
            for p in t.producers:
                seg += module_members(p, 0)
        if mode in ("bn", "group"):
            for b in t.bns:
                seg += module_members(b, 0, ("weight", "bias") if mode == "group" or bn_beta else ("weight",))
        if mode == "group":
            for p in (*t.channelwise, *t.norms):
                seg += module_members(p, 0)
            for c in t.consumers:
                seg += module_members(c, 1)
            for prm in t.params:
                if prm.dim in (0, 1):  # the layout slices rows and columns only
                    seg += member(model.get_parameter(prm.param), prm.dim, prm)
        if not seg:  # a non-affine BN carries no parameter to regularise
            raise ValueError(f"target {t.name} has no parameter to regularise in mode {mode!r} (non-affine BatchNorm)")
        segments.append(seg)
    per_row = len(weights) == len(segments) and all(seg == [Slices(s)] for s, seg in enumerate(segments))
    layout = None if per_row else GroupLayout.build(weights, segments)
    return TargetSet(mode, list(targets), weights, layout, [t.name for t in targets], excluded)
