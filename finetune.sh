#!/usr/bin/env bash
# Supervised fine-tuning under DeepSpeed ZeRO-2 on this node's GPUs, CPU ranks, or several nodes.
#   bash finetune.sh                                   # full SFT of the tiny pretrained model (configs/sft_tiny_full.yaml)
#   bash finetune.sh configs/X.yaml --learning_rate 1.0e-4
#   NPROC=2 bash finetune.sh                           # 2 CPU ranks (gloo)
# Rerun the same command after an interruption: it resumes from the newest complete checkpoint.
# Topology variables (NUM_GPUS, NPROC, HOSTFILE, NNODES, ...) are described in scripts/launch.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$ROOT/scripts/launch.sh" finetune.py "$@"
