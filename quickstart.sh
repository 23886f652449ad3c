#!/usr/bin/env bash
# One command on a fresh machine: set up .venv, then the whole chain on the embedded tiny default
# (CPU is fine, ~6 minutes): pretrain -> SFT (LoRA) -> merge the adapter -> one chat answer.
# Each step is resumable and skipped when already finished, so rerunning is cheap.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
PY=.venv/bin/python

echo "=== 1/4 pretrain the tiny Qwen2 on the demo corpus -> outputs/pretrain-tiny"
bash pretrain.sh
echo "=== 2/4 LoRA SFT on the demo conversations -> outputs/sft-tiny-lora"
bash finetune.sh
echo "=== 3/4 merge the adapter into a standalone model -> outputs/sft-tiny-merged"
if [[ ! -f outputs/sft-tiny-merged/model.safetensors ]]; then
  "$PY" -m llmtrain.tools.merge --adapter outputs/sft-tiny-lora --output outputs/sft-tiny-merged
fi
echo "=== 4/4 one chat answer from the merged model"
"$PY" -m llmtrain.tools.chat --model outputs/sft-tiny-merged --prompt "Which module defines \`dumps\`?" --max_new_tokens 48
