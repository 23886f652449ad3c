#!/usr/bin/env bash
# The launch topology, defined once: how many GPUs scripts/launch.sh uses and how many ranks it
# starts. The launcher sources this file (it sets gpus, ranks, gpus_from, devices and hosts); the
# preflight (python -m llmtrain.tools.doctor) executes it and checks the printed line against what
# torch sees:
#   bash scripts/topology.sh   ->   gpus=N ranks=N gpus_from=HOSTFILE|NUM_GPUS|CUDA_VISIBLE_DEVICES|nvidia-smi|none hosts=N
#
# HOSTFILE (DeepSpeed's format: "host slots=N" lines, # comments) wins: the ranks are the hostfile's
# slots, summed over its hosts; this node's own GPUs (often none on a head node) do not count. They
# are GPU ranks unless NPROC is set, which asks for CPU ranks (gpus=0; the slots still say how many
# per host). NUM_GPUS and CUDA_VISIBLE_DEVICES are ignored there.
# On one node: NUM_GPUS wins, then CUDA_VISIBLE_DEVICES (set but empty means none), then every GPU
# nvidia-smi lists (none without nvidia-smi). NUM_GPUS with CUDA_VISIBLE_DEVICES takes the first
# NUM_GPUS devices listed (devices=4,5 for NUM_GPUS=2 CUDA_VISIBLE_DEVICES=4,5,6,7); devices is the
# list the launcher passes to DeepSpeed's --include, empty when CUDA_VISIBLE_DEVICES is not set.
# Ranks: one per GPU; with no GPU, NPROC CPU ranks (default 1).
# A NUM_GPUS or NPROC that is not a whole number, NPROC=0, NUM_GPUS above the devices
# CUDA_VISIBLE_DEVICES lists, or a missing or malformed HOSTFILE is one line on stderr and status 2
# (the project's bad-input code).

# NAME VALUE -> VALUE in decimal (a leading 0 is not octal), or an error line naming NAME.
topology_whole_number() {
  if [[ ! "$2" =~ ^[0-9]+$ ]]; then
    echo "$1='$2' must be a whole number" >&2
    return 2
  fi
  echo $((10#$2))
}

# HOSTFILE -> "SLOTS HOSTS" (slots summed over its hosts), read as DeepSpeed's runner reads it.
# DeepSpeed itself would fall back to this node alone for a missing file; here that is an error.
topology_hostfile() {
  local line slots=0 hosts=0
  local -A seen=()
  if [[ ! -f "$HOSTFILE" || ! -r "$HOSTFILE" ]]; then
    echo "HOSTFILE='$HOSTFILE' is not a readable file" >&2
    return 2
  fi
  while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line#"${line%%[![:space:]]*}"}"
    if [[ -z "$line" || "$line" == "#"* ]]; then
      continue
    elif [[ "$line" =~ ^([^[:space:]]+)[[:space:]]+slots=([0-9]+) ]]; then
      if [[ -n "${seen[${BASH_REMATCH[1]}]:-}" ]]; then
        echo "HOSTFILE=$HOSTFILE lists host ${BASH_REMATCH[1]} twice" >&2
        return 2
      fi
      seen[${BASH_REMATCH[1]}]=1
      slots=$((slots + 10#${BASH_REMATCH[2]}))
      hosts=$((hosts + 1))
    else
      echo "HOSTFILE=$HOSTFILE: bad line '$line' (DeepSpeed's format is 'host slots=N')" >&2
      return 2
    fi
  done <"$HOSTFILE"
  if (( slots < 1 )); then
    echo "HOSTFILE=$HOSTFILE lists no slots (DeepSpeed's format is 'host slots=N')" >&2
    return 2
  fi
  echo "$slots $hosts"
}

# Sets gpus, ranks, gpus_from (which setting decided the GPU count), devices (the CUDA_VISIBLE_DEVICES
# entries to --include, or empty) and hosts; returns 2 on a bad setting.
topology() {
  local listed found
  devices=""
  hosts=1
  if [[ -n "${HOSTFILE:-}" ]]; then
    found=$(topology_hostfile) || return
    read -r ranks hosts <<<"$found"
    gpus_from=HOSTFILE
    gpus="$ranks"
    if [[ -n "${NPROC:-}" ]]; then
      topology_whole_number NPROC "$NPROC" >/dev/null || return
      gpus=0
    fi
    return 0
  fi
  if [[ -n "${NUM_GPUS:-}" ]]; then
    gpus=$(topology_whole_number NUM_GPUS "$NUM_GPUS") || return
    gpus_from=NUM_GPUS
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
      listed=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
      if (( gpus > listed )); then
        echo "NUM_GPUS=$gpus but CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' lists $listed GPU(s)" >&2
        return 2
      fi
      if (( gpus > 0 )); then devices=$(cut -d, -f "1-$gpus" <<<"$CUDA_VISIBLE_DEVICES"); fi
    fi
  elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    gpus=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
    gpus_from=CUDA_VISIBLE_DEVICES
    devices="$CUDA_VISIBLE_DEVICES"
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
    devices=""
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
  echo "gpus=$gpus ranks=$ranks gpus_from=$gpus_from hosts=$hosts"
else
  topology
fi
