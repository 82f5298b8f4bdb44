"""Recipe sections shared by every method: [run], [data], [model], [teacher], [optim], [schedule],
[train], [checkpoint]. Torch-free, like engine/recipe.py which assembles them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.data.names import DATASET_NAMES
from engine.errors import UserError
from engine.methods.registry import method_names
from engine.models.registry import model_names

MAX_EXTENDS_DEPTH = 8
DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


class RecipeError(UserError, ValueError):
    """A user-facing, single-line validation error."""

    def __init__(self, file: str | Path, key: str, message: str) -> None:
        self.file, self.key, self.message = str(file), key, message
        super().__init__(_one_line(f"{file}: {key}: {message}" if key else f"{file}: {message}"))


def _one_line(text: str, limit: int = 400) -> str:
    text = text.replace("\r", "\\r").replace("\n", "\\n").replace("\x00", "\\0").replace("\x1b", "\\x1b")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Section(BaseModel):
    # allow_inf_nan: `warmup_epochs = inf` or `betas = [nan, 0.9]` would validate and then train nothing
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class RunSection(Section):
    name: str = Field("", max_length=200)
    method: str = "supervised"
    tags: list[str] = []
    note: str = ""

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in method_names():
            raise ValueError(f"unknown method {value!r}; expected one of {', '.join(method_names())}")
        return value


class DataSection(Section):
    dataset: str = "embedded"
    root: str = "data"
    batch_size: int = Field(128, ge=1, le=65536)
    eval_batch_size: int = Field(512, ge=1, le=65536)
    scale: float = Field(1.0, gt=0, le=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    num_workers: int = Field(0, ge=0, le=256)
    download: bool = True
    image_size: int | None = Field(None, ge=8, le=1024)
    embedded_per_class: int | None = Field(None, ge=1, le=100_000)
    augment: Literal["standard", "none"] = "standard"
    crop_padding: int = Field(4, ge=0, le=64)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {value!r}; expected one of {', '.join(DATASET_NAMES)}")
        return value

    @field_validator("root")
    @classmethod
    def _path_without_nul(cls, value: str) -> str:
        if "\0" in value:  # no file system accepts it; os calls on it raise ValueError, not OSError
            raise ValueError("expected a folder path, got one with a NUL character")
        return value


class ModelSection(Section):
    arch: str = "resnet20"
    num_classes: int | None = Field(None, ge=2, le=100_000)
    pretrained: bool | str = False

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value not in model_names():
            raise ValueError(f"unknown arch {value!r}; expected one of {', '.join(model_names())}")
        return value


class TeacherSection(Section):
    """Where a teacher (or pretrained backbone) comes from: another recipe's run or a file.

    `arch` names the network in a file that does not say (a checkpoint of the reference code,
    e.g. RepDistiller's ckpt_epoch_240.pth, or a bare state dict); kdtui checkpoints name their own."""

    from_recipe: str | None = Field(None, alias="from")
    checkpoint: str | None = None
    arch: str | None = None

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str | None) -> str | None:
        if value is not None and value not in model_names():
            raise ValueError(f"unknown arch {value!r}; expected one of {', '.join(model_names())}")
        return value


class OptimSection(Section):
    name: Literal["sgd", "adam", "adamw", "lars"] = "sgd"
    lr: float = Field(0.1, gt=0, le=1e9)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0, le=1)
    betas: tuple[float, float] = (0.9, 0.999)
    # lars (engine/optim.py LARS): trust coefficient and lr clipping; solo-learn's CIFAR recipes' values
    lars_eta: float = Field(0.02, gt=0, le=1)
    lars_clip: bool = True


class StageSection(Section):
    """One stage of a staged schedule (fine-tuning): its length and learning rate."""

    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    schedule: Literal["constant", "cosine"] = "constant"
    period: int | None = Field(None, ge=1)


class ScheduleSection(Section):
    name: Literal["constant", "multistep", "cosine", "cosine_floor", "cosine_fraction", "stages"] = "cosine"
    per: Literal["epoch", "step"] = "epoch"
    milestones: list[int] = []
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    period: int | None = Field(None, ge=1)
    fraction: float = Field(7 / 16, gt=0, le=0.5)  # cosine_fraction: lr0 cos(fraction pi t / period) (FixMatch)
    stages: list[StageSection] = []


class TrainSection(Section):
    epochs: int = Field(10, ge=1, le=100_000)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: str = "cpu"
    deterministic: bool = True
    log_every: int = Field(20, ge=1)
    eval_every: int = Field(1, ge=1)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    # Speed switches; defaults chosen by measurement (bench/README.md). bf16 trained 2.0x faster on
    # a CPU with AVX512-BF16 but changes numerics and is emulated (slow) on CPUs without it: opt in.
    # channels_last "auto": on for CPU (1.0-1.7x over 12 zoo models, never slower), off on CUDA/MPS
    # until bench/gpu_throughput.py has measured it there. compile: inductor warm-up takes minutes.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool = False
    grad_clip: float | None = Field(None, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    threads: int | None = Field(None, ge=1, le=1024)
    sync_bn: bool = False  # multi-process runs: BatchNorm statistics over the global batch
    evaluate: bool = True  # false: no val/test passes at all (`kdtui bench devices` timing runs)

    @field_validator("device")
    @classmethod
    def _device_string(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError(f"expected 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}")
        return value

    @field_validator("channels_last", mode="before")
    @classmethod
    def _bool_or_auto(cls, value: Any) -> Any:
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError(f'expected true, false or "auto", got {value!r}')

    def channels_last_on(self, device_type: str) -> bool:
        """Whether networks train in NHWC on this device type ('cpu', 'cuda', ...); see channels_last."""
        return device_type == "cpu" if self.channels_last == "auto" else bool(self.channels_last)


class CheckpointSection(Section):
    every: int = Field(1, ge=0)
    keep: int | None = Field(None, ge=1)
    best_metric: str = "val.top1"
    best_mode: Literal["max", "min"] = "max"

    @field_validator("best_metric")
    @classmethod
    def _split_dot_metric(cls, value: str) -> str:
        if not re.match(r"^(train|val|test)\.[A-Za-z0-9_]+$", value):
            raise ValueError(f"expected 'SPLIT.METRIC' such as 'val.top1', got {value!r}")
        return value
