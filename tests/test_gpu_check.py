"""`bench/gpu_check.sh --device cpu --smoke`: the GPU check's every code path, on CPU at toy sizes.

The figures of a smoke run mean nothing; what is checked is that the script runs end to end with
only the installed package (no data set download) and prints the table it will print on a GPU:
the matmul rate, 3 architectures x 4 engine configurations against the reference pipeline, one
epoch of each distillation student twice, and the compiled rows.
"""

from __future__ import annotations

import os
import re
import subprocess

from tests.conftest import ROOT

ARCHS = ("resnet20", "wrn_16_2", "resnet18")
CONFIGS = ("fp32", "fp32+cl", "bf16", "bf16+cl")
NUMBER = r"[\d,.]+"


def test_gpu_check_smoke_prints_the_whole_table() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    if not (ROOT / ".venv" / "bin" / "python").exists():
        env.pop("PYTHON")
    done = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = done.stdout
    assert "SMOKE RUN" in out
    rows = [line for line in out.splitlines() if line.startswith("gpu check")]
    assert re.search(rf"bf16 matmul rate \(measured, cpu\)\s+{NUMBER}\s+-\s+TFLOP/s", out)
    for arch in ARCHS:
        for config in CONFIGS:  # ours, the reference, the ratio, and the TFLOP/s note
            pattern = (rf"{arch} b8: engine {re.escape(config)} vs reference\s+{NUMBER}\s+{NUMBER}\s+img/s\s+"
                       rf"{NUMBER}\s+>= 5\s+(yes|NO)\s+{NUMBER} TFLOP/s = {NUMBER}% of matmul")
            assert re.search(pattern, out), (arch, config, out)
        assert re.search(rf"{arch} b8: engine bf16\+cl\+compile vs bf16\+cl\s+{NUMBER}\s+{NUMBER}\s+img/s\s+"
                         rf"{NUMBER}\s+{NUMBER} TFLOP/s.*\(smoke: dynamo, eager backend\)", out), (arch, out)
    for method in ("hsakd", "crd"):
        for label in ("engine defaults", "bf16+cl, deterministic = false"):
            (row,) = [r for r in rows if f"{method} student 1 epoch" in r and label in r]
            assert re.search(rf"img/s.*epoch {NUMBER} s \(4 steps\); {NUMBER} TFLOP/s", row), row
    assert len(rows) == 1 + len(ARCHS) * (len(CONFIGS) + 1) + 4
