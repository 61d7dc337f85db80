"""Weight sets for the penalty benchmarks: lists of fresh leaf tensors (``requires_grad=True``).

Each set is the list of tensors a Catalyst run would regularise:

* ``resnet56``: every conv weight of the CIFAR ResNet-56 (option-B shortcuts: 57 convs, 0.85 M params);
* ``vgg19_bn``: every conv weight and both linear weights of VGG-19-BN for CIFAR-100 (18 tensors, 20.3 M);
* ``resnet50``: every conv weight of torchvision's ResNet-50 plus the fc weight (54 tensors, 25.5 M);
* ``transformer_mlp``: 12 layers x (``[3072, 768]`` up-projection, ``[768, 3072]`` down-projection)
  linear weights, as in a BERT-base / ViT-B MLP (24 tensors, 56.6 M).

The model-based sets take the values of a seeded, freshly initialised model (so row norms look like a
real network's); the transformer set is N(0, 0.02^2). Values are generated once on the CPU in fp32 and
cached; every call returns new tensors on the requested device and dtype.

**Group-layout sets** (``*_group``): the groups the pruning workflow regularises in group mode, built from
the real model by ``catalyst_fused.pruning.build_target_set(model, "group")`` (every conv's rows with their
BN scale and shift, and the input columns of the layers that read them, as Torch-Pruning's DepGraph couples
them); the weights are the model's own parameters, so a provider can also work on the model (the
``torch_pruning`` provider calls Torch-Pruning's regularizer on it):

* ``resnet50_group``: torchvision ResNet-50 (traced at 224x224; the fc layer's rows are not pruned, its
  input columns are);
* ``vgg19_bn_group``: VGG-19-BN for CIFAR-100 (32x32);
* ``densenet121_group``: torchvision DenseNet-121 (concatenations: consumers read several producers);
* ``mobilenet_v2_group``: torchvision MobileNetV2, **partial**: groups through depthwise convolutions are
  not mapped yet (``catalyst_fused/pruning/targets.py`` excludes them), so only the residual-stream groups
  are in the set;
* ``transformer_mlp_group``: the 12-layer MLP stack as modules (``x + fc2(gelu(fc1(x)))``), one segment per
  layer: fc1's rows and bias with fc2's input columns.

    from weight_sets import load_weight_set, load_bench_set
    weights = load_weight_set("resnet50", device="cpu", dtype=torch.float32)
    bench = load_bench_set("resnet50_group")   # .weights, .layout, .model, .example_inputs, .ignored_layers
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "WEIGHT_SETS",
    "WeightSetInfo",
    "describe",
    "load_weight_set",
    "resnet56_weights",
    "vgg19_bn_weights",
    "resnet50_weights",
    "transformer_mlp_weights",
    "GROUP_SETS",
    "BenchSet",
    "load_bench_set",
    "is_group_set",
]

_SEED = 0


def _conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model.modules() if isinstance(m, nn.Conv2d)]


def _linear_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]


def _seeded(build: Callable[[], list[torch.Tensor]]) -> Callable[[], tuple[torch.Tensor, ...]]:
    @functools.lru_cache(maxsize=None)
    def cached() -> tuple[torch.Tensor, ...]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            return tuple(t.detach().to(torch.float32).contiguous() for t in build())

    return cached


@_seeded
def _resnet56_cpu():
    from catalyst_fused.models import resnet56

    return _conv_weights(resnet56(num_classes=10))


@_seeded
def _vgg19_bn_cpu():
    from catalyst_fused.models import vgg19_bn

    model = vgg19_bn(num_classes=100)
    return _conv_weights(model) + _linear_weights(model)


@_seeded
def _resnet50_cpu():
    from catalyst_fused.models import resnet50

    model = resnet50(num_classes=1000)
    return _conv_weights(model) + [model.fc.weight.detach()]


@_seeded
def _transformer_mlp_cpu(layers: int = 12, d_model: int = 768, d_ff: int = 3072):
    weights = []
    for _ in range(layers):
        weights.append(torch.randn(d_ff, d_model) * 0.02)  # up-projection: nn.Linear(768, 3072).weight
        weights.append(torch.randn(d_model, d_ff) * 0.02)  # down-projection: nn.Linear(3072, 768).weight
    return weights


def _fresh(source: Sequence[torch.Tensor], device, dtype) -> list[torch.Tensor]:
    device = torch.device(device)
    return [t.to(device=device, dtype=dtype, copy=True).requires_grad_(True) for t in source]


def resnet56_weights(device="cpu", dtype=torch.float32) -> list[torch.Tensor]:
    return _fresh(_resnet56_cpu(), device, dtype)


def vgg19_bn_weights(device="cpu", dtype=torch.float32) -> list[torch.Tensor]:
    return _fresh(_vgg19_bn_cpu(), device, dtype)


def resnet50_weights(device="cpu", dtype=torch.float32) -> list[torch.Tensor]:
    return _fresh(_resnet50_cpu(), device, dtype)


def transformer_mlp_weights(device="cpu", dtype=torch.float32) -> list[torch.Tensor]:
    return _fresh(_transformer_mlp_cpu(), device, dtype)


WEIGHT_SETS: dict[str, Callable[..., list[torch.Tensor]]] = {
    "resnet56": resnet56_weights,
    "vgg19_bn": vgg19_bn_weights,
    "resnet50": resnet50_weights,
    "transformer_mlp": transformer_mlp_weights,
}


def load_weight_set(name: str, device="cpu", dtype=torch.float32) -> list[torch.Tensor]:
    """Fresh leaf tensors (``requires_grad=True``) of the named weight set on ``device`` in ``dtype``."""
    if name not in WEIGHT_SETS:
        raise ValueError(f"unknown weight set {name!r}; choose from: {', '.join(WEIGHT_SETS)}")
    return WEIGHT_SETS[name](device=device, dtype=dtype)


class WeightSetInfo(NamedTuple):
    name: str
    n_tensors: int
    n_params: int
    n_rows: int  # groups (catalyst entries): rows for the per-row sets

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.n_tensors} tensors, {self.n_params:,} params "
            f"({self.n_params / 1e6:.2f} M), {self.n_rows:,} {'groups' if is_group_set(self.name) else 'rows'}"
        )


def describe(name: str, weights: Sequence[torch.Tensor], layout=None) -> WeightSetInfo:
    groups = sum(w.shape[0] for w in weights) if layout is None else layout.num_groups
    return WeightSetInfo(name, len(weights), sum(w.numel() for w in weights), groups)


# ---- group-layout sets ------------------------------------------------------------------------------


class BenchSet(NamedTuple):
    """A weight set with what providers beyond the penalty itself need: the layout (None: per row), and for
    model-based sets the model whose parameters the weights are, an example input, and the layers whose
    output channels are not pruned (the classifier), for pruners that take a model."""

    name: str
    weights: list
    layout: object = None
    model: Optional[nn.Module] = None
    example_inputs: Optional[torch.Tensor] = None
    ignored_layers: tuple = ()
    note: str = ""


class _MLPBlock(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class TransformerMLP(nn.Module):
    """The MLP half of a 12-layer BERT-base / ViT-B stack (residual stream of 768, hidden 3072)."""

    def __init__(self, layers: int = 12, d_model: int = 768, d_ff: int = 3072) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[_MLPBlock(d_model, d_ff) for _ in range(layers)])

    def forward(self, x):
        return self.blocks(x)


def _vision(name: str, size: int, classifier: Callable[[nn.Module], nn.Module]):
    def build():
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        return model, (3, size, size), (classifier(model),)

    return build


def _vgg19_bn_cifar():
    from catalyst_fused.models import vgg19_bn

    model = vgg19_bn(num_classes=100)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return model, (3, 32, 32), (last,)


def _resnet56_cifar():
    from catalyst_fused.models import resnet56

    model = resnet56(num_classes=10)
    return model, (3, 32, 32), (model.fc,)


def _transformer_mlp_model():
    return TransformerMLP(), (8, 768), ()


_GROUP_MODELS = {
    "resnet56_group": _resnet56_cifar,
    "resnet50_group": _vision("resnet50", 224, lambda m: m.fc),
    "vgg19_bn_group": _vgg19_bn_cifar,
    "densenet121_group": _vision("densenet121", 224, lambda m: m.classifier),
    "mobilenet_v2_group": _vision("mobilenet_v2", 224, lambda m: m.classifier[-1]),
    "transformer_mlp_group": _transformer_mlp_model,
}
GROUP_SETS = tuple(_GROUP_MODELS)


def is_group_set(name: str) -> bool:
    return name in _GROUP_MODELS


@functools.lru_cache(maxsize=None)
def _group_state(name: str):
    """The seeded model's fp32 state dict (computed once)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model, _, _ = _GROUP_MODELS[name]()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_bench_set(name: str, device="cpu", dtype=torch.float32) -> BenchSet:
    """A fresh :class:`BenchSet`: the per-row sets wrap :func:`load_weight_set`; the group sets build the
    model (seeded values), move it to ``device``/``dtype`` and take its group-mode target set."""
    if name in WEIGHT_SETS:
        return BenchSet(name, load_weight_set(name, device=device, dtype=dtype))
    if name not in _GROUP_MODELS:
        raise ValueError(f"unknown weight set {name!r}; choose from: {', '.join([*WEIGHT_SETS, *GROUP_SETS])}")
    model, sample_shape, ignored = _GROUP_MODELS[name]()
    model.load_state_dict(_group_state(name))
    model = model.to(device=device, dtype=dtype)
    example = torch.randn(1, *sample_shape, device=device, dtype=dtype)
    note = ""
    if name == "transformer_mlp_group":
        from catalyst_fused import GroupLayout, Slices

        weights, segments = [], []
        for block in model.blocks:
            k = len(weights)
            weights += [block.fc1.weight, block.fc1.bias, block.fc2.weight]
            segments.append([Slices(k), Slices(k + 1), Slices(k + 2, dim=1)])
        layout = GroupLayout.build(weights, segments)
    else:
        from catalyst_fused.pruning import build_target_set

        targets = build_target_set(model, "group", input_shape=sample_shape)
        weights, layout = targets.weights, targets.layout
        covered = sum(w.numel() for w in weights)
        total = sum(p.numel() for p in model.parameters())
        if name == "mobilenet_v2_group":
            note = (
                f"partial: {len(targets.targets)} groups of channels ({covered / total:.0%} of the parameters); groups "
                "through depthwise convolutions are not mapped yet"
            )
    for w in weights:
        w.requires_grad_(True)
    return BenchSet(name, list(weights), layout, model, example, tuple(ignored), note)


if __name__ == "__main__":
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo's catalyst_fused
    for set_name in WEIGHT_SETS:
        print(describe(set_name, load_weight_set(set_name)))
    for set_name in GROUP_SETS:
        bench = load_bench_set(set_name)
        print(describe(set_name, bench.weights, bench.layout), bench.note)
