"""Datasets through the real loaders, from small files written in the real on-disk formats."""

from __future__ import annotations

import gzip
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import (
    DATASET_NAMES,
    DataBundle,
    DataError,
    FolderSplit,
    TensorSplit,
    build_data,
    fashion_mnist,
    stratified_fraction,
    stratified_holdout,
    tinyimagenet,
)
from engine.data import names as names_module
from engine.data.embedded import CLASS_NAMES, make_embedded

# ---------------------------------------------------------------- CIFAR (Python-2 pickles)


class _Py2Pickler(pickle._Pickler):  # type: ignore[misc]
    """Writes bytes as Python-2 `str` opcodes, as the real CIFAR pickles (made with Python 2)
    do: they load as str under encoding='latin1' (torchvision) and as bytes under 'bytes'."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def dump_py2(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def cifar_rows(n: int, offset: int) -> np.ndarray:
    """[n, 3072] uint8 rows (R plane, G plane, B plane), each image distinct."""
    base = np.arange(3072, dtype=np.int64) % 251
    return np.stack([(base + 7 * (offset + i)) % 256 for i in range(n)]).astype(np.uint8)


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cifar-10-batches-py (5 x 4 train, 6 test) and cifar-100-python (12 train, 5 test)."""
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    for b in range(1, 6):
        dump_py2({b"batch_label": f"training batch {b} of 5".encode(),
                  b"labels": [(4 * (b - 1) + i) % 10 for i in range(4)],
                  b"data": cifar_rows(4, 4 * (b - 1)),
                  b"filenames": [f"img_{b}_{i}.png".encode() for i in range(4)]}, c10 / f"data_batch_{b}")
    dump_py2({b"batch_label": b"testing batch 1 of 1", b"labels": [9, 8, 7, 6, 5, 4],
              b"data": cifar_rows(6, 100), b"filenames": [b"t.png"] * 6}, c10 / "test_batch")
    dump_py2({b"num_cases_per_batch": 10000, b"num_vis": 3072,
              b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog",
                               b"horse", b"ship", b"truck"]}, c10 / "batches.meta")
    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    for split, n in (("train", 12), ("test", 5)):
        dump_py2({b"filenames": [b"x.png"] * n, b"batch_label": split.encode(),
                  b"fine_labels": [(3 * i) % 100 for i in range(n)], b"coarse_labels": [i % 20 for i in range(n)],
                  b"data": cifar_rows(n, 50)}, c100 / split)
    dump_py2({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
              b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, c100 / "meta")
    # The real files' md5s cannot match these small ones: bypass torchvision's check only.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    return tmp_path


def test_cifar_pickles_have_bytes_keys(cifar_root: Path) -> None:
    with open(cifar_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        assert b"data" in pickle.load(f, encoding="bytes")
    with open(cifar_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        assert "labels" in pickle.load(f, encoding="latin1")


def test_cifar10_loads(cifar_root: Path) -> None:
    b = build_data("cifar10", cifar_root, download=False)
    assert isinstance(b, DataBundle) and isinstance(b.train, TensorSplit)
    assert (b.num_classes, b.image_size, len(b.train), len(b.test)) == (10, 32, 20, 6)
    assert b.class_names[:2] == ["airplane", "automobile"] and b.val is None
    assert b.mean == (0.4914, 0.4822, 0.4465)
    assert b.train.labels.tolist() == [i % 10 for i in range(20)]
    assert b.test.labels.tolist() == [9, 8, 7, 6, 5, 4]
    x = b.train.images(torch.tensor([5]))
    assert x.dtype == torch.uint8 and x.shape == (1, 3, 32, 32)
    assert torch.equal(x[0], torch.from_numpy(cifar_rows(1, 5)[0].reshape(3, 32, 32)))


def test_cifar100_loads(cifar_root: Path) -> None:
    b = build_data("cifar100", cifar_root, download=False)
    assert (b.num_classes, len(b.train), len(b.test)) == (100, 12, 5)
    assert b.class_names[3] == "fine3"
    assert b.train.labels.tolist() == [(3 * i) % 100 for i in range(12)]


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_offline_names_folder(tmp_path: Path, name: str, folder: str) -> None:
    with pytest.raises(DataError) as e:
        build_data(name, tmp_path / "nowhere", download=False)
    msg = str(e.value)
    assert folder in msg and str(tmp_path / "nowhere") in msg and "\n" not in msg


def test_unknown_dataset_and_names() -> None:
    with pytest.raises(DataError, match="expected one of"):
        build_data("imagenet22k", "/tmp")
    assert DATASET_NAMES == names_module.DATASET_NAMES


def test_names_import_is_torch_free() -> None:
    code = "import sys, engine.data.names, engine.data; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


# ---------------------------------------------------------------- Tiny-ImageNet

WNIDS = ["n01443537", "n01629819", "n01641577"]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 210)]


def save_jpeg(path: Path, colour: tuple[int, int, int], size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, "JPEG", quality=95)


def make_tiny(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    d = root / "tiny-imagenet-200"
    d.mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (d / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\n"
                                 "n09999999\tunused\n")
    for c, w in enumerate(WNIDS):
        for i in range(n_train):
            save_jpeg(d / "train" / w / "images" / f"{w}_{i}.JPEG", COLOURS[c])
        (d / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for k in range(n_val * len(WNIDS)):
        c = k % len(WNIDS)
        save_jpeg(d / "val" / "images" / f"val_{k}.JPEG", COLOURS[c])
        lines.append(f"val_{k}.JPEG\t{WNIDS[c]}\t0\t0\t63\t63")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (d / "test" / "images").mkdir(parents=True)
    return d


def test_tinyimagenet_layout_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = make_tiny(tmp_path)
    b = build_data("tinyimagenet", tmp_path, download=False)
    assert (b.num_classes, b.image_size, len(b.train), len(b.test)) == (3, 64, 12, 6)
    assert b.class_names == ["goldfish", "European fire salamander", "n01641577"]
    assert b.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert sorted(b.test.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    for split in (b.train, b.test):  # JPEG is lossy: colours within a few levels
        means = split.images(torch.arange(len(split))).float().mean((2, 3))
        want = torch.tensor(COLOURS, dtype=torch.float32)[split.labels]
        assert (means - want).abs().max() < 8
    # val was reorganised into class folders, once
    assert not (d / "val" / "images").exists()
    assert sorted(p.name for p in (d / "val" / WNIDS[1] / "images").iterdir()) == ["val_1.JPEG", "val_4.JPEG"]
    assert tinyimagenet.reorganize_val(d) == 0
    # second load comes from the cache, without decoding
    assert list(d.glob("kdtui-cache-64px.pt"))
    monkeypatch.setattr(tinyimagenet, "decode_all", lambda *a, **k: pytest.fail("cache not used"))
    again = build_data("tinyimagenet", tmp_path, download=False)
    assert torch.equal(again.train.images(torch.arange(12)), b.train.images(torch.arange(12)))
    assert torch.equal(again.test.labels, b.test.labels)


def test_tinyimagenet_reorganize_resumes(tmp_path: Path) -> None:
    d = make_tiny(tmp_path)
    first = d / "val" / "images" / "val_0.JPEG"  # simulate an interrupted earlier run
    (d / "val" / WNIDS[0] / "images").mkdir(parents=True)
    shutil.move(str(first), str(d / "val" / WNIDS[0] / "images" / "val_0.JPEG"))
    assert tinyimagenet.reorganize_val(d) == 5
    assert tinyimagenet.reorganize_val(d) == 0
    assert len(list((d / "val").rglob("*.JPEG"))) == 6


def test_tinyimagenet_download_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    make_tiny(src, n_train=2, n_val=1)
    archive = tmp_path / "made.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in (src / "tiny-imagenet-200").rglob("*"):
            zf.write(p, p.relative_to(src))
    fetched: list[str] = []

    def fake_fetch(url: str, dest: Path) -> None:  # never the network in tests
        fetched.append(url)
        shutil.copy(archive, dest)

    monkeypatch.setattr(tinyimagenet, "_fetch_zip", fake_fetch)
    root = tmp_path / "data"
    b = build_data("tinyimagenet", root, download=True)
    assert fetched == [tinyimagenet.URL] and (len(b.train), len(b.test)) == (6, 3)
    assert (root / "tiny-imagenet-200" / "val" / WNIDS[2] / "images").is_dir()


def test_tinyimagenet_missing_offline(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tiny-imagenet-200"):
        build_data("tinyimagenet", tmp_path, download=False)


# ---------------------------------------------------------------- ImageFolder


def make_folder(root: Path, val_name: str = "val") -> None:
    for split, n in (("train", 5), (val_name, 2)):
        for c, cls in enumerate(["cat", "dog"]):
            for i in range(n):
                p = root / split / cls / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (24 + 4 * i, 20), (100 * c, 10 * i, 50)).save(p)


def test_folder_split(tmp_path: Path) -> None:
    make_folder(tmp_path)
    b = build_data("folder", tmp_path, image_size=16)
    assert isinstance(b.train, FolderSplit) and b.class_names == ["cat", "dog"]
    assert (len(b.train), len(b.test), b.image_size, b.num_classes) == (10, 4, 16, 2)
    assert b.train.num_batches(4, drop_last=True) == 2 and b.train.num_batches(4, drop_last=False) == 3
    batches = list(b.train.batches(4, shuffle=True, drop_last=False, generator=torch.Generator().manual_seed(1)))
    assert [len(y) for _, y, _ in batches] == [4, 4, 2]
    order = torch.cat([i for _, _, i in batches])
    assert torch.equal(order, torch.randperm(10, generator=torch.Generator().manual_seed(1)))
    for x, y, idx in batches:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 16, 16)
        assert torch.equal(y, b.train.labels[idx]) and torch.equal(x, b.train.images(idx))
    x = b.train.images(torch.tensor([7]))  # dog, i=2: colour (100, 20, 50)
    assert x[0, :, 8, 8].tolist() == [100, 20, 50]


def test_folder_test_dirname_and_errors(tmp_path: Path) -> None:
    make_folder(tmp_path / "a", val_name="test")
    assert len(build_data("folder", tmp_path / "a", image_size=8).test) == 4
    with pytest.raises(DataError, match="train"):
        build_data("folder", tmp_path / "empty")


# ---------------------------------------------------------------- Fashion-MNIST


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(1, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    b = build_data("fashion_mnist", tmp_path)
    x = b.train.images(torch.arange(20))
    assert (len(b.train), len(b.test), x.shape[1:]) == (20, 10, (3, 32, 32))
    raw = fashion_mnist.read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    assert torch.equal(x[3, 1, 2:30, 2:30], torch.from_numpy(raw[3].copy()))
    assert x[:, :, :2].sum() == 0 and torch.equal(x[:, 0], x[:, 2])
    assert b.class_names[0] == "t-shirt" and b.train.labels.tolist() == [i % 10 for i in range(20)]


@pytest.mark.skipif(fashion_mnist.find_files(Path("/nonexistent")) is None,
                    reason="Fashion-MNIST idx files not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_real_files() -> None:
    b = build_data("fashion_mnist", "/nonexistent", scale=0.1, seed=0)
    assert (len(b.train), len(b.test)) == (6000, 10000)
    assert b.train.class_counts(10).tolist() == [600] * 10
    x = b.test.images(torch.arange(256)).float() / 255
    assert abs(x.mean().item() - b.mean[0]) < 0.05


# ---------------------------------------------------------------- embedded


def test_embedded_deterministic_and_balanced() -> None:
    x1, y1 = make_embedded(6, seed=0)
    x2, y2 = make_embedded(6, seed=0)
    x3, _ = make_embedded(6, seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert x1.shape == (60, 3, 32, 32) and x1.dtype == torch.uint8 and y1.dtype == torch.int64
    assert torch.bincount(y1).tolist() == [6] * 10
    assert y1.tolist() != sorted(y1.tolist())  # not stored class by class
    assert x1.float().std() > 40  # real content, not blank


def test_embedded_bundle(tmp_path: Path) -> None:
    b = build_data("embedded", tmp_path, embedded_per_class=8)
    assert (b.name, b.num_classes, b.image_size, len(b.train), len(b.test)) == ("embedded", 10, 32, 80, 1000)
    assert b.class_names == list(CLASS_NAMES) and len(set(CLASS_NAMES)) == 10
    assert b.test.class_counts(10).tolist() == [100] * 10
    small = build_data("embedded", tmp_path, embedded_per_class=2, image_size=16)
    assert small.image_size == 16 and small.train.images(torch.tensor([0])).shape == (1, 3, 16, 16)


# ---------------------------------------------------------------- scale / val


def test_stratified_fraction_and_holdout() -> None:
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 1 + [3] * 20)
    labels = labels[torch.randperm(34, generator=torch.Generator().manual_seed(0))]
    keep = stratified_fraction(labels, 0.3, seed=5)
    assert torch.bincount(labels[keep], minlength=4).tolist() == [3, 1, 1, 6]
    assert torch.equal(keep, stratified_fraction(labels, 0.3, seed=5))
    assert not torch.equal(keep, stratified_fraction(labels, 0.3, seed=6))
    assert torch.equal(keep, keep.sort().values) and keep.unique().numel() == keep.numel()
    tr, va = stratified_holdout(labels, 0.2, seed=1)
    assert torch.bincount(labels[va], minlength=4).tolist() == [2, 1, 0, 4]  # singleton class stays in train
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(tr) + len(va) == 34
    tr2, va2 = stratified_holdout(labels, 0.2, seed=1)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)


def test_bundle_scale_and_val(tmp_path: Path) -> None:
    kw = dict(embedded_per_class=40, scale=0.5, val_fraction=0.25)
    b = build_data("embedded", tmp_path, seed=3, **kw)
    assert b.train.class_counts(10).tolist() == [15] * 10 and b.val is not None
    assert b.val.class_counts(10).tolist() == [5] * 10
    full = build_data("embedded", tmp_path, embedded_per_class=40)
    key = lambda s: {bytes(s.images(torch.tensor([i])).numpy()) for i in range(len(s))}
    train_keys, val_keys, all_keys = key(b.train), key(b.val), key(full.train)
    assert train_keys.isdisjoint(val_keys) and (train_keys | val_keys) <= all_keys
    again = build_data("embedded", tmp_path, seed=3, **kw)
    other = build_data("embedded", tmp_path, seed=4, **kw)
    assert torch.equal(again.val.images(torch.arange(50)), b.val.images(torch.arange(50)))
    assert not torch.equal(other.val.images(torch.arange(50)), b.val.images(torch.arange(50)))
    with pytest.raises(DataError):
        build_data("embedded", tmp_path, scale=0)


# ---------------------------------------------------------------- TensorSplit.batches


def indexed_split(n: int = 10) -> TensorSplit:
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return TensorSplit(x, torch.arange(n) % 3)


def test_tensor_split_batches() -> None:
    s = indexed_split(10)
    assert s.num_batches(4, drop_last=True) == 2 and s.num_batches(4, drop_last=False) == 3
    out = list(s.batches(4, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(7)))
    assert [len(y) for _, y, _ in out] == [4, 4]
    order = torch.cat([i for _, _, i in out])
    assert torch.equal(order, torch.randperm(10, generator=torch.Generator().manual_seed(7))[:8])
    for x, y, idx in out:
        assert x.dtype == torch.uint8 and idx.dtype == torch.int64
        assert torch.equal(x[:, 0, 0, 0].long(), idx) and torch.equal(y, idx % 3)
        assert torch.equal(s.images(idx), x)
    again = torch.cat([i for _, _, i in s.batches(4, shuffle=True, drop_last=True,
                                                   generator=torch.Generator().manual_seed(7))])
    assert torch.equal(again, order)
    plain = list(s.batches(4, shuffle=False, drop_last=False, generator=None, device="cpu"))
    assert torch.cat([i for _, _, i in plain]).tolist() == list(range(10)) and len(plain[-1][0]) == 2


def test_subset_keeps_rows() -> None:
    s = indexed_split(10).subset(torch.tensor([8, 2, 5]))
    assert len(s) == 3 and s.labels.tolist() == [2, 2, 2]
    assert s.images(torch.tensor([0, 2]))[:, 0, 0, 0].tolist() == [8, 5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_split_cuda_cache() -> None:
    s = indexed_split(10)
    x, y, i = next(s.batches(4, shuffle=False, drop_last=False, device="cuda"))
    assert x.is_cuda and y.is_cuda and i.is_cuda
    assert s.on_device("cuda")[0] is s.on_device("cuda")[0]
