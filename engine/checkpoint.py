"""Checkpoints: written to a temp file then renamed, read with weights_only=True.

A checkpoint holds tensors, numbers, strings and plain containers only (the recipe
as a TOML string), so loading never runs pickled code.

`load_weights` also reads the weights files of the reference code, for teachers and pretrained
backbones: a bare state dict, or a dict holding one under `model` (HobbitLong/RepDistiller
train_teacher.py / train_student.py: {'epoch', 'model', 'accuracy', 'optimizer'}, and the final
`*_last.pth` with {'opt': argparse.Namespace, 'model', ...}; mdistiller's downloaded teachers are
those files), `net` (winycg/HSAKD's runs: {'net', 'acc', 'epoch', 'optimizer'}) or `state_dict`
(HSAKD's pretrained backbones, many others); DataParallel's `module.` prefix is dropped. Still
weights_only. One class is let through on top: argparse.Namespace, for RepDistiller's 'opt'. Its
unpickling only creates an empty object and fills its __dict__ (no __setstate__, no reduce call),
and the attribute values pass through the same restricted unpickler, so it cannot run code; the
value is never used. Any other class stays refused with one line.
"""

from __future__ import annotations

import argparse
import contextlib
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
STATE_DICT_KEYS = ("model", "net", "state_dict")  # where the reference programs put theirs, in this order
DATA_PARALLEL_PREFIX = "module."
FOREIGN_SAFE_GLOBALS = [argparse.Namespace]  # RepDistiller's 'opt'; see the module docstring


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
    return _as_kdtui(_read(path, map_location, foreign=False), path)


def load_weights(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict | None]:
    """(state dict, the kdtui checkpoint it is part of) for a kdtui checkpoint, (state dict, None)
    for a reference-code weights file (see the module docstring); anything else is one line."""
    path = Path(path)
    state = _read(path, map_location, foreign=True)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        checkpoint = _as_kdtui(state, path)
        return checkpoint["model"], checkpoint
    return _foreign_state_dict(state, path), None


def _read(path: Path, map_location: str | torch.device, foreign: bool) -> Any:
    """torch.load(weights_only=True) with one-line errors. kdtui's own files are zip archives;
    reference files may also be in the legacy (pre-1.6) format, which weights_only reads as safely."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not foreign and not zipfile.is_zipfile(path):  # torch.save writes a zip archive; else foreign or damaged
        raise CheckpointError(f"{path}: not a kdtui checkpoint (not a PyTorch zip archive; truncated or foreign file)")
    try:
        with torch.serialization.safe_globals(FOREIGN_SAFE_GLOBALS) if foreign else contextlib.nullcontext():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused to load (not plain tensors/data; weights_only): "
                              f"{_refusal_reason(err)[:200]}") from None
    except Exception as err:  # damaged bytes surface as RuntimeError, EOFError, KeyError, UnicodeDecodeError, ...
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(err).__name__})") from None


def _refusal_reason(err: Exception) -> str:
    """The line of torch's weights_only message that names what was refused (not its generic preamble)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation"))]
    return (specific or lines or ["unsupported content"])[0].removeprefix("WeightsUnpickler error: ")


def _as_kdtui(state: Any, path: Path) -> dict[str, Any]:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a kdtui checkpoint (no '{FORMAT}' marker)")
    if "model" not in state:
        raise CheckpointError(f"{path}: kdtui checkpoint without model weights")
    _check_fields(state, path)
    return state


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _foreign_state_dict(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a reference-code file, without DataParallel's `module.` prefix."""
    if _is_state_dict(state):
        weights = state
    elif isinstance(state, dict) and (key := next((k for k in STATE_DICT_KEYS if _is_state_dict(state.get(k))), None)):
        weights = state[key]
    else:
        found = type(state).__name__
        if isinstance(state, dict):
            found = f"a dict with keys {sorted(str(k)[:40] for k in state)[:6]}"
        raise CheckpointError(f"{path}: no state dict found (expected a kdtui checkpoint, a state dict, or a dict "
                              f"with one under {', '.join(map(repr, STATE_DICT_KEYS))}; found {found})")
    if all(k.startswith(DATA_PARALLEL_PREFIX) for k in weights):
        weights = {k.removeprefix(DATA_PARALLEL_PREFIX): v for k, v in weights.items()}
    return dict(weights)


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
