"""Per-checkpoint predictions on a split, cached by the checkpoint file's content hash.

A diff needs every sample's top-5, probabilities and loss; computing them is a full
inference pass, reading them back takes milliseconds. The cache is plain numpy (.npz),
and this module imports torch only to compute a miss, so `kdtui diff` on a cache hit and
the TUI never import torch.

Where: a checkpoint inside a run directory (`runs/<id>/checkpoints/x.pt`) caches into that
run's `predictions/`; any other checkpoint into `.kdtui-predictions/` next to it. The file
name is `<sha256 prefix>-<split>.npz`, so a changed checkpoint simply misses, and the
hard-linked `best.pt` / `epoch_NNNN.pt` / `last.pt` of one epoch share one entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import CheckpointError

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "train")
TOPK = 5
CACHE_VERSION = 1
_ARRAYS = ("labels", "top_idx", "top_prob", "loss", "signature")


@dataclass(frozen=True)
class Predictions:
    """One checkpoint's outputs on one split, in the split's fixed order."""

    checkpoint: str
    digest: str  # sha256 of the checkpoint file
    split: str
    meta: dict[str, Any]  # arch, dataset, num_classes, class_names, method, epoch, recipe
    labels: np.ndarray  # int64 [N]
    top_idx: np.ndarray  # int32 [N, k]  classes by falling probability
    top_prob: np.ndarray  # float32 [N, k]
    loss: np.ndarray  # float32 [N]  cross-entropy per sample
    signature: np.ndarray  # int64 [N]  checksum of each image: proves two caches saw the same images

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def pred(self) -> np.ndarray:
        return self.top_idx[:, 0]

    @property
    def accuracy(self) -> float:
        return float((self.pred == self.labels).mean()) if self.n else 0.0


# ---------------------------------------------------------------- cache files (numpy only)
def file_digest(path: Path) -> str:
    """sha256 of the file's bytes; unreadable files become a one-line CheckpointError."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file (.pt)") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read checkpoint ({err.strerror or type(err).__name__})") from None


def cache_dir(checkpoint: Path) -> Path:
    """The owning run's predictions/ folder, else .kdtui-predictions/ beside the checkpoint."""
    from engine.rundir import RunDir

    folder = checkpoint.resolve().parent
    if folder.name == "checkpoints" and (folder.parent / "run.json").is_file():
        return RunDir(folder.parent).predictions
    return folder / ".kdtui-predictions"


def cache_file(checkpoint: Path, digest: str, split: str) -> Path:
    return cache_dir(checkpoint) / f"{digest[:24]}-{split}.npz"


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_predictions(pred: Predictions, path: Path | None = None) -> Path:
    path = path or cache_file(Path(pred.checkpoint), pred.digest, pred.split)
    header = {"version": CACHE_VERSION, "digest": pred.digest, "split": pred.split, "meta": pred.meta}
    atomic_save_npz(path, header=np.array(json.dumps(header)), **{name: getattr(pred, name) for name in _ARRAYS})
    return path


def load_cached(checkpoint: str | Path, split: str, digest: str | None = None) -> Predictions | None:
    """The cached predictions of this exact file content, or None (missing, stale or damaged)."""
    checkpoint = Path(checkpoint)
    digest = digest or file_digest(checkpoint)
    path = cache_file(checkpoint, digest, split)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(str(npz["header"]))
            arrays = {name: npz[name] for name in _ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        log.warning("%s: damaged predictions cache (%s); recomputing", path, type(err).__name__)
        return None
    if header.get("version") != CACHE_VERSION or header.get("digest") != digest or header.get("split") != split:
        return None
    n = arrays["labels"].shape[0]
    if any(arrays[name].shape[0] != n for name in _ARRAYS):
        log.warning("%s: inconsistent array lengths; recomputing", path)
        return None
    return Predictions(str(checkpoint), digest, split, header["meta"], **arrays)


# ---------------------------------------------------------------- computing misses (torch)
def get_predictions(paths: Sequence[str | Path], split: str, device: str = "cpu", batch_size: int = 512,
                    check: Callable[[list[dict[str, Any]]], None] | None = None) -> list[Predictions]:
    """Predictions for each checkpoint, evaluating only cache misses.

    `check(metas)` sees every checkpoint's metadata (from the cache or the loaded file) before any
    evaluation starts, so incompatible inputs fail fast. Misses that share a data configuration
    are evaluated together in one pass over the data (built once).
    """
    if split not in SPLITS:
        raise CheckpointError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    paths = [Path(p) for p in paths]
    digests = [file_digest(p) for p in paths]
    found: dict[int, Predictions] = {}
    for i, (path, digest) in enumerate(zip(paths, digests, strict=True)):
        hit = load_cached(path, split, digest)
        if hit is not None:
            found[i] = hit
    # one evaluation per cache entry: hard links (best.pt = epoch_NNNN.pt) or A == B share one
    entries = {i: cache_file(paths[i], digests[i], split) for i in range(len(paths)) if i not in found}
    missing = [i for i in entries if i == min(j for j in entries if entries[j] == entries[i])]
    loaded = {i: _open(paths[i], digests[i], device) for i in missing}
    first_of = {entries[i]: i for i in missing}
    metas = [found[i].meta if i in found else loaded[first_of[entries[i]]][1] for i in range(len(paths))]
    if check is not None:
        check(metas)
    if loaded:
        groups: dict[str, list[int]] = {}
        for i in missing:
            groups.setdefault(_data_key(loaded[i][1]["recipe"]), []).append(i)
        for members in groups.values():
            results = _evaluate([loaded[i][0] for i in members], loaded[members[0]][1]["recipe"], split,
                                device, batch_size, paths[members[0]])
            for i, arrays in zip(members, results, strict=True):
                found[i] = Predictions(str(paths[i]), digests[i], split, loaded[i][1], **arrays)
                save_predictions(found[i])
        for i, entry in entries.items():
            if i not in found:
                twin = found[first_of[entry]]
                found[i] = Predictions(str(paths[i]), twin.digest, split, twin.meta,
                                       **{name: getattr(twin, name) for name in _ARRAYS})
    return [found[i] for i in range(len(paths))]


def data_in_memory(recipe: str) -> bool:
    """Whether this process already built the data this recipe evaluates on (images are then cheap)."""
    return _data_key(recipe) in _BUNDLES


def _open(path: Path, digest: str, device: str) -> tuple[Any, dict[str, Any]]:
    """(model in eval mode, meta); fails if the file changed between hashing and loading."""
    from engine.evaluate import load_classifier

    before = _stat_key(path)
    model, state = load_classifier(path, device)
    if _stat_key(path) != before or file_digest(path) != digest:
        raise CheckpointError(f"{path}: the file changed while it was being read (a run still writing it?); retry")
    meta = {
        "arch": state.get("arch"),
        "dataset": state.get("dataset"),
        "num_classes": int(state.get("num_classes", 0)),
        "class_names": [str(c) for c in state.get("class_names") or []],
        "method": state.get("method"),
        "epoch": int((state.get("progress") or {}).get("epoch", 0)),
        "recipe": state.get("recipe", ""),
    }
    if not isinstance(meta["recipe"], str) or not meta["recipe"]:
        raise CheckpointError(f"{path}: kdtui checkpoint without its recipe; cannot rebuild its data set")
    return model, meta


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _data_key(recipe: str) -> str:
    """What decides which images a split holds: the data section and the seed."""
    import tomllib

    parsed = tomllib.loads(recipe)
    keys = ("dataset", "root", "scale", "val_fraction", "image_size", "embedded_per_class")
    data = {k: parsed.get("data", {}).get(k) for k in keys}
    return json.dumps([data, parsed.get("train", {}).get("seed", 0)], sort_keys=True)


_BUNDLES: dict[str, Any] = {}


def split_data(recipe: str, split: str) -> tuple[Any, Any]:
    """(DataBundle, Split) a checkpoint's recipe evaluates on; the last bundle is kept for reuse."""
    from engine.evaluate import checkpoint_data

    key = _data_key(recipe)
    if key not in _BUNDLES:
        _BUNDLES.clear()  # keep one: a data set can be large
        _BUNDLES[key] = checkpoint_data({"recipe": recipe})
    bundle = _BUNDLES[key]
    chosen = getattr(bundle, split)
    if chosen is None:
        raise CheckpointError(f"the recipe has no {split!r} split (data.val_fraction is 0); use --split test")
    return bundle, chosen


def _evaluate(models: list[Any], recipe: str, split: str, device: str, batch_size: int,
              first: Path) -> list[dict[str, np.ndarray]]:
    """One pass over the split feeding every model the same normalised batch; outputs stay on
    the device until the end (one transfer, no per-batch sync)."""
    import torch
    import torch.nn.functional as F

    from engine.data import augment as aug

    try:
        bundle, chosen = split_data(recipe, split)
    except CheckpointError as err:
        raise CheckpointError(f"{first}: {err}") from None
    n, k = len(chosen), min(TOPK, bundle.num_classes)
    dev = torch.device(device)
    labels = torch.empty(n, dtype=torch.int64, device=dev)
    signature = torch.empty(n, dtype=torch.int64, device=dev)
    outs = [(torch.empty(n, k, dtype=torch.int32, device=dev), torch.empty(n, k, device=dev),
             torch.empty(n, device=dev)) for _ in models]
    weights: torch.Tensor | None = None
    with torch.no_grad():
        for images, y, idx in chosen.batches(batch_size, shuffle=False, drop_last=False, device=dev):
            if weights is None:
                weights = torch.arange(1, images[0].numel() + 1, dtype=torch.int64, device=dev)
            labels[idx] = y
            signature[idx] = (images.flatten(1).to(torch.int64) * weights).sum(1)
            x = aug.normalize(images, bundle.mean, bundle.std)
            for model, (top_idx, top_prob, loss) in zip(models, outs, strict=True):
                out = model(x)
                logp = F.log_softmax((out[0] if isinstance(out, tuple) else out).float(), dim=1)
                top = logp.topk(k, dim=1)
                top_idx[idx], top_prob[idx] = top.indices.to(torch.int32), top.values.exp()
                loss[idx] = F.nll_loss(logp, y, reduction="none")
    common = {"labels": labels.cpu().numpy(), "signature": signature.cpu().numpy()}
    return [{**common, "top_idx": i.cpu().numpy(), "top_prob": p.cpu().numpy(), "loss": lo.cpu().numpy()}
            for i, p, lo in outs]
