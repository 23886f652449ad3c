#!/usr/bin/env bash
# This node's launch topology, defined once: how many GPUs scripts/launch.sh uses and how many ranks
# it starts. The launcher sources this file (it sets gpus, ranks and gpus_from); the preflight
# (python -m llmtrain.tools.doctor) executes it and checks the printed line against what torch sees:
#   bash scripts/topology.sh   ->   gpus=N ranks=N gpus_from=NUM_GPUS|CUDA_VISIBLE_DEVICES|nvidia-smi|none
#
# GPUs: NUM_GPUS wins, then CUDA_VISIBLE_DEVICES (set but empty means none), then every GPU
# nvidia-smi lists (none without nvidia-smi). Ranks: one per GPU; with no GPU, NPROC CPU ranks
# (default 1). A NUM_GPUS or NPROC that is not a whole number, or NPROC=0, is one line on stderr
# and status 2 (the project's bad-input code).

# NAME VALUE -> VALUE in decimal (a leading 0 is not octal), or an error line naming NAME.
topology_whole_number() {
  if [[ ! "$2" =~ ^[0-9]+$ ]]; then
    echo "$1='$2' must be a whole number" >&2
    return 2
  fi
  echo $((10#$2))
}

# Sets gpus, ranks and gpus_from (which setting decided the GPU count); returns 2 on a bad setting.
topology() {
  if [[ -n "${NUM_GPUS:-}" ]]; then
    gpus=$(topology_whole_number NUM_GPUS "$NUM_GPUS") || return
    gpus_from=NUM_GPUS
  elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    gpus=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
    gpus_from=CUDA_VISIBLE_DEVICES
  elif command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    gpus_from=nvidia-smi
  else
    gpus=0
    gpus_from=none
  fi
  if (( gpus > 0 )); then
    ranks="$gpus"
  else
    ranks=$(topology_whole_number NPROC "${NPROC:-1}") || return
    if (( ranks < 1 )); then
      echo "NPROC must be at least 1" >&2
      return 2
    fi
  fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  topology || exit
  echo "gpus=$gpus ranks=$ranks gpus_from=$gpus_from"
else
  topology
fi
