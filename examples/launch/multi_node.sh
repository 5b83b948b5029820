#!/usr/bin/env bash
# LLaMA Pro on several machines without a scheduler: every node runs this script with its own NODE_RANK; torchrun
# joins them. Checkpoints and datasets (WORK) must be on storage every node sees at the same path, and every node
# must run the same code (checkout or image): a node started differently is refused, on every node, at start.
#
#   # once, on one node (tokenizing is not distributed; it needs no GPU):
#   NNODES=1 NODE_RANK=0 MASTER_ADDR=localhost MASTER_PORT=29500 bash examples/launch/multi_node.sh preprocess
#   # then on every node i = 0 .. NNODES-1, the same command but NODE_RANK:
#   NNODES=2 NODE_RANK=i MASTER_ADDR=node0 MASTER_PORT=29500 bash examples/launch/multi_node.sh
#   # after losing a node (or to train on), the same on every node: training resumes from its latest checkpoint
#   NNODES=2 NODE_RANK=i MASTER_ADDR=node0 MASTER_PORT=29500 bash examples/launch/multi_node.sh train export
#
# Required: NNODES, NODE_RANK (0-based), MASTER_ADDR (node 0's address, reachable from all), MASTER_PORT (a free
# port on it). GPUS_PER_NODE defaults to 8. The default steps are convert expand plan train export, each one torchrun
# across all nodes (conversion, expansion and export use every rank as a worker; the plan step prints on node 0).
#
# Rendezvous (RDZV): c10d (default) - torchrun's c10d rendezvous, its store on node 0 at MASTER_ADDR:MASTER_PORT;
# nodes may start in any order (each waits up to JOIN_TIMEOUT s, default 600, for the others) and torchrun assigns
# the ranks. Needed for MAX_RESTARTS > 0: a node whose workers fail restarts them (up to MAX_RESTARTS times, default
# 0), every node restarts with it, and training resumes from the last complete checkpoint. The job ends if node 0's
# agent (the store's host) dies. static - the fixed --master-addr/--master-port form (ranks from NODE_RANK).
# Paths, model, recipe and layout: see the settings at the top of examples/launch/common.sh. DRY_RUN=1 prints the
# commands only.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}" "${MASTER_PORT:?set MASTER_PORT}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
case ${RDZV:-c10d} in
    c10d) IS_HOST=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)  # the store on node 0 alone, whichever starts first
          # each round (a restart) publishes its own store address: torch's default shares round 0's, and a node
          # that rejoins after a restart then waits for an address the rank-0 agent never publishes again
          export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
          JOIN=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-llamapro}"
                --rdzv-conf "is_host=$IS_HOST,join_timeout=${JOIN_TIMEOUT:-600}" --max-restarts "${MAX_RESTARTS:-0}") ;;
    static) JOIN=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT") ;;
    *) echo "RDZV=${RDZV}: use c10d or static" >&2; exit 2 ;;
esac
LAUNCH=(torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" "${JOIN[@]}" -m llamapro_megatron.cli)
ONE=(llamapro)
source examples/launch/common.sh

if [ $# -eq 0 ]; then set -- convert expand plan train export; fi
if [ "$NODE_RANK" != 0 ]; then  # single-process steps run on node 0 only
    steps=()
    for s in "$@"; do case $s in preprocess|plan) ;; *) steps+=("$s") ;; esac; done
    set -- "${steps[@]}"
fi
run_steps "$@"
