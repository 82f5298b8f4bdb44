"""What this machine can train on, and the `--device` strings that name it.

Torch-free: CUDA devices come from `nvidia-smi`; only without it do we ask a short torch
subprocess, so listing devices never loads torch into the CLI or the TUI.

Device strings (`--device`, repeatable; each occurrence is one queue slot):
  cpu            one process on the CPU
  cpu*N          N gloo processes on the CPU, one DistributedDataParallel-style job (torchrun)
  cuda | cuda:N  one process on GPU N (`cuda` is cuda:0)
  cuda:N,M,...   one job over several GPUs (torchrun, nccl), one process per GPU
  mps            Apple GPU (not validated here)

`DeviceLocks` are the per-device slots the queue (tui/queue.py) and `kdtui bench` hold
while a job uses a device: flock()ed files under RUNS/.locks/, released by the kernel when
the holder dies, so no stale lock outlives a crash.
"""

from __future__ import annotations

import fcntl
import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError

MAX_CPU_PROCESSES = 64


class DeviceError(UserError):
    """A --device string that is malformed or names hardware this machine lacks."""


@dataclass(frozen=True)
class Device:
    """One detected device; memory in MiB (None when unknown)."""

    kind: str  # 'cpu' | 'cuda'
    index: int
    name: str
    memory_total_mb: int | None
    memory_free_mb: int | None
    cores: int | None = None  # CPU only


@dataclass(frozen=True)
class DeviceSpec:
    """A parsed --device string: one job on one device, or one multi-process job on several."""

    kind: str  # 'cpu' | 'cuda' | 'mps'
    indices: tuple[int, ...] = ()  # cuda indices (visible numbering)
    nproc: int = 1  # processes on this machine for one job

    @property
    def text(self) -> str:
        """Canonical form, recorded as the run's `device`: cpu, cpu*2, cuda:0, cuda:0,1."""
        if self.kind == "cuda":
            return "cuda:" + ",".join(map(str, self.indices))
        return f"cpu*{self.nproc}" if self.kind == "cpu" and self.nproc > 1 else self.kind

    @property
    def is_group(self) -> bool:
        return self.nproc > 1

    @property
    def train_device(self) -> str:
        """The recipe's train.device for this job (each rank of a cuda group picks cuda:LOCAL_RANK)."""
        if self.kind == "cuda":
            return "cuda" if self.is_group else f"cuda:{self.indices[0]}"
        return self.kind

    @property
    def slots(self) -> tuple[str, ...]:
        """Names of the physical devices this job occupies (for the per-device queue)."""
        return tuple(f"cuda{i}" for i in self.indices) if self.kind == "cuda" else (self.kind,)


_SPEC = re.compile(r"^(?:(?P<cpu>cpu)(?:\*(?P<n>\d+))?|(?P<cuda>cuda)(?::(?P<idx>\d+(?:,\d+)*))?|(?P<mps>mps))$")


def parse_device_spec(spec: str, devices: list[Device] | None = None, check: bool = True) -> DeviceSpec:
    """'cuda:0,1' -> DeviceSpec; checks CUDA indices against this machine (or `devices`) unless
    check=False (re-reading a spec that was validated when the run was created)."""
    text = spec.strip().lower().replace(" ", "")
    match = _SPEC.match(text)
    if not match:
        raise DeviceError(f"--device {spec!r}: expected cpu, cpu*N, cuda, cuda:N, cuda:N,M,... or mps")
    if match["cpu"]:
        n = int(match["n"] or 1)
        if not 1 <= n <= MAX_CPU_PROCESSES:
            raise DeviceError(f"--device {spec!r}: cpu*N needs 1 <= N <= {MAX_CPU_PROCESSES}")
        return DeviceSpec("cpu", (), n)
    if match["mps"]:
        return DeviceSpec("mps")
    indices = tuple(int(i) for i in (match["idx"] or "0").split(","))
    if len(set(indices)) != len(indices):
        raise DeviceError(f"--device {spec!r}: a GPU is listed twice")
    if not check:
        return DeviceSpec("cuda", indices, len(indices))
    have = [d.index for d in (detect_devices() if devices is None else devices) if d.kind == "cuda"]
    missing = [i for i in indices if i not in have]
    if missing:
        found = f"this machine has cuda:{','.join(map(str, have))}" if have else "this machine has no CUDA device"
        raise DeviceError(f"--device {spec!r}: no cuda:{missing[0]}; {found} (see `kdtui devices`)")
    return DeviceSpec("cuda", indices, len(indices))


def detect_devices() -> list[Device]:
    """The CPU (cores, RAM) and every visible CUDA GPU (name, total and free memory)."""
    return [_cpu(), *_cuda_devices()]


def _cpu() -> Device:
    name = "CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    total = free = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            info = dict(line.split(":", 1) for line in handle if ":" in line)
        total = int(info["MemTotal"].split()[0]) // 1024
        free = int(info.get("MemAvailable", info["MemFree"]).split()[0]) // 1024
    except (OSError, KeyError, ValueError):
        pass
    return Device("cpu", 0, name, total, free, cores=cpu_cores())


def cpu_cores() -> int:
    """Cores this process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cuda_devices() -> list[Device]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return []
    rows = _nvidia_smi()
    if rows is None:
        return _torch_probe()
    if visible is not None:  # renumber as CUDA sees them; UUIDs and MIG names need torch
        order = [v.strip() for v in visible.split(",") if v.strip()]
        if not all(v.isdigit() for v in order):
            return _torch_probe()
        by_index = {d.index: d for d in rows}
        rows = [Device("cuda", i, by_index[int(v)].name, by_index[int(v)].memory_total_mb,
                       by_index[int(v)].memory_free_mb) for i, v in enumerate(order) if int(v) in by_index]
    return rows


def _nvidia_smi() -> list[Device] | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    devices = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            devices.append(Device("cuda", int(parts[0]), parts[1], _int(parts[2]), _int(parts[3])))
    return devices


_PROBE = """
import json, torch
out = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append([i, torch.cuda.get_device_name(i), total >> 20, free >> 20])
print(json.dumps(out))
"""


@functools.cache
def _torch_probe() -> list[Device]:
    """Ask torch in a subprocess (no nvidia-smi, or CUDA_VISIBLE_DEVICES with UUIDs); asked once
    per process. Without NVIDIA device nodes there is nothing to ask about."""
    if not glob.glob("/dev/nvidia[0-9]*"):
        return []
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True)
        rows = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return []
    return [Device("cuda", int(i), str(name), int(total), int(free)) for i, name, total, free in rows]


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:
        return None


def describe(device: Device) -> str:
    """One line for listings: 'cuda:0  NVIDIA H100 80GB HBM3  81559 MiB (80000 free)'."""
    memory = "" if device.memory_total_mb is None else f"{device.memory_total_mb} MiB"
    if memory and device.memory_free_mb is not None:
        memory += f" ({device.memory_free_mb} free)"
    if device.kind == "cpu":
        return f"cpu       {device.name}, {device.cores} cores" + (f", RAM {memory}" if memory else "")
    return f"cuda:{device.index:<4} {device.name}" + (f", {memory}" if memory else "")


class DeviceLocks:
    """Exclusive flock()s on runs/.locks/<device>.<k>.lock; released when closed or when the process dies."""

    def __init__(self, root: Path, caps: dict[str, int]) -> None:
        self.dir = root / ".locks"
        self.caps = caps

    def acquire(self, spec: DeviceSpec) -> list[int] | None:
        """One free lock for every device the job uses, or None (nothing held) if any is busy."""
        self.dir.mkdir(parents=True, exist_ok=True)
        held: list[int] = []
        for name in spec.slots:
            fd = next((fd for k in range(self.caps.get(name, 1)) if (fd := self._try(f"{name}.{k}.lock")) is not None),
                      None)
            if fd is None:
                self.release(held)
                return None
            held.append(fd)
        return held

    def _try(self, name: str) -> int | None:
        fd = os.open(self.dir / name, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def release(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
