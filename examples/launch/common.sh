# shellcheck shell=bash
# The LLaMA Pro workflow, shared by single_node.sh, multi_node.sh and slurm.sbatch (which source this file after
# setting LAUNCH, the command prefix that starts the distributed steps, and ONE, the prefix for a single process).
#
# Steps, in order (run all by default, or name some on the command line of the script):
#   convert     Hugging Face -> Megatron torch_dist checkpoint, validated and padded for TP x PP
#   expand      LLaMA Pro block expansion (identity copies; NUM_GROUPS groups, e.g. 32 -> 40 blocks)
#   preprocess  the two corpora -> megatron-core indexed datasets (Llama tokenizer of HF_DIR)
#   plan        `llamapro train --dry-run`: parameters and memory per GPU of the layout (no GPU used)
#   train       post-pretrain the new blocks with RECIPE (flags here override the recipe's paths and layout)
#   export      the last training iteration -> Hugging Face directory
#
# Settings (environment variables; paths relative to the repository root; for several nodes WORK must be on storage
# every node sees):
#   HF_DIR       the base model, a Hugging Face directory          (default models/Llama-2-7b-hf)
#   RECIPE       training recipe                                   (default examples/llama2_7b_pro.yaml)
#   NUM_GROUPS   expansion groups: one new block per group         (default 8)
#   TP, PP       tensor / pipeline parallel sizes                  (default 4 and 2, the recipe's)
#   EP           expert-parallel size, MoE bases only               (default 1)
#   ETP          each expert's tensor-parallel size, MoE bases only (default: TP)
#   MATH_INPUT   Proof-Pile-2 .jsonl/.jsonl.gz/.parquet files, space separated (default raw/proof-pile-2/*.jsonl.gz)
#   CODE_INPUT   the Stack's Python files, likewise                (default raw/stack-python/*.jsonl.gz)
#   WORK         where checkpoints, datasets, logs and the export go (default work)
#   BASE PRO TRAINED DATA EXPORT  each step's output, under WORK by default: ckpt/base ckpt/pro ckpt/pro-trained data
#                pro-hf
#   TRAIN_ARGS   more `llamapro train` flags, space separated, after the recipe's (e.g. "--train-iters 100")
#   PREPROCESS_WORKERS  tokenizer processes                        (default 16)
#   DRY_RUN=1    print every command (prefixed with "+ ") instead of running it
set -euo pipefail

HF_DIR=${HF_DIR:-models/Llama-2-7b-hf}
RECIPE=${RECIPE:-examples/llama2_7b_pro.yaml}
NUM_GROUPS=${NUM_GROUPS:-8}
TP=${TP:-4}
PP=${PP:-2}
EP=${EP:-1}
ETP=${ETP:-}
CONVERT_ETP=(); TRAIN_ETP=()  # only when set: the default is megatron-core's (TP)
if [ -n "$ETP" ]; then CONVERT_ETP=(--etp "$ETP"); TRAIN_ETP=(--expert-tensor-parallel-size "$ETP"); fi
MATH_INPUT=${MATH_INPUT:-raw/proof-pile-2/*.jsonl.gz}
CODE_INPUT=${CODE_INPUT:-raw/stack-python/*.jsonl.gz}
WORK=${WORK:-work}
PREPROCESS_WORKERS=${PREPROCESS_WORKERS:-16}

BASE=${BASE:-$WORK/ckpt/base}
PRO=${PRO:-$WORK/ckpt/pro}
TRAINED=${TRAINED:-$WORK/ckpt/pro-trained}  # rerunning `train` resumes from its latest checkpoint
DATA=${DATA:-$WORK/data}
EXPORT=${EXPORT:-$WORK/pro-hf}
read -r -a EXTRA_TRAIN <<< "${TRAIN_ARGS:-}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

run() {
    printf '+'; printf ' %q' "$@"; printf '\n'  # as a shell would read it back
    if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

step_convert() { run "${LAUNCH[@]}" convert hf-to-mcore --hf-dir "$HF_DIR" --out "$BASE" --tp "$TP" --pp "$PP" --ep "$EP" \
    "${CONVERT_ETP[@]}"; }

step_expand() {
    run "${LAUNCH[@]}" expand --load "$BASE" --out "$PRO" --groups "$NUM_GROUPS" --tp "$TP" --pp "$PP" --ep "$EP" \
        "${CONVERT_ETP[@]}"
}

step_preprocess() {
    # MATH_INPUT / CODE_INPUT are lists of files (globs expand here)
    # shellcheck disable=SC2086
    run "${ONE[@]}" preprocess --input $MATH_INPUT --tokenizer "$HF_DIR" --out "$DATA/proofpile2" \
        --workers "$PREPROCESS_WORKERS" --append-eod
    # shellcheck disable=SC2086
    run "${ONE[@]}" preprocess --input $CODE_INPUT --tokenizer "$HF_DIR" --out "$DATA/stack_python" \
        --workers "$PREPROCESS_WORKERS" --append-eod
}

TRAIN_FLAGS=(--config "$RECIPE" --load "$PRO" --save "$TRAINED"
             --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP"
             "${TRAIN_ETP[@]}"
             --data-path 1.0 "$DATA/proofpile2_text_document" 1.5 "$DATA/stack_python_text_document"
             --data-cache-path "$DATA/cache" --tensorboard-dir "$WORK/runs" "${EXTRA_TRAIN[@]}")

step_plan() { run "${ONE[@]}" train --dry-run "${TRAIN_FLAGS[@]}" --world-size "$WORLD_SIZE"; }

step_train() { run "${LAUNCH[@]}" train "${TRAIN_FLAGS[@]}"; }

step_export() { run "${LAUNCH[@]}" convert mcore-to-hf --load "$TRAINED" --out "$EXPORT"; }

output_of() {  # where a step's result is, for the run's log
    case $1 in
        convert) echo "base checkpoint:      $BASE" ;;
        expand) echo "expanded checkpoint:  $PRO" ;;
        preprocess) echo "datasets:             $DATA" ;;
        train) local latest
               latest=$(cat "$TRAINED/latest_checkpointed_iteration.txt" 2>/dev/null || true)
               if [[ $latest =~ ^[0-9]+$ ]]; then
                   printf 'trained checkpoint:   %s/iter_%07d (the latest; training on resumes from it)\n' \
                       "$TRAINED" "$latest"
               else
                   echo "trained checkpoint:   $TRAINED"
               fi ;;
        export) echo "Hugging Face model:   $EXPORT" ;;
    esac
}

run_steps() {
    local step
    for step in "$@"; do
        case $step in
            convert|expand|preprocess|plan|train|export) echo "== $step" ;;
            *) echo "unknown step '$step' (convert expand preprocess plan train export)" >&2; return 2 ;;
        esac
        "step_$step"
    done
    echo "== done"
    for step in "$@"; do output_of "$step"; done
}
