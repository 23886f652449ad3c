#!/usr/bin/env bash
# Pretrain under DeepSpeed ZeRO-2 on this node's GPUs, CPU ranks, or several nodes.
#   bash pretrain.sh                                   # embedded tiny default (configs/pretrain_tiny.yaml)
#   bash pretrain.sh configs/X.yaml --learning_rate 3.0e-4
#   NPROC=2 bash pretrain.sh                           # 2 CPU ranks (gloo)
# Rerun the same command after an interruption: it resumes from the newest complete checkpoint.
# Topology variables (NUM_GPUS, NPROC, HOSTFILE, NNODES, ...) are described in scripts/launch.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$ROOT/scripts/launch.sh" pretrain.py "$@"
