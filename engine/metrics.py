"""Metric events: one JSON line each in metrics.jsonl, the same scalars in TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from engine.rundir import RunDir, atomic_write_text, read_jsonl


class MetricsLog:
    """Appends flushed JSON lines and mirrors numeric fields as `split/name` TensorBoard scalars."""

    def __init__(self, run: RunDir, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = run.metrics_path
        if resume_step is not None:
            _truncate_after(self.path, resume_step)
        # purge_step drops TensorBoard events past the checkpoint we resume from
        self.tb = SummaryWriter(str(run.tb_dir), flush_secs=10, purge_step=resume_step)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run

    def log(self, split: str, epoch: int, step: int, **values: Any) -> dict[str, Any]:
        event = {"time": time.time(), "epoch": epoch, "step": step, "split": split}
        event.update({k: _clean(v) for k, v in values.items()})
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self.tb.add_scalar(f"{split}/{key}", value, step)
        return event

    def flush(self) -> None:
        self.file.flush()
        self.tb.flush()

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: keep them readable as strings rather than emit invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop events logged after the checkpoint so curves do not double back."""
    if not path.exists():
        return
    kept = [event for event in read_jsonl(path) if int(event.get("step", 0)) <= step]
    atomic_write_text(path, "".join(json.dumps(event) + "\n" for event in kept))
