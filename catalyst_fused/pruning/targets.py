"""Finding the prunable channels of a model and expressing them as Catalyst groups.

Coupled channels come from Torch-Pruning's ``DependencyGraph`` (``torch-pruning==1.6.1``, pinned): it traces
one forward pass of the model and, for every ``nn.Conv2d`` / ``nn.Linear`` whose output channels can be
removed, returns the *pruning group* of those channels: every layer slice that must go with channel ``i``,
across residual additions and concatenations. A group becomes one :class:`Target` with

* ``producers``: ``Conv2d``/``Linear`` output rows (weight dim 0 and bias), e.g. in a ResNet stage the stem
  or shortcut convolution *and* the last convolution of every block, whose outputs are added;
* ``bns``: BatchNorm entries (scale, shift, running statistics) of those channels;
* ``consumers``: ``Conv2d``/``Linear`` input columns (weight dim 1) that read them.

Each is a :class:`ModuleSlice`: indices ``[start, start + count)`` of one module, which are channels
``[offset, offset + count)`` of the target (a channel concatenation puts a producer's channels at an
offset of its consumer's columns). A target is keyed everywhere by ``name``, its first producer in
``model.named_modules()`` order.

A group is **excluded** (listed with its reason by ``find_targets(..., return_excluded=True)``) when

* its channels are a model output (the logits layer, or channels reaching the output without a consumer);
* it touches a grouped or depthwise convolution, or a parameterised layer other than ``nn.Conv2d``
  (``groups == 1``), ``nn.Linear`` and BatchNorm (LayerNorm, GroupNorm, PReLU, embeddings, attention,
  RNNs, free ``nn.Parameter`` s, other convolution types);
* it passes an operation we do not map: only additions, subtractions and products, pointwise activations
  (ReLU, ReLU6, LeakyReLU, SiLU, GELU, sigmoid, tanh, hardswish, hardsigmoid), max/average pooling
  (adaptive included), spatial means, ``clone``, channel concatenation, and a ``flatten``/``view`` of a map
  whose spatial size is 1 are accepted. Splits, chunks and slices are excluded (their sizes are written in
  the forward code, so removing channels would break them), as is every operation DepGraph does not know;
* a layer's indices are not a contiguous shift of the group's channels (e.g. the flatten of a spatial
  map, where channel ``i`` is several input columns of the ``Linear``).

For the models of :mod:`catalyst_fused.models` this leaves every ``Conv2d`` and hidden ``Linear`` covered
by exactly one target; ResNets get one target per stage for the residual channels (stem or shortcut,
every block's last convolution and their BNs, every block's first convolution and the next stage as
consumers) plus one per block for its inner channels.

Modes (catalyst-method.md section 1):

* ``"group"``: every coupled slice (producer rows and biases, BN ``gamma_i, beta_i``, consumer input
  columns) in one ``cf.GroupLayout`` segment per target.
* ``"bn"``: group ``i`` = the scales ``gamma_i`` **and shifts** ``beta_i`` of every BN of the target; targets
  without BatchNorm are left out. **[our reading]** The paper's BN mode regularises ``gamma_i``; we include
  ``beta_i`` (``bn_beta=True``, the default) so that a pruned channel's BN output is ~0 and removing it
  leaves the network's function unchanged. ``bn_beta=False`` gives the pure gamma-only BN mode, whose
  removal leaves the constant ``relu(beta_i)`` unaccounted for.
* ``"filter"``: group ``i`` = row ``W[i]`` (plus ``bias[i]``) of every producer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch_pruning as tp
from torch import nn

from ..layout import GroupLayout, Slices

__all__ = ["MODES", "ModuleSlice", "Target", "find_targets", "TargetSet", "build_target_set", "example_batch", "run_example"]

MODES = ("bn", "filter", "group")

_OPTYPE = tp.ops.OPTYPE

# DepGraph treats every operation it does not know as element-wise; these autograd nodes really are
# channel-wise (output channel i depends on input channel i only).
_CHANNELWISE_GRAD_FNS = frozenset({
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "MulBackward0", "MulBackward1",
    "ReluBackward0", "HardtanhBackward0", "LeakyReluBackward0", "SiluBackward0", "GeluBackward0",
    "SigmoidBackward0", "TanhBackward0", "HardswishBackward0", "HardsigmoidBackward0",
    "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0", "AdaptiveAvgPool2DBackward0",
    "AdaptiveMaxPool2DBackward0", "CloneBackward0",
})


@dataclass(frozen=True)
class ModuleSlice:
    """Indices ``[start, start + count)`` of module ``module`` (a name in ``model.named_modules()``) along
    the dimension its role prunes; they are channels ``[offset, offset + count)`` of the target."""

    module: str
    start: int
    count: int
    offset: int = 0


@dataclass
class Target:
    """One group of coupled channels: ``channels`` channels, removed together from every slice listed."""

    name: str
    channels: int
    producers: list  # ModuleSlice: Conv2d/Linear output rows (weight dim 0, bias)
    bns: list  # ModuleSlice: BatchNorm entries
    consumers: list  # ModuleSlice: Conv2d/Linear input columns (weight dim 1)


def _signed(d: int) -> int:
    return d - (1 << 64) if d >= 1 << 63 else d  # autograd saves negative dims as unsigned 64-bit


def _unmapped_op(node) -> Optional[str]:
    """Why DepGraph node ``node`` (an operation, not a layer) cannot be part of a target, or None."""
    fn = node.grad_fn
    name = fn.name() if fn is not None and hasattr(fn, "name") else "unknown operation"
    if node.type == _OPTYPE.CONCAT:
        return None
    if node.type == _OPTYPE.RESHAPE:
        sizes = getattr(fn, "_saved_self_sym_sizes", None)
        if sizes is not None and len(sizes) >= 2 and all(int(s) == 1 for s in sizes[2:]):
            return None  # flatten of a 1x1 map: channel i stays column i
        return f"{name} of a tensor of shape {None if sizes is None else tuple(int(s) for s in sizes)}"
    if node.type == _OPTYPE.ELEMENTWISE:
        if name in _CHANNELWISE_GRAD_FNS:
            return None
        if name == "TBackward0" and not node.inputs:
            return None  # the transposed weight of a Linear: no activation flows through it
        sizes, dims = getattr(fn, "_saved_self_sym_sizes", None), getattr(fn, "_saved_dim", None)
        if name == "MeanBackward1" and sizes is not None and dims is not None and len(sizes) >= 3:
            if {_signed(int(d)) % len(sizes) for d in dims} <= set(range(2, len(sizes))):
                return None  # a spatial mean (global average pooling)
        return name
    return f"a {node.type.name.lower()} operation"


def _module_slice(name: str, item, size: int) -> Optional[ModuleSlice]:
    """The slice a group item covers when its indices are a contiguous shift of the root channels."""
    if any(r is None for r in item.root_idxs):
        return None
    pairs = sorted(zip(item.root_idxs, item.idxs))
    roots = [r for r, _ in pairs]
    first_root, first = pairs[0]
    if roots != list(range(first_root, first_root + len(pairs))):
        return None
    if any(i - r != first - first_root for r, i in pairs) or first < 0 or first + len(pairs) > size:
        return None
    return ModuleSlice(name, first, len(pairs), first_root)


def _group_to_target(dg, group, names: dict, order: dict, outputs: set):
    """A :class:`Target` for a DepGraph group, or the reason it is excluded (a string). ``outputs``: the
    autograd nodes of the model's outputs."""
    producers, bns, consumers = [], [], []
    channels = len(group[0].idxs)
    for item in group:
        node = item.dep.target
        module = node.module
        out = dg.is_out_channel_pruning_fn(item.dep.handler)
        consumer = isinstance(module, (nn.Conv2d, nn.Linear)) and not out  # its own output is other channels
        if node.type == _OPTYPE.OUTPUT or (not consumer and node.grad_fn in outputs):
            return "its channels are a model output" + (f" ({names[module]})" if module in names else "")
        if module not in names:  # an operation DepGraph created, not a layer of the model
            reason = _unmapped_op(node)
            if reason is not None:
                return f"passes {reason}, which is not mapped"
            continue
        name = names[module]
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            role, size = bns, module.num_features
        elif isinstance(module, nn.Conv2d) and module.groups == 1 or isinstance(module, nn.Linear):
            role, size = (producers, module.weight.shape[0]) if out else (consumers, module.weight.shape[1])
        elif isinstance(module, nn.Conv2d):
            return f"{name} is a grouped or depthwise convolution (groups={module.groups})"
        else:
            return f"{name} is a {type(module).__name__}, which is not mapped"
        piece = _module_slice(name, item, size)
        if piece is None:
            return f"the indices of {name} are not a contiguous shift of the channels (e.g. a flattened spatial map)"
        role.append(piece)

    def by_position(pieces):
        return sorted(pieces, key=lambda p: (order[p.module], p.offset))

    producers = by_position(producers)
    return Target(producers[0].module, channels, producers, by_position(bns), by_position(consumers))


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


def find_targets(model: nn.Module, example_inputs, *, return_excluded: bool = False, ignored_layers=None):
    """Every prunable group of coupled channels of ``model`` (see the module docstring), in the order of
    the targets' names in ``model.named_modules()``.

    Args:
        model: the network; it is traced once in eval mode (its train/eval flags are restored, its
            parameters and buffers are not changed).
        example_inputs: what ``model`` is called with for the trace: a batch tensor, a tuple of tensors, a
            dict of keyword tensors, or one sample's shape (e.g. ``(3, 32, 32)``).
        return_excluded: also return the excluded groups, as ``{"producers": [...], "reason": ...}``.
        ignored_layers: modules (or their names) whose output channels must not be pruned: a group with one
            of them (or a module inside one of them) as producer or BatchNorm is excluded.

    Raises:
        ValueError: for bad ``example_inputs`` or ``ignored_layers``, or a model that DepGraph cannot trace.
    """
    example = example_batch(model, example_inputs)
    ignored = _ignored_names(model, ignored_layers)
    modes = {m: m.training for m in model.modules()}
    outputs = []
    try:
        with torch.enable_grad():  # DepGraph traces through autograd
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example, verbose=False, output_transform=lambda out: outputs.append(out) or out
            )
        groups = list(dg.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)))
    except Exception as exc:
        what = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise ValueError(f"find_targets: DepGraph cannot trace {type(model).__name__} with example inputs {what}: {exc}") from exc
    finally:
        for m, training in modes.items():  # build_dependency leaves the model in eval mode
            m.training = training
    outputs = {t.grad_fn for t in tp.utils.flatten_as_list(outputs) if isinstance(t, torch.Tensor)}
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    targets, excluded = [], []
    for group in groups:
        result = _group_to_target(dg, group, names, order, outputs)
        if isinstance(result, Target) and ignored:
            hit = [p.module for p in (*result.producers, *result.bns) if p.module in ignored]
            if hit:
                result = f"ignored_layers: {', '.join(hit)}"
        if isinstance(result, Target):
            targets.append(result)
        else:
            roots = sorted({names[it.dep.target.module] for it in group if it.dep.target.module in names
                            and dg.is_out_channel_pruning_fn(it.dep.handler)
                            and isinstance(it.dep.target.module, (nn.Conv2d, nn.Linear))}, key=order.get)
            excluded.append({"producers": roots, "reason": result})
    targets.sort(key=lambda t: order[t.name])
    return (targets, excluded) if return_excluded else targets


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
            f"model {type(model).__name__} has no prunable layer in mode {mode!r}: no Conv2d/Linear whose output "
            "channels reach Conv2d/Linear consumers through BatchNorm and mapped channel-wise operations only"
            + (" and pass a BatchNorm" if mode == "bn" else "")
        )
    modules = dict(model.named_modules())
    weights: list[torch.Tensor] = []
    index: dict[int, int] = {}

    def members(tensor, piece: ModuleSlice, dim: int = 0) -> list[Slices]:
        if tensor is None:
            return []
        if id(tensor) not in index:
            index[id(tensor)] = len(weights)
            weights.append(tensor)
        whole = piece.start == 0 and piece.offset == 0 and piece.count == tensor.shape[dim]
        # count=None on a whole tensor keeps the per-row layout recognisable below
        return [Slices(index[id(tensor)], dim, piece.start, None if whole else piece.count, piece.offset)]

    segments = []
    for t in targets:
        seg = []
        if mode in ("filter", "group"):
            for p in t.producers:
                seg += members(modules[p.module].weight, p) + members(modules[p.module].bias, p)
        if mode in ("bn", "group"):
            for b in t.bns:
                seg += members(modules[b.module].weight, b)
                if mode == "group" or bn_beta:
                    seg += members(modules[b.module].bias, b)
        if mode == "group":
            for c in t.consumers:
                seg += members(modules[c.module].weight, c, dim=1)
        if not seg:  # a non-affine BN carries no parameter to regularise
            raise ValueError(f"target {t.name} has no parameter to regularise in mode {mode!r} (non-affine BatchNorm)")
        segments.append(seg)
    per_row = len(weights) == len(segments) and all(seg == [Slices(s)] for s, seg in enumerate(segments))
    layout = None if per_row else GroupLayout.build(weights, segments)
    return TargetSet(mode, list(targets), weights, layout, [t.name for t in targets], excluded)
