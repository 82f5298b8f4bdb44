#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one table in under 8 minutes on one H100/H200.
#   bench/gpu_check.sh                        # on CUDA
#   bench/gpu_check.sh --device cpu --smoke   # the code path on CPU (tests/test_gpu_check.py)
# Needs only `pip install -e .` (no data set download). Python: $PYTHON, else the repo's .venv, else python3.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then python="$here/../.venv/bin/python"; else python="python3"; fi
fi
exec "$python" "$here/gpu_check.py" "$@"
