"""`folder`: ImageFolder trees (root/train/<class>/*, root/val|test/<class>/*) -> FolderSplit.

Files are decoded with PIL in a DataLoader (workers, pinned memory on CUDA, non-blocking
copies), resized on the short side and centre-cropped to image_size, and yielded as uint8
like TensorSplit so the same batched GPU augmentation applies. Tiny-ImageNet reuses the
decoder to fill its in-memory tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .errors import DataError
from .splits import Batch, Split, batch_order, resolve_device

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Sample = tuple[str, int]  # (file path, class index)


def load_image(path: str | Path, size: int) -> Tensor:
    """Decode to RGB, resize the short side to `size`, centre-crop: uint8 [3,size,size]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if (w, h) != (size, size):
            s = size / min(w, h)
            nw, nh = max(size, round(w * s)), max(size, round(h * s))
            im = im.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in sorted order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def scan_classes(split_dir: Path, classes: list[str]) -> list[Sample]:
    """(path, class index) for every image under split_dir/<class>/ (any depth)."""
    samples: list[Sample] = []
    for i, name in enumerate(classes):
        samples += [(str(p), i) for p in list_images(split_dir / name)]
    return samples


class _Files(Dataset):
    def __init__(self, samples: list[Sample], size: int) -> None:
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        path, label = self.samples[i]
        return load_image(path, self.size), label, i


def decode_all(samples: list[Sample], size: int, num_workers: int = 0) -> Tensor:
    """Decode every file into one uint8 [N,3,size,size] tensor (used to build caches)."""
    out = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    loader = DataLoader(_Files(samples, size), batch_size=256, num_workers=num_workers)
    for x, _, idx in loader:
        out[idx] = x
    return out


class FolderSplit(Split):
    """Image files decoded on the fly; same batches() contract as TensorSplit."""

    def __init__(self, samples: list[Sample], image_size: int, num_workers: int = 0) -> None:
        self.samples = list(samples)
        self.labels = torch.tensor([s[1] for s in self.samples], dtype=torch.int64)
        self.image_size = image_size
        self.num_workers = num_workers

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[Batch]:
        dev = resolve_device(device)
        order = batch_order(len(self), shuffle, generator).tolist()
        loader = DataLoader(
            _Files(self.samples, self.image_size),
            batch_size=batch_size,
            sampler=order,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=dev.type == "cuda",
            persistent_workers=False,
        )
        for x, y, idx in loader:
            yield (x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), idx.to(dev, non_blocking=True))

    def images(self, indices: Tensor) -> Tensor:
        idx = torch.as_tensor(indices, dtype=torch.int64).cpu().tolist()
        if not idx:
            return torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.uint8)
        return torch.stack([load_image(self.samples[i][0], self.image_size) for i in idx])

    def subset(self, indices: Tensor) -> FolderSplit:
        idx = torch.as_tensor(indices, dtype=torch.int64).tolist()
        return FolderSplit([self.samples[i] for i in idx], self.image_size, self.num_workers)

    def __repr__(self) -> str:
        return f"FolderSplit(n={len(self)}, size={self.image_size}, workers={self.num_workers})"


def load_folder(root: Path, image_size: int | None, num_workers: int) -> tuple[FolderSplit, FolderSplit, list[str]]:
    """root/train/<class>/... and root/val/<class>/... (or test/) -> (train, test, class names)."""
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"folder dataset: expected {train_dir}/<class>/* and {root}/val/<class>/* (or test/)")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"folder dataset: no class folders in {train_dir}")
    unknown = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and d.name not in classes)
    if unknown:
        raise DataError(f"folder dataset: {test_dir} has classes missing from {train_dir}: {unknown[:5]}")
    train, test = scan_classes(train_dir, classes), scan_classes(test_dir, classes)
    if not train or not test:
        raise DataError(f"folder dataset: no images found under {train_dir if not train else test_dir}")
    size = image_size or 224
    return FolderSplit(train, size, num_workers), FolderSplit(test, size, num_workers), classes
