"""Checkpoints: written to a temp file then renamed, read with weights_only=True.

A checkpoint holds tensors, numbers, strings and plain containers only (the recipe
as a TOML string), so loading never runs pickled code.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import torch

from engine.errors import CheckpointError, DiskFullError

FORMAT = "kdtui-checkpoint"
VERSION = 1
# Test-only fault injection (tests/reliability): pause this many seconds inside every checkpoint
# write, with part of the temp file on disk, so a test can SIGKILL the engine mid-write. Unset: no cost.
FAULT_DELAY_ENV = "KDTUI_FAULT_DELAY_CHECKPOINT_S"
TEMP_SUFFIX = ".tmp"


class _Writer:
    """The file handle torch.save writes through. torch's zip writer swallows an OSError raised by
    write() (disk full, file-size limit) and fails later with a RuntimeError that no longer says why;
    this keeps the first one so save_checkpoint can report it."""

    def __init__(self, handle: Any, pause_s: float = 0.0) -> None:
        self.handle, self.pause_s, self.error = handle, pause_s, None

    def write(self, data: bytes) -> int:
        try:
            written = self.handle.write(data)
        except OSError as err:
            self.error = self.error or err
            raise
        if self.pause_s:  # fault injection: the first bytes are on disk, the rest not yet
            self.handle.flush()
            time.sleep(self.pause_s)
            self.pause_s = 0.0
        return written

    def flush(self) -> None:
        self.handle.flush()


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomic: the previous file at `path` stays intact if anything fails midway."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer = _Writer(handle, float(os.environ.get(FAULT_DELAY_ENV) or 0))
            try:
                torch.save({"format": FORMAT, "version": VERSION, **state}, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise DiskFullError(err.errno, f"disk full while writing {path}: {err.strerror}") from err
        raise


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temp files a killed writer left behind (`.NAME.*.tmp`); call before writing again."""
    removed = []
    for stale in folder.glob(f".*{TEMP_SUFFIX}") if folder.is_dir() else []:
        stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a kdtui checkpoint; every failure is a CheckpointError with one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is foreign or damaged
        raise CheckpointError(f"{path}: not a kdtui checkpoint (not a PyTorch zip archive; truncated or foreign file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsupported content"
        raise CheckpointError(f"{path}: refused to load (not plain tensors/data; weights_only): {first[:200]}") \
            from None
    except Exception as err:  # damaged bytes surface as RuntimeError, EOFError, KeyError, UnicodeDecodeError, ...
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a kdtui checkpoint (no '{FORMAT}' marker)")
    if "model" not in state:
        raise CheckpointError(f"{path}: kdtui checkpoint without model weights")
    _check_fields(state, path)
    return state


def _check_fields(state: dict[str, Any], path: Path) -> None:
    """The fields readers use as metadata have their types, so a damaged or crafted file is one clear
    line here rather than a traceback in whichever command reads it."""
    expected = {"model": dict, "arch": str, "num_classes": int, "dataset": str, "class_names": list | tuple,
                "recipe": str, "progress": dict, "method": str}
    for key, kind in expected.items():
        value = state.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise CheckpointError(f"{path}: damaged kdtui checkpoint: {key!r} has type {type(value).__name__}")
    epoch = (state.get("progress") or {}).get("epoch", 0)
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise CheckpointError(f"{path}: damaged kdtui checkpoint: progress.epoch has type {type(epoch).__name__}")
    if not all(isinstance(key, str) for key in state["model"]):
        raise CheckpointError(f"{path}: damaged kdtui checkpoint: 'model' is not a state dict")
    if not 0 < state.get("num_classes", 1) <= 1_000_000:
        raise CheckpointError(f"{path}: damaged kdtui checkpoint: num_classes = {state['num_classes']}")
    try:
        tomllib.loads(state.get("recipe", ""))
    except (tomllib.TOMLDecodeError, RecursionError):
        raise CheckpointError(f"{path}: damaged kdtui checkpoint: its recipe is not valid TOML") from None
