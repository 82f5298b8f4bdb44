"""`cifar10` / `cifar100` through torchvision's loaders, converted once to uint8 tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets import CIFAR10, CIFAR100

from .errors import DataError
from .splits import TensorSplit

# Per-channel statistics of the training sets (the values airbench / RepDistiller use).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4867, 0.4408)
CIFAR100_STD: tuple[float, float, float] = (0.2675, 0.2565, 0.2761)

_CLASSES = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def load_cifar(name: str, root: Path, download: bool) -> tuple[TensorSplit, TensorSplit, list[str]]:
    """(train, test, class names); DataError naming the folder when files are missing/corrupt."""
    cls = _CLASSES[name]
    folder = root / cls.base_folder
    hint = f"put the extracted '{cls.base_folder}' folder (from {cls.url}) at {folder}"
    if not download and not folder.is_dir():
        raise DataError(f"{name}: {folder} is missing and download is off; {hint}")
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as e:  # integrity failure, or offline download (URLError)
        raise DataError(f"{name}: could not load {folder} ({e}); {hint}") from e

    def split(ds: CIFAR10) -> TensorSplit:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()   # HWC -> CHW uint8
        return TensorSplit(images, torch.tensor(ds.targets, dtype=torch.int64))

    return split(train), split(test), list(train.classes)
