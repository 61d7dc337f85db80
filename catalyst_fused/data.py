"""Datasets for the pruning workflow, with a deterministic split and a seeded data order.

    train_set, test_set, info = load_dataset("digits", image_size=8, channels=1)

* ``"digits"`` (default): ``sklearn.datasets.load_digits()`` (1,797 8x8 images, 10 classes), scaled to
  [0, 1] and standardised; split into 1,400 train / 397 test by a fixed permutation (seed 0), the same on
  every machine. ``image_size=32, channels=3`` resizes bilinearly to 32x32 and replicates the channel, for
  the CIFAR-style models.
* ``"cifar10"`` / ``"cifar100"``: ``torchvision.datasets.CIFAR10/100(root, download=False)`` (the python
  pickle format in ``root/cifar-10-batches-py`` / ``root/cifar-100-python``), standardised per channel.
* ``"imagefolder"``: ``torchvision.datasets.ImageFolder``; ``root/train`` and ``root/val`` (or
  ``root/test``) if present, else ``root`` itself split 80/20 by a fixed permutation. Images are resized to
  ``image_size`` and converted to ``channels`` channels.

No data augmentation is applied (determinism and CPU cost); nothing is downloaded. A ``root`` that does
not exist raises ``FileNotFoundError`` naming the path; an image that cannot be read raises ``ValueError``
naming the file when it is loaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = ["DATASETS", "DatasetInfo", "load_dataset", "make_loader"]

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")

_CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
_CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    image_size: int
    train_size: int
    test_size: int


def _digits(image_size: int, channels: int):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
    y = torch.tensor(bunch.target, dtype=torch.long)
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    if channels != 1:
        x = x.expand(-1, channels, -1, -1).contiguous()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test]), 10


def _check_root(root: Optional[str], dataset: str) -> str:
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs --data-root (a directory)")
    if not os.path.exists(root):
        raise FileNotFoundError(f"dataset {dataset!r}: data root {root!r} does not exist")
    return root


def _cifar(name: str, root: str, image_size: int, channels: int):
    import torchvision
    from torchvision import transforms

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    steps = [transforms.ToTensor(), transforms.Normalize(_CIFAR_MEAN[name], _CIFAR_STD[name])]
    if image_size != 32:
        steps.insert(0, transforms.Resize((image_size, image_size)))
    if channels == 1:
        steps.insert(0, transforms.Grayscale(1))
        steps[-1] = transforms.Normalize((0.5,), (0.25,))
    tf = transforms.Compose(steps)
    try:
        train = cls(root, train=True, download=False, transform=tf)
        test = cls(root, train=False, download=False, transform=tf)
    except RuntimeError as exc:
        raise FileNotFoundError(
            f"dataset {name!r}: no readable CIFAR files under data root {root!r} (expected the python-pickle "
            f"format, e.g. {os.path.join(root, cls.base_folder)}); nothing is downloaded: {exc}"
        ) from exc
    return train, test, len(train.classes)


def _read_image(path: str):
    """torchvision's default image loader, with a clear error naming the file it cannot read."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad files
        raise ValueError(f"dataset 'imagefolder': cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def _imagefolder(root: str, image_size: int, channels: int):
    import torchvision
    from torchvision import transforms

    tf = transforms.Compose(
        [
            transforms.Grayscale(channels) if channels == 1 else transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize((0.5,) * channels, (0.25,) * channels),
        ]
    )
    train_dir = os.path.join(root, "train")
    test_dir = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    try:
        if os.path.isdir(train_dir) and test_dir is not None:
            train = torchvision.datasets.ImageFolder(train_dir, transform=tf, loader=_read_image)
            test = torchvision.datasets.ImageFolder(test_dir, transform=tf, loader=_read_image)
            if train.classes != test.classes:
                raise ValueError(f"imagefolder: {train_dir} and {test_dir} have different class folders")
            return train, test, len(train.classes)
        full = torchvision.datasets.ImageFolder(root, transform=tf, loader=_read_image)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"dataset 'imagefolder': no class folders with images under data root {root!r}: {exc}") from exc
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(0)).tolist()
    cut = max(1, int(round(0.8 * len(full)))) if len(full) > 1 else len(full)
    return Subset(full, perm[:cut]), Subset(full, perm[cut:]), len(full.classes)


def load_dataset(name: str, root: Optional[str] = None, *, image_size: int = 32, channels: int = 3):
    """``(train_set, test_set, DatasetInfo)`` for one of :data:`DATASETS` (see the module docstring).

    Raises:
        ValueError: unknown dataset name (the message lists the choices), or a missing ``root``.
        FileNotFoundError: ``root`` does not exist or holds no readable data (the message names it).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if name == "digits":
        train, test, classes = _digits(image_size, channels)
    elif name in ("cifar10", "cifar100"):
        train, test, classes = _cifar(name, _check_root(root, name), image_size, channels)
    else:
        train, test, classes = _imagefolder(_check_root(root, name), image_size, channels)
    return train, test, DatasetInfo(name, classes, channels, image_size, len(train), len(test))


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """A single-process loader; with ``shuffle`` its order comes from a generator seeded with ``seed`` only
    (so an epoch's order depends on nothing but the seed the caller derives for it)."""
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)
