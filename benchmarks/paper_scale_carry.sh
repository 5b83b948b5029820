#!/usr/bin/env bash
# Prepare, on this (network) machine, what benchmarks/paper_scale_device.sh needs on the GPU machine, which has no
# network: megatron-core and Transformer Engine's pure-Python parts as wheels (.whl; megatron-core 0.16.1 as a
# fallback in .whl16), Transformer Engine's core slimmed to its sm_90 code and its torch extension's sdist (.te).
# All three folders are git-ignored here (.git/info/exclude) and travel with the device tool's carry:
#   bash benchmarks/paper_scale_carry.sh
#   run: command "bash benchmarks/paper_scale_device.sh \"$OUT\" 585", carry [".whl", ".whl16", ".te"], timeout_s 600
set -euo pipefail
cd "$(dirname "$0")/.."
TE=2.20.2
for d in .whl .whl16 .te; do
    grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
done
rm -rf .whl .whl16 .te && mkdir -p .whl .whl16 .te
P=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
   --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -q)
python3 -m pip download "${P[@]}" -d .whl megatron-core==0.19.2 transformer_engine==$TE pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
    nvdlfw-inspect==0.2.2
python3 -m pip download "${P[@]}" -d .whl16 megatron-core==0.16.1
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download "${P[@]}" -d "$TMP" transformer_engine_cu13==$TE
python3 benchmarks/te_sm90.py "$TMP"/transformer_engine_cu13-$TE-*.whl .te/te_core_sm90.tar.xz
# The sdist: pip download would build its metadata (a CUDA build); take the file PyPI's index names instead.
URL=$(curl -fsSL https://pypi.org/simple/transformer-engine-torch/ \
      | grep -o "https://[^\"#]*transformer_engine_torch-$TE\.tar\.gz" | head -1)
curl -fsSL -o .te/transformer_engine_torch-$TE.tar.gz "$URL"
du -sh .whl .whl16 .te
