#!/usr/bin/env bash
# The test suite, set up from nothing: `bash tests/run.sh` (README, command 2).
#   default                    Python 3.11 + megatron-core 0.16.1 + the CPU torch wheel, in .venv
#   LLAMAPRO_TEST_MATRIX=1     also Python 3.12 + megatron-core 0.19.x + torch from the registry (its Linux wheel is
#                              the CUDA build, ~4.8 GB installed; it runs on CPU), in .venv312; each leg runs the
#                              whole suite, with the other leg's interpreter as LLAMAPRO_OTHER_PYTHON for the tests
#                              that write a checkpoint with one megatron-core and read it with the other. What CI runs.
# Extra arguments go to pytest. Real artifacts are fetched on first use into ${LLAMAPRO_CACHE:-~/.cache/llamapro}.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=torch==2.13.0

python312() {  # a Python 3.12 that runs (a pyenv shim on PATH may not, when 3.12 is not selected)
    local candidate root
    for candidate in python3.12 $(root=$(pyenv root 2>/dev/null) && ls -d "$root"/versions/3.12*/bin/python3 2>/dev/null); do
        if "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" >/dev/null 2>&1; then
            command -v "$candidate"
            return
        fi
    done
    echo "LLAMAPRO_TEST_MATRIX=1 needs Python 3.12 (python3.12 on PATH, or pyenv)" >&2
    return 1
}

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q "$TORCH" && .venv/bin/pip install -q -c constraints-cpu.txt -e ".[test,study]"
if [ "${LLAMAPRO_TEST_MATRIX:-0}" = 1 ]; then
    PY312=$(python312)
    [ -x .venv312/bin/python ] || "$PY312" -m venv .venv312
    .venv312/bin/pip install -q "$TORCH" && .venv312/bin/pip install -q -c constraints-cpu.txt \
        "megatron-core>=0.19,<0.20" -e ".[test,study]"
    echo "== Python 3.11, megatron-core $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("megatron-core"))')"
    OMP_NUM_THREADS=1 LLAMAPRO_OTHER_PYTHON=$PWD/.venv312/bin/python .venv/bin/python -m pytest -q -ra --durations=15 "$@"
    echo "== Python 3.12, megatron-core $(.venv312/bin/python -c 'import importlib.metadata as m; print(m.version("megatron-core"))')"
    OMP_NUM_THREADS=1 LLAMAPRO_OTHER_PYTHON=$PWD/.venv/bin/python .venv312/bin/python -m pytest -q -ra --durations=15 "$@"
else
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -ra --durations=15 "$@"
fi
