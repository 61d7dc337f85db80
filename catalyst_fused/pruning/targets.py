"""Finding the prunable channels of a model and expressing them as Catalyst groups.

A *target* is a convolution (the producer) whose output channels can be removed together with every slice
coupled to them. Targets are found by tracing the model with ``torch.fx`` and following each
``nn.Conv2d`` (``groups == 1``) forward through a *chain* of channel-wise operations until the next layer
that mixes channels (the consumer, an ``nn.Conv2d`` with ``groups == 1`` or an ``nn.Linear``):

    producer conv -> [BatchNorm2d] -> ReLU / pooling / Dropout / Identity ... -> consumer conv
    producer conv -> [BatchNorm2d] -> ... -> AdaptiveAvgPool2d(1) -> flatten -> consumer linear

Every node on the chain must have exactly one user. Any other use of the channels (an ``add`` with a
shortcut, a concatenation, a second consumer, an output) makes the producer **not** a target: residual-
coupled channels (ResNet block outputs, shortcut convolutions, the stem of a ResNet) are therefore
excluded, and only the *inner* channels of residual blocks are pruned. This keeps every removal
consistent without coupling groups across blocks (documented simplification; see README of the package).
The layer producing the logits is never a target (it has no consumer). A ``flatten`` is only crossed
after a pooling to 1x1, so that one channel is one input column of the linear consumer.

Modes (catalyst-method.md section 1):

* ``"bn"``: group ``i`` = the BatchNorm scale ``gamma_i`` **and shift** ``beta_i`` of the BN right after
  the producer (one layout segment per target). **[our reading]** The paper's BN mode regularises
  ``gamma_i``; we include ``beta_i`` (``bn_beta=True``, the default) so that a pruned channel's BN output
  is ~0 and removing it leaves the network's function unchanged. ``bn_beta=False`` gives the pure
  gamma-only BN mode, whose removal leaves the constant ``relu(beta_i)`` unaccounted for.
* ``"filter"``: group ``i`` = producer row ``W[i]`` (plus ``bias[i]`` if the conv has a bias).
* ``"group"``: producer row + bias + BN ``gamma_i, beta_i`` + the consumer's input column ``A[:, i]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx, nn

from ..layout import GroupLayout, Slices

__all__ = ["MODES", "Target", "find_targets", "TargetSet", "build_target_set"]

MODES = ("bn", "filter", "group")

# Modules that act on each channel separately (they keep the channel index).
_CHANNELWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.GELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
)
_CHANNELWISE_FUNCTIONS = {
    torch.relu,
    torch.nn.functional.relu,
    torch.nn.functional.relu6,
    torch.nn.functional.silu,
    torch.nn.functional.gelu,
    torch.sigmoid,
    torch.tanh,
    torch.nn.functional.max_pool2d,
    torch.nn.functional.avg_pool2d,
    torch.nn.functional.dropout,
}
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}


@dataclass
class Target:
    """One prunable producer and what is coupled to its output channels (module names as in
    ``model.named_modules()``)."""

    producer: str
    bn: Optional[str]
    consumer: str
    channels: int


def _is_pool_to_one(module: nn.Module) -> bool:
    if isinstance(module, nn.AdaptiveAvgPool2d) or isinstance(module, nn.AdaptiveMaxPool2d):
        size = module.output_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return all(s == 1 for s in size)
    return False


def find_targets(model: nn.Module) -> list[Target]:
    """Every prunable producer of ``model`` in graph order (see the module docstring for the rules).

    Raises:
        ValueError: if the model cannot be traced with ``torch.fx``.
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # pragma: no cover - depends on the model
        raise ValueError(f"cannot trace the model with torch.fx to find prunable channels: {exc}") from exc
    modules = dict(model.named_modules())
    targets = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        producer = modules[node.target]
        if not isinstance(producer, nn.Conv2d) or producer.groups != 1:
            continue
        bn = None
        pooled = False
        current = node
        consumer = None
        first = True
        while True:
            users = list(current.users)
            if len(users) != 1:
                break
            nxt = users[0]
            if nxt.op == "call_module":
                mod = modules[nxt.target]
                if isinstance(mod, nn.BatchNorm2d) and first:
                    bn = nxt.target
                elif isinstance(mod, nn.Conv2d):
                    if mod.groups == 1 and not pooled:
                        consumer = nxt.target
                    break
                elif isinstance(mod, nn.Linear):
                    if pooled:
                        consumer = nxt.target
                    break
                elif _is_pool_to_one(mod):
                    pooled = True
                elif isinstance(mod, nn.Flatten):
                    if not pooled:
                        break
                elif not isinstance(mod, _CHANNELWISE_MODULES):
                    break
            elif nxt.op == "call_function":
                if nxt.target is torch.flatten:
                    if not pooled:
                        break
                elif nxt.target not in _CHANNELWISE_FUNCTIONS:
                    break
                if len(nxt.args) == 0 or nxt.args[0] is not current:
                    break
            elif nxt.op == "call_method":
                if nxt.target in ("flatten", "view", "reshape"):
                    if not pooled or nxt.target != "flatten":
                        break
                elif nxt.target not in _CHANNELWISE_METHODS:
                    break
            else:
                break
            first = False
            current = nxt
        if consumer is not None:
            targets.append(Target(node.target, bn, consumer, producer.out_channels))
    return targets


@dataclass
class TargetSet:
    """The targets of a model in one mode: the weights and layout handed to :func:`catalyst_fused.penalty`.

    ``segment_names[s]`` is the producer of segment ``s``; ``layout`` is None for the per-row layout.
    """

    mode: str
    targets: list
    weights: list
    layout: Optional[GroupLayout]
    segment_names: list = field(default_factory=list)

    @property
    def sizes(self) -> list[int]:
        return [t.channels for t in self.targets]


def build_target_set(model: nn.Module, mode: str, *, bn_beta: bool = True, targets: Optional[list] = None) -> TargetSet:
    """The Catalyst groups of ``model`` in ``mode`` ("bn", "filter" or "group").

    Raises:
        ValueError: for an unknown mode (naming ``mode``), a model with no prunable layer, or BN mode on
            a producer without BatchNorm.
    """
    if mode not in MODES:
        raise ValueError(f"unknown pruning mode {mode!r}; choose one of: {', '.join(MODES)}")
    if targets is None:
        targets = find_targets(model)
    if not targets:
        raise ValueError(
            f"model {type(model).__name__} has no prunable layer: no Conv2d whose output channels reach a "
            "single Conv2d/Linear consumer through channel-wise operations only"
        )
    modules = dict(model.named_modules())
    weights: list[torch.Tensor] = []
    index: dict[int, int] = {}

    def slot(t: torch.Tensor) -> int:
        if id(t) not in index:
            index[id(t)] = len(weights)
            weights.append(t)
        return index[id(t)]

    segments = []
    for t in targets:
        conv = modules[t.producer]
        bn = modules[t.bn] if t.bn is not None else None
        members = []
        if mode == "bn":
            if bn is None:
                raise ValueError(f"mode 'bn' needs a BatchNorm after every target; {t.producer} has none")
            members.append(Slices(slot(bn.weight)))
            if bn_beta and bn.bias is not None:
                members.append(Slices(slot(bn.bias)))
        else:
            members.append(Slices(slot(conv.weight)))
            if conv.bias is not None:
                members.append(Slices(slot(conv.bias)))
            if mode == "group":
                if bn is not None:
                    if bn.weight is not None:
                        members.append(Slices(slot(bn.weight)))
                    if bn.bias is not None:
                        members.append(Slices(slot(bn.bias)))
                members.append(Slices(slot(modules[t.consumer].weight), dim=1))
        segments.append(members)
    per_row = all(len(m) == 1 and m[0].dim == 0 for m in segments) and len(weights) == len(segments)
    layout = None if per_row else GroupLayout.build(weights, segments)
    return TargetSet(mode, list(targets), weights, layout, [t.producer for t in targets])
