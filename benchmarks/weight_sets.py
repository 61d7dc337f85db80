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

    from weight_sets import load_weight_set
    weights = load_weight_set("resnet50", device="cpu", dtype=torch.float32)
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

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
    n_rows: int

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.n_tensors} tensors, {self.n_params:,} params "
            f"({self.n_params / 1e6:.2f} M), {self.n_rows:,} rows"
        )


def describe(name: str, weights: Sequence[torch.Tensor]) -> WeightSetInfo:
    return WeightSetInfo(name, len(weights), sum(w.numel() for w in weights), sum(w.shape[0] for w in weights))


if __name__ == "__main__":
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo's catalyst_fused
    for set_name in WEIGHT_SETS:
        print(describe(set_name, load_weight_set(set_name)))
