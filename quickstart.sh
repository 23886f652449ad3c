#!/usr/bin/env bash
# One command on a fresh machine: set up .venv, then the whole chain on the embedded tiny default
# (CPU is fine, ~6 minutes): pretrain -> SFT -> what SFT changed (base vs fine-tuned, same questions).
# Each step is resumable and skipped when already finished, so rerunning is cheap.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
PY=.venv/bin/python

echo "=== 1/3 pretrain the tiny Qwen2 on the demo corpus -> outputs/pretrain-tiny"
bash pretrain.sh
echo "=== 2/3 full SFT on the demo conversations -> outputs/sft-tiny-full"
bash finetune.sh
echo "=== 3/3 what SFT changed: the same questions to the pretrained and the fine-tuned model"
# Greedy answers side by side; each ends with the <|im_end|> the model generated, or a cut-off note.
"$PY" -m llmtrain.tools.compare --models outputs/pretrain-tiny outputs/sft-tiny-full \
  --prompts "What does \`shutil.copy\` do?" "What is \`collections.OrderedDict\`?" --max_new_tokens 48
