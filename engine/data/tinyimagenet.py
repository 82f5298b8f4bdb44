"""`tinyimagenet`: Tiny-ImageNet-200 (64x64, 200 classes) held in memory as uint8 tensors.

The official zip keeps val/ flat (val/images + val_annotations.txt); like the classic lab
scripts we move each val image into val/<wnid>/images/ once (idempotent), so val/ is an
ImageFolder tree and serves as the test split. Decoding 110k JPEGs takes a minute or two,
so the decoded tensors are cached next to the data as a torch.save file of uint8 tensors
(loaded with weights_only=True) and the second load takes seconds.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import torch

from .errors import DataError
from .folder import decode_all, scan_classes
from .splits import TensorSplit

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
FOLDER = "tiny-imagenet-200"
MEAN: tuple[float, float, float] = (0.4802, 0.4481, 0.3975)
STD: tuple[float, float, float] = (0.2770, 0.2691, 0.2821)
CACHE_VERSION = 1


def find_dir(root: Path) -> Path:
    """root itself if it holds wnids.txt, else root/tiny-imagenet-200."""
    return root if (root / "wnids.txt").is_file() else root / FOLDER


def _fetch_zip(url: str, dest: Path) -> None:
    """Download url to dest (via a temporary name, so a broken download never looks done)."""
    from torchvision.datasets.utils import download_url

    tmp = dest.with_suffix(".part")
    download_url(url, str(dest.parent), filename=tmp.name)
    os.replace(tmp, dest)


def download(root: Path) -> None:
    """Fetch and unzip the official archive into root/ (creates root/tiny-imagenet-200)."""
    root.mkdir(parents=True, exist_ok=True)
    zip_path = root / "tiny-imagenet-200.zip"
    if not zip_path.is_file():
        _fetch_zip(URL, zip_path)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(root)


def reorganize_val(data_dir: Path) -> int:
    """Move val/images/<f> to val/<wnid>/images/<f> using val_annotations.txt.

    Idempotent and resumable: files already moved are skipped; val/images is removed once
    empty. Returns how many files were moved by this call.
    """
    val = data_dir / "val"
    flat = val / "images"
    if not flat.is_dir():
        return 0
    ann = val / "val_annotations.txt"
    if not ann.is_file():
        raise DataError(f"tinyimagenet: {flat} exists but {ann} is missing; cannot sort val images")
    moved = 0
    for line in ann.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        src = flat / parts[0]
        if src.is_file():
            dst = val / parts[1] / "images" / parts[0]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
            moved += 1
    if not any(flat.iterdir()):
        flat.rmdir()
    return moved


def read_classes(data_dir: Path) -> tuple[list[str], list[str]]:
    """(wnids in wnids.txt order, readable names from words.txt's first synonym, else the wnid)."""
    wnids = [w.strip() for w in (data_dir / "wnids.txt").read_text().splitlines() if w.strip()]
    words: dict[str, str] = {}
    words_file = data_dir / "words.txt"
    if words_file.is_file():
        for line in words_file.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, desc = line.partition("\t")
            words[wnid.strip()] = desc.split(",")[0].strip()
    return wnids, [words.get(w) or w for w in wnids]


def load_tinyimagenet(
    root: Path, download_ok: bool, image_size: int | None = None, num_workers: int = 0
) -> tuple[TensorSplit, TensorSplit, list[str]]:
    """(train, test=reorganised val, class names), from the cache when it is valid."""
    data_dir = find_dir(root)
    if not (data_dir / "wnids.txt").is_file():
        if not download_ok:
            raise DataError(f"tinyimagenet: put the extracted '{FOLDER}' folder at {root / FOLDER} "
                            f"(from {URL}); it is missing and download is off")
        try:
            download(root)
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f"tinyimagenet: download of {URL} into {root} failed ({e}); "
                            f"put the extracted '{FOLDER}' folder at {root / FOLDER}") from e
        data_dir = find_dir(root)
    reorganize_val(data_dir)
    wnids, names = read_classes(data_dir)
    size = image_size or 64
    cache = data_dir / f"kdtui-cache-{size}px.pt"
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        if blob.get("version") == CACHE_VERSION and blob.get("wnids") == wnids:
            return (TensorSplit(blob["train_x"], blob["train_y"]), TensorSplit(blob["test_x"], blob["test_y"]),
                    names)
    train = scan_classes(data_dir / "train", wnids)
    test = scan_classes(data_dir / "val", wnids)
    if not train or not test:
        raise DataError(f"tinyimagenet: no images under {data_dir / 'train'} or {data_dir / 'val'}")
    blob = {
        "version": CACHE_VERSION,
        "wnids": wnids,
        "train_x": decode_all(train, size, num_workers),
        "train_y": torch.tensor([s[1] for s in train], dtype=torch.int64),
        "test_x": decode_all(test, size, num_workers),
        "test_y": torch.tensor([s[1] for s in test], dtype=torch.int64),
    }
    tmp = cache.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, cache)
    return TensorSplit(blob["train_x"], blob["train_y"]), TensorSplit(blob["test_x"], blob["test_y"]), names
