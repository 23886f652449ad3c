#!/usr/bin/env bash
# Supervised fine-tuning under DeepSpeed ZeRO-2 on this node's GPUs, CPU ranks, or several nodes.
#   bash finetune.sh                                   # full SFT of the tiny pretrained model (configs/sft_tiny_full.yaml)
#   bash finetune.sh configs/X.yaml --learning_rate 1.0e-4
#   NPROC=2 bash finetune.sh                           # 2 CPU ranks (gloo)
# Rerun the same command after an interruption: it resumes from the newest complete checkpoint.
# Topology variables (NUM_GPUS, NPROC, HOSTFILE, NNODES, ...), signals and exit codes: docs/launching.md.
# The launcher is llmtrain/launch, run by the checkout's .venv Python (else $PYTHON, else python3).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"; PY="$ROOT/.venv/bin/python"; [[ -x "$PY" ]] || PY="${PYTHON:-python3}"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m llmtrain.launch finetune.py "$@"
