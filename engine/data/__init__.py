"""Data layer: datasets as uint8 splits the trainer batches from, plus batched augmentation.

    bundle = build_data("cifar100", "data/", val_fraction=0.1, seed=0)
    for x, y, idx in bundle.train.batches(64, shuffle=True, drop_last=True,
                                          generator=g, device="cuda:0"):
        x = augment.normalize(augment.random_crop_flip(x, generator=g), bundle.mean, bundle.std)

Every dataset is stored as uint8 images so augmentation runs batched on the device
(engine/data/augment.py). `scale` and `val_fraction` are seeded and stratified per class,
and applied the same way to every dataset.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError
from .names import DATASET_NAMES

if TYPE_CHECKING:
    from .splits import Split

__all__ = [
    "DATASET_NAMES", "DataBundle", "DataError", "FolderSplit", "Split", "TensorSplit",
    "augment", "build_data", "stratified_fraction", "stratified_holdout",
]

# Importing this package stays torch-free (recipe validation imports engine.data.names, which
# runs this file first); the torch-backed names load on first use.
_LAZY = {
    "Split": "splits", "TensorSplit": "splits", "FolderSplit": "folder", "augment": "augment",
    "stratified_fraction": "sampling", "stratified_holdout": "sampling",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name]}", __name__)
    return module if name == _LAZY[name] else getattr(module, name)


# Sub-seeds, so the scale subset does not depend on val_fraction and vice versa.
_SCALE_SEED, _VAL_SEED = 0x5CA1E, 0x7A1


@dataclass
class DataBundle:
    """A dataset ready for training: splits of uint8 images plus what is needed to use them."""

    name: str
    num_classes: int
    class_names: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: Split
    val: Split | None
    test: Split

    def summary(self) -> dict[str, object]:
        """Plain-data description for run.json / logs."""
        return {
            "dataset": self.name, "num_classes": self.num_classes, "image_size": self.image_size,
            "train": len(self.train), "val": len(self.val) if self.val is not None else 0,
            "test": len(self.test),
        }


def _load(dataset: str, root: Path, download: bool, image_size: int | None, num_workers: int,
          embedded_per_class: int | None) -> tuple[Split, Split, list[str], tuple, tuple]:
    """(train, test, class names, mean, std) for one dataset family."""
    from .splits import TensorSplit

    if dataset == "embedded":
        from . import embedded as m

        per_class = embedded_per_class or m.TRAIN_PER_CLASS
        xtr, ytr = m.make_embedded(per_class, seed=m.DATA_SEED)
        xte, yte = m.make_embedded(m.TEST_PER_CLASS, seed=m.DATA_SEED + 1_000_003)
        return TensorSplit(xtr, ytr), TensorSplit(xte, yte), list(m.CLASS_NAMES), m.MEAN, m.STD
    if dataset in ("cifar10", "cifar100"):
        from . import cifar as m

        train, test, names = m.load_cifar(dataset, root, download)
        stats = (m.CIFAR10_MEAN, m.CIFAR10_STD) if dataset == "cifar10" else (m.CIFAR100_MEAN, m.CIFAR100_STD)
        return train, test, names, *stats
    if dataset == "tinyimagenet":
        from . import tinyimagenet as m

        train, test, names = m.load_tinyimagenet(root, download, image_size, num_workers)
        return train, test, names, m.MEAN, m.STD
    if dataset == "folder":
        from . import folder as m

        train, test, names = m.load_folder(root, image_size, num_workers)
        return train, test, names, m.IMAGENET_MEAN, m.IMAGENET_STD
    if dataset == "fashion_mnist":
        from . import fashion_mnist as m

        train, test, names = m.load_fashion_mnist(root)
        return train, test, names, m.MEAN, m.STD
    raise DataError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASET_NAMES)}")


def build_data(
    dataset: str,
    root: str | Path,
    *,
    scale: float = 1.0,
    val_fraction: float = 0.0,
    seed: int = 0,
    download: bool = True,
    image_size: int | None = None,
    num_workers: int = 0,
    embedded_per_class: int | None = None,
) -> DataBundle:
    """Load `dataset` from `root`, keep a stratified `scale` of train, hold out `val_fraction`.

    `seed` picks the scale subset and the val hold-out only; the `embedded` images themselves
    are fixed (like a real dataset) so runs with different seeds see the same data.
    `image_size` resizes tensor datasets once in memory and sets the decode size of folders.
    """
    if not 0 < scale <= 1:
        raise DataError(f"data.scale must be in (0, 1], got {scale}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    from .sampling import stratified_fraction, stratified_holdout
    from .splits import TensorSplit, resize_uint8

    train, test, names, mean, std = _load(dataset, Path(root).expanduser(), download, image_size,
                                          num_workers, embedded_per_class)
    if image_size is not None and isinstance(train, TensorSplit) and train.image_size != image_size:
        train = TensorSplit(resize_uint8(train.data, image_size), train.labels)
    if image_size is not None and isinstance(test, TensorSplit) and test.image_size != image_size:
        test = TensorSplit(resize_uint8(test.data, image_size), test.labels)
    if scale < 1:
        train = train.subset(stratified_fraction(train.labels, scale, seed * 1_000_003 + _SCALE_SEED))
    val = None
    if val_fraction > 0:
        keep, held = stratified_holdout(train.labels, val_fraction, seed * 1_000_003 + _VAL_SEED)
        train, val = train.subset(keep), train.subset(held)
    return DataBundle(
        name=dataset, num_classes=len(names), class_names=list(names), image_size=train.image_size,
        mean=tuple(mean), std=tuple(std), train=train, val=val, test=test,
    )
