#!/usr/bin/env bash
# Shared launcher behind pretrain.sh and finetune.sh. Usage (from those scripts):
#   scripts/launch.sh ENTRY.py [config.yaml] [--key value ...]
# (the stage's default config, used without a config.yaml, is defined in llmtrain/stages.py)
#
# Picks the topology from the environment and starts ENTRY under DeepSpeed ZeRO-2:
#   GPU node     every visible GPU (NUM_GPUS or CUDA_VISIBLE_DEVICES narrow it)
#   CPU box      NPROC ranks (default 1) on the gloo backend, same DeepSpeed path (--use_cpu)
#   multi-node   HOSTFILE=path (DeepSpeed's ssh launcher), or NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT
#                on each node (torchrun rendezvous)
# Other knobs: PYTHON (default: the project's .venv), DS_CONFIG (default ds_config_zero2.json),
#   MAX_RESTARTS (default 2): a crashed run is restarted, resuming, while it keeps making progress.
#   SKIP_DOCTOR=1 skips the preflight (python -m llmtrain.tools.doctor STAGE --fast) run before training.
# The command line and the full log are written to <output_dir>/logs/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENTRY="$ROOT/$1"
shift 1

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
DS_CONFIG="${DS_CONFIG:-$ROOT/ds_config_zero2.json}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_PORT="${MASTER_PORT:-29500}"
MAX_RESTARTS="${MAX_RESTARTS:-2}"

# GPUs and ranks on this node (NUM_GPUS, CUDA_VISIBLE_DEVICES, nvidia-smi, NPROC): sets gpus and ranks.
# The preflight checks the same rule by running this file, so it lives there only.
source "$ROOT/scripts/topology.sh"

overrides=(--deepspeed "$DS_CONFIG")
if (( gpus == 0 )); then
  overrides+=(--use_cpu true)
  # Share the cores between the CPU ranks instead of letting each oversubscribe them.
  cores=$(nproc)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / ranks > 0 ? cores / ranks : 1 ))}"
fi

# A run config given as the first argument stays first; the user's overrides come after ours and win.
args=()
if (( $# > 0 )) && [[ "$1" != -* ]]; then args+=("$1"); shift; fi
args+=("${overrides[@]}" "$@")

if [[ -n "${HOSTFILE:-}" ]]; then
  launcher=("$PYTHON" -u -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
  [[ -n "${MASTER_ADDR:-}" ]] && launcher+=(--master_addr "$MASTER_ADDR")
elif (( NNODES > 1 )); then
  launcher=("$PYTHON" -u -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK"
            --master_addr "${MASTER_ADDR:?NNODES>1 needs MASTER_ADDR}" --master_port "$MASTER_PORT"
            --nproc_per_node "$ranks")
elif (( gpus > 0 )) && [[ -n "${CUDA_VISIBLE_DEVICES:-}" && -z "${NUM_GPUS:-}" ]]; then
  # --num_gpus would make DeepSpeed ignore CUDA_VISIBLE_DEVICES; --include honours it.
  launcher=("$PYTHON" -u -m deepspeed.launcher.runner --include "localhost:$CUDA_VISIBLE_DEVICES"
            --master_port "$MASTER_PORT")
else
  launcher=("$PYTHON" -u -m deepspeed.launcher.runner --num_gpus "$ranks" --master_port "$MASTER_PORT")
fi
cmd=("${launcher[@]}" "$ENTRY" "${args[@]}")

output_dir=$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$ROOT/scripts/output_dir.py" "$(basename "$ENTRY")" "${args[@]}")
log_dir="$output_dir/logs"
mkdir -p "$log_dir"
stamp="$(date +%Y%m%d-%H%M%S)-node$NODE_RANK"
printf '%q ' "${cmd[@]}" >"$log_dir/launch-$stamp.sh"
echo >>"$log_dir/launch-$stamp.sh"
echo "launch: ${cmd[*]}" | tee "$log_dir/launch-$stamp.log"
echo "log: $log_dir/launch-$stamp.log"

# Preflight: config, GPUs vs ranks, tokenizer, data files, output dir, disk (python -m llmtrain.tools.doctor --fast).
if [[ "${SKIP_DOCTOR:-0}" != 1 ]]; then
  set +e
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m llmtrain.tools.doctor "$(basename "$ENTRY" .py)" --fast \
    "${args[@]}" 2>&1 | tee -a "$log_dir/launch-$stamp.log"
  status=${PIPESTATUS[0]}
  set -e
  if (( status != 0 )); then
    echo "launch: preflight failed (exit $status); fix the ERROR lines above (SKIP_DOCTOR=1 skips the check)" \
      | tee -a "$log_dir/launch-$stamp.log"
    exit "$status"
  fi
fi

# Newest step with a completion marker (-1 when none): how a restart's progress is judged.
newest_complete_step() {
  local best=-1 marker step
  for marker in "$output_dir"/checkpoint-*/llmtrain_complete.json; do
    [[ -f "$marker" ]] || continue
    step="${marker%/llmtrain_complete.json}"
    step="${step##*/checkpoint-}"
    (( step > best )) && best=$step
  done
  echo "$best"
}

# torchrun exits 1 whatever its workers' codes were; its failure report lists them ("exitcode  : 75").
# When every failed worker agrees on one of our codes, that code is the run's.
worker_exit_code() {
  local codes
  codes=$(tail -n "+$1" "$log_dir/launch-$stamp.log" | grep -oE 'exitcode *: *[0-9]+' | grep -oE '[0-9]+$' | sort -u)
  [[ -n "$codes" && $(wc -l <<<"$codes") -eq 1 ]] && echo "$codes"
}

# A crashed run is restarted (it resumes by itself) up to MAX_RESTARTS times, but only while
# each attempt leaves a newer complete checkpoint behind. Bad input (2), a non-finite loss under
# nonfinite_policy: stop (3) and preemption (75) are never retried.
export PYTHONUNBUFFERED=1
restarts=0
while true; do
  before=$(newest_complete_step)
  first_line=$(( $(wc -l <"$log_dir/launch-$stamp.log") + 1 ))
  set +e
  "${cmd[@]}" 2>&1 | tee -a "$log_dir/launch-$stamp.log"
  status=${PIPESTATUS[0]}
  set -e
  if (( status == 1 )) && [[ "${launcher[*]}" == *torch.distributed.run* ]]; then
    worker_status=$(worker_exit_code "$first_line" || true)
    [[ "$worker_status" =~ ^(2|3|75)$ ]] && status=$worker_status
  fi
  case "$status" in
    0) exit 0 ;;
    2) echo "launch: bad input or configuration (exit 2); not retrying" | tee -a "$log_dir/launch-$stamp.log"; exit 2 ;;
    3) echo "launch: non-finite loss or gradients (exit 3); not retrying" | tee -a "$log_dir/launch-$stamp.log"; exit 3 ;;
    75) echo "launch: stopped on a signal after saving a complete checkpoint (exit 75); rerun to resume" \
          | tee -a "$log_dir/launch-$stamp.log"; exit 75 ;;
  esac
  after=$(newest_complete_step)
  if (( after <= before )); then
    echo "launch: exit $status with no new complete checkpoint since this attempt began (newest: step $after); not retrying" \
      | tee -a "$log_dir/launch-$stamp.log"
    exit "$status"
  fi
  if (( restarts >= MAX_RESTARTS )); then
    echo "launch: exit $status; giving up after $restarts restart(s) (MAX_RESTARTS=$MAX_RESTARTS)" \
      | tee -a "$log_dir/launch-$stamp.log"
    exit "$status"
  fi
  restarts=$((restarts + 1))
  echo "launch: exit $status; restart $restarts/$MAX_RESTARTS resumes from step $after" | tee -a "$log_dir/launch-$stamp.log"
done
