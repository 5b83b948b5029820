#!/usr/bin/env bash
# LLaMA Pro on one machine with several GPUs: convert, expand, preprocess, plan, train, export.
#
#   bash examples/launch/single_node.sh                  # every step, in order
#   bash examples/launch/single_node.sh plan train       # some steps
#   DRY_RUN=1 bash examples/launch/single_node.sh        # print the commands only
#
# GPUS (default 8) ranks are started with `torchrun --standalone --nproc-per-node GPUS` for the distributed steps
# (conversion and expansion use them as workers; training needs GPUS to be a multiple of TP x PP). Paths, model,
# recipe and layout: see the settings at the top of examples/launch/common.sh. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
GPUS=${GPUS:-8}
WORLD_SIZE=$GPUS
LAUNCH=(torchrun --standalone --nproc-per-node "$GPUS" -m llamapro_megatron.cli)
ONE=(llamapro)
source examples/launch/common.sh

if [ $# -eq 0 ]; then set -- convert expand preprocess plan train export; fi
run_steps "$@"
