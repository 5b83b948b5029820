#!/usr/bin/env bash
# LLaMA Pro on several machines without a scheduler: every node runs this script with its own NODE_RANK; torchrun
# joins them. Checkpoints and datasets (WORK) must be on storage every node sees at the same path.
#
#   # once, on one node (tokenizing is not distributed; it needs no GPU):
#   NNODES=1 NODE_RANK=0 MASTER_ADDR=localhost MASTER_PORT=29500 bash examples/launch/multi_node.sh preprocess
#   # then on every node i = 0 .. NNODES-1, the same command but NODE_RANK:
#   NNODES=2 NODE_RANK=i MASTER_ADDR=node0 MASTER_PORT=29500 bash examples/launch/multi_node.sh
#
# Required: NNODES, NODE_RANK (0-based), MASTER_ADDR (node 0's address, reachable from all), MASTER_PORT (a free
# port on it). GPUS_PER_NODE defaults to 8. The default steps are convert expand plan train export, each one torchrun
# across all nodes (conversion, expansion and export use every rank as a worker; the plan step prints on node 0).
# Paths, model, recipe and layout: see the settings at the top of examples/launch/common.sh. DRY_RUN=1 prints the
# commands only.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}" "${MASTER_PORT:?set MASTER_PORT}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
LAUNCH=(torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m llamapro_megatron.cli)
ONE=(llamapro)
source examples/launch/common.sh

if [ $# -eq 0 ]; then set -- convert expand plan train export; fi
if [ "$NODE_RANK" != 0 ]; then  # single-process steps run on node 0 only
    steps=()
    for s in "$@"; do case $s in preprocess|plan) ;; *) steps+=("$s") ;; esac; done
    set -- "${steps[@]}"
fi
run_steps "$@"
