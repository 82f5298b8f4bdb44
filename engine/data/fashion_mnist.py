"""`fashion_mnist`: the real Fashion-MNIST idx files, 28x28 gray -> 32x32 RGB (pad 2, repeat).

A small real-image check that needs no download: Debian's `dataset-fashion-mnist` package
installs the four idx .gz files in /usr/share/datasets/fashion-mnist, which is searched after
`root` (and root/fashion-mnist, root/FashionMNIST/raw as torchvision lays them out).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError
from .splits import TensorSplit

CLASS_NAMES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
# Measured once over the 60k training images after padding to 32x32 (gray, so equal channels).
MEAN: tuple[float, float, float] = (0.2190, 0.2190, 0.2190)
STD: tuple[float, float, float] = (0.3318, 0.3318, 0.3318)
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (optionally .gz): big-endian magic (0, 0, dtype, ndim), dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"fashion_mnist: {path} is not an unsigned-byte idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"fashion_mnist: {path} is truncated ({data.size} bytes for shape {tuple(dims)})")
    return data.reshape(tuple(dims))


def find_files(root: Path) -> dict[str, Path] | None:
    """The four idx files from the first candidate folder that has all of them."""
    for folder in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw", SYSTEM_DIR):
        found = {}
        for key, stem in FILES.items():
            for name in (stem, stem + ".gz"):
                if (folder / name).is_file():
                    found[key] = folder / name
                    break
        if len(found) == len(FILES):
            return found
    return None


def to_rgb32(images: np.ndarray) -> Tensor:
    """uint8 [N,28,28] -> uint8 [N,3,32,32]: zero-pad 2 pixels, repeat the gray channel."""
    x = torch.from_numpy(images.copy())
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def load_fashion_mnist(root: Path) -> tuple[TensorSplit, TensorSplit, list[str]]:
    files = find_files(root)
    if files is None:
        raise DataError(
            f"fashion_mnist: put train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
            f"t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz) in {root} "
            f"(or `apt-get install dataset-fashion-mnist`)"
        )
    arrays = {k: read_idx(p) for k, p in files.items()}

    def split(x: str, y: str) -> TensorSplit:
        return TensorSplit(to_rgb32(arrays[x]), torch.from_numpy(arrays[y].astype(np.int64)))

    return split("train_x", "train_y"), split("test_x", "test_y"), list(CLASS_NAMES)
