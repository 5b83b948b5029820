#!/usr/bin/env bash
# benchmarks/paper_scale.py on the workplace's lent GPU machine, in one device call (BENCHMARKS.md, "Paper scale on
# one H200"). That machine has Python 3.12, CUDA torch and transformers, but neither megatron-core nor Transformer
# Engine, and no network; from the repository root here, once (~1 min; the folders are git-ignored):
#
#   bash benchmarks/paper_scale_carry.sh     # .whl (megatron-core 0.19.2, TE's Python parts), .whl16, .te
#
# then the device tool's run with carry [".whl", ".whl16", ".te"] and the command
#   bash benchmarks/paper_scale_device.sh "$OUT" 590
# (the second argument: the call's time limit in seconds; the benchmark gets what is left of it; further arguments
# go to paper_scale.py, e.g. --tiny to try the whole sequence on a CPU machine with a Python 3.12 "python3").
#
# Transformer Engine's torch extension is built there from the sdist (a C++ extension, ~1.5 min on 16 cores) in the
# background while the checkpoints are prepared; paper_scale.py waits for it before its first llamapro run.
set -u
OUT=${1:?usage: paper_scale_device.sh OUT [LIMIT_S]}
LIMIT=${2:-590}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
S="$OUT/setup.txt"  # one file for the setup's output (a device call brings back at most 8)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$S" 2>&1
df -h /tmp >> "$S" 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $(ls .whl/*.whl | grep -v '/transformer_engine-') || exit 1
export PYTHONPATH=/tmp/site:$PWD
if ! python3 -c "import megatron.core.models.gpt" >> "$S" 2>&1; then
    echo "megatron-core 0.19.2 does not import here; falling back to 0.16.1" | tee -a "$S"
    rm -rf /tmp/site/megatron /tmp/site/megatron_core-*
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl16/*.whl || exit 1
fi
# Transformer Engine goes to its own folder: paper_scale.py puts it on the runs' path only once it works
mkdir -p /tmp/te_site
tar xJf .te/te_core_sm90.tar.xz -C /tmp/te_site || exit 1
python3 -m zipfile -e .whl/transformer_engine-2.20.2-py3-none-any.whl /tmp/te_site || exit 1
rm -f /tmp/te_build.rc
(
    cd /tmp && rm -rf transformer_engine_torch-2.20.2 tewheel \
        && tar xzf "$OLDPWD/.te/transformer_engine_torch-2.20.2.tar.gz" && cd transformer_engine_torch-2.20.2 \
        && NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_WITH_NCCL_EP=0 NVTE_NO_LOCAL_VERSION=1 NVTE_CUDA_ARCHS=90 MAX_JOBS=12 \
           PYTHONPATH=/tmp/site:/tmp/te_site python3 -m pip wheel --no-build-isolation --no-deps --no-index \
           -w /tmp/tewheel . \
        && python3 -m zipfile -e /tmp/tewheel/transformer_engine_torch-*.whl /tmp/te_site
    echo $? > /tmp/te_build.rc.tmp && mv /tmp/te_build.rc.tmp /tmp/te_build.rc  # written last: the build ended
) > "$OUT/te_build.txt" 2>&1 &
LEFT=$(( LIMIT - ($(date +%s) - START) - 20 ))
echo "setup took $(( $(date +%s) - START )) s; benchmark budget ${LEFT} s" | tee -a "$S"
python3 benchmarks/paper_scale.py --out "$OUT" --workdir /tmp/ps --budget-s "$LEFT" \
    --wait-for /tmp/te_build.rc --te-site /tmp/te_site "${@:3}"
