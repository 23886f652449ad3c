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
#   PREEMPT_GRACE_S (default 600): after SIGTERM/SIGINT/SIGHUP, how long the ranks get to save and stop.
#   DRY_RUN=1 prints the topology and the command (and, under HOSTFILE, the names of the variables sent
#   to the remote ranks) and exits, starting nothing.
# Interruption: a SIGTERM, SIGINT or SIGHUP to this script or to its whole process group (scancel, timeout,
# a k8s eviction, Ctrl-C) makes every rank finish its step, save a complete checkpoint and stop; the
# launcher then exits 75 and the same command resumes. A second Ctrl-C kills the ranks at once. A SIGTERM
# to the training processes alone (the ranks, or every Python process of the job) also ends in 75, not retried.
# The command line and the full log are written to <output_dir>/logs/, secret flag values (--hub_token ...) shown
# as *** there and on the console.
# Before anything is written or started, the run config and output_dir are checked (scripts/output_dir.py): a
# YAML file that is not valid, not UTF-8 or not a mapping, or an output_dir that cannot be made, ends with one
# "launch: ..." line and exit 2.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENTRY="$ROOT/$1"
shift 1

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
DS_CONFIG="${DS_CONFIG:-$ROOT/ds_config_zero2.json}"
# A relative DS_CONFIG is looked up in the current directory, then in the checkout (where the shipped configs
# are), and passed on as an absolute path (the ranks and the preflight then find it whatever their cwd).
if [[ "$DS_CONFIG" != /* ]]; then
  if [[ -f "$DS_CONFIG" ]]; then
    DS_CONFIG="$(cd "$(dirname "$DS_CONFIG")" && pwd)/$(basename "$DS_CONFIG")"
  elif [[ -f "$ROOT/$DS_CONFIG" ]]; then
    DS_CONFIG="$ROOT/$DS_CONFIG"
  else
    echo "launch: DS_CONFIG=$DS_CONFIG: no such file in $PWD or $ROOT" >&2
    exit 2
  fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_PORT="${MASTER_PORT:-29500}"
MAX_RESTARTS="${MAX_RESTARTS:-2}"

# GPUs and ranks (HOSTFILE's slots, NUM_GPUS, CUDA_VISIBLE_DEVICES, nvidia-smi, NPROC): sets gpus, ranks,
# devices (what --include takes) and hosts. The preflight checks the same rule by running this file, so
# it lives there only. Under HOSTFILE the ranks are GPU ranks on the hostfile's hosts, whatever this
# (head) node has, unless NPROC is set or the arguments hold --use_cpu true.
source "$ROOT/scripts/topology.sh"

overrides=(--deepspeed "$DS_CONFIG")
launcher_exports=()  # what this script exports for the job, shown by DRY_RUN
if (( gpus == 0 )); then
  overrides+=(--use_cpu true)
  # Share the cores between the CPU ranks instead of letting each oversubscribe them. Not under
  # HOSTFILE: the ranks run on the hostfile's hosts, whose cores this node does not know.
  if [[ -z "${HOSTFILE:-}" ]]; then
    cores=$(nproc)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / ranks > 0 ? cores / ranks : 1 ))}"
    launcher_exports+=("OMP_NUM_THREADS=$OMP_NUM_THREADS")
  fi
fi

# A run config given as the first argument stays first; the user's overrides come after ours and win.
args=()
if (( $# > 0 )) && [[ "$1" != -* ]]; then args+=("$1"); shift; fi
args+=("${overrides[@]}" "$@")
root_pythonpath="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# The run config (YAML syntax, UTF-8, a mapping) and the output dir (not a file, writable) are checked first;
# nothing is written before this. A dry run runs no Python and skips it.
if [[ "${DRY_RUN:-0}" != 1 ]]; then
  output_dir=$(PYTHONPATH="$root_pythonpath" "$PYTHON" "$ROOT/scripts/output_dir.py" "$(basename "$ENTRY")" "${args[@]}") \
    || exit $?
fi

# Under HOSTFILE, DeepSpeed's runner starts the remote ranks through pdsh and ssh, and passes on only
# the variables with its own prefixes (PYTHON, MLFLOW, UCX, MV2; NCCL only when this node has a GPU).
# The rest of the job's environment goes through DeepSpeed's env file: the runner reads KEY=VALUE lines
# from $DS_ENV_FILE (default .deepspeed_env) in ~ and in the current directory, after its own prefixes,
# and writes "export KEY=VALUE;" into each remote command. This script writes its own file,
#   ${XDG_CACHE_HOME:-~/.cache}/llmtrain/deepspeed_env.<launcher pid>   (mode 0600, directory 0700)
# and points the runner at it (env DS_ENV_FILE=... in the command), so a user's own .deepspeed_env is
# never touched; its lines (from the files the runner would have read) are copied in after ours, so they
# still win, as in DeepSpeed. Files of launches that have ended are removed by the next launch.
# Values never reach the console or the logs: only the names are printed.
remote_env_prefixes='^(SWANLAB_|WANDB_|HF_|HUGGINGFACE_|TRANSFORMERS_|TOKENIZERS_|NCCL_|GLOO_|TORCH_|PYTORCH_|CUDA_|OMP_|MKL_|LLMTRAIN_)'
remote_env_file=""
remote_env_names=()
write_remote_env() {
  local dir name value file line base
  local -a user_files=()
  dir="${XDG_CACHE_HOME:-$HOME/.cache}/llmtrain"
  mkdir -p "$dir"
  chmod 700 "$dir"
  for file in "$dir"/deepspeed_env.*; do
    name="${file##*.}"
    if [[ -f "$file" && "$name" =~ ^[0-9]+$ ]] && ! kill -0 "$name" 2>/dev/null; then rm -f "$file"; fi
  done
  remote_env_file="$dir/deepspeed_env.$$"
  rm -f "$remote_env_file"
  (umask 077 && : >"$remote_env_file")
  chmod 600 "$remote_env_file"
  {
    # PYTHON* is left to the runner, which puts the working directory in front of PYTHONPATH.
    for name in $(compgen -e); do
      if [[ ! "$name" =~ $remote_env_prefixes ]]; then continue; fi
      value="${!name}"
      if [[ "$value" == *$'\n'* ]]; then
        echo "launch: $name is not passed to the remote ranks: its value spans lines (the env file holds one per line)" >&2
        continue
      fi
      # The runner wraps such a value in double quotes, which the remote shell reads: escape \ " $ `.
      value="${value//\\/\\\\}"
      value="${value//\"/\\\"}"
      value="${value//\$/\\\$}"
      value="${value//\`/\\\`}"
      printf '%s=%s\n' "$name" "$value"
      remote_env_names+=("$name")
    done
    # The user's own env file(s), where the runner would have looked without our DS_ENV_FILE.
    for base in "$HOME" "$PWD"; do
      file="${DS_ENV_FILE:-.deepspeed_env}"
      [[ "$file" == /* ]] || file="$base/$file"
      [[ -f "$file" && ! "$file" -ef "$remote_env_file" ]] || continue
      for line in "${user_files[@]}"; do [[ "$file" -ef "$line" ]] && continue 2; done
      user_files+=("$file")
      while IFS= read -r line || [[ -n "$line" ]]; do
        if [[ "$line" != *=* ]]; then continue; fi  # blank lines would stop the runner's reader
        printf '%s\n' "$line"
        name="${line%%=*}"
        name="${name#"${name%%[![:space:]]*}"}"
        remote_env_names+=("${name%"${name##*[![:space:]]}"} (from $file)")
      done <"$file"
    done
  } >"$remote_env_file"
}

if [[ -n "${HOSTFILE:-}" ]]; then
  write_remote_env
  launcher=(env "DS_ENV_FILE=$remote_env_file"
            "$PYTHON" -u -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
  [[ -n "${MASTER_ADDR:-}" ]] && launcher+=(--master_addr "$MASTER_ADDR")
  echo "launch: remote ranks get ${#remote_env_names[@]} variable(s) through $remote_env_file:" \
    "${remote_env_names[*]:-none} (and PYTHON* from DeepSpeed's runner itself)"
elif (( NNODES > 1 )); then
  launcher=("$PYTHON" -u -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK"
            --master_addr "${MASTER_ADDR:?NNODES>1 needs MASTER_ADDR}" --master_port "$MASTER_PORT"
            --nproc_per_node "$ranks")
elif [[ -n "$devices" ]]; then
  # --num_gpus would make DeepSpeed ignore CUDA_VISIBLE_DEVICES; --include honours it. devices is the
  # list CUDA_VISIBLE_DEVICES gives, or its first NUM_GPUS entries (scripts/topology.sh).
  launcher=("$PYTHON" -u -m deepspeed.launcher.runner --include "localhost:$devices"
            --master_port "$MASTER_PORT")
else
  launcher=("$PYTHON" -u -m deepspeed.launcher.runner --num_gpus "$ranks" --master_port "$MASTER_PORT")
fi
cmd=("${launcher[@]}" "$ENTRY" "${args[@]}")

# DRY_RUN=1: print what would run and stop: nothing started, no output dir, no preflight. It runs no Python, so
# secret flag values are printed as given (to this console only: a dry run records nothing).
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "dry run: gpus=$gpus ranks=$ranks gpus_from=$gpus_from hosts=$hosts"
  if (( ${#launcher_exports[@]} > 0 )); then echo "dry run: exports ${launcher_exports[*]}"; fi
  printf 'dry run: command:'
  for word in "${cmd[@]}"; do
    if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf ' %s' "$word"; else printf ' %s' "${word@Q}"; fi
  done
  echo
  exit 0
fi

# Secrets given as flags (llmtrain/config/secrets.py decides which: --hub_token, *_api_key, ...): the job runs the
# real command, but what is recorded (logs/launch-*.sh, the "launch:" line) shows their values as ***, and the
# job's and the preflight's output reach the console and the log through redact_output, which hides the same
# values wherever they appear (DeepSpeed's launchers print every rank's command line).
mapfile -d '' -t shown_cmd < <(PYTHONPATH="$root_pythonpath" "$PYTHON" -m llmtrain.config.secrets redact "${cmd[@]}")
if (( ${#shown_cmd[@]} != ${#cmd[@]} )); then
  echo "launch: could not hide the secret values of the command line (python -m llmtrain.config.secrets failed)" >&2
  exit 1
fi
secret_values=()
for index in "${!cmd[@]}"; do
  [[ "${shown_cmd[index]}" == "${cmd[index]}" ]] && continue
  if [[ "${shown_cmd[index]}" == "***" ]]; then secret_values+=("${cmd[index]}"); else secret_values+=("${cmd[index]#*=}"); fi
done
# redact_output [LOG]: stdin to stdout and appended to LOG, secret values hidden. One process (exec), so the
# log copy of run_job is tee itself, or the filter itself: no bash subshell stays behind in the job's tree.
redact_output() {
  if (( ${#secret_values[@]} == 0 )); then
    exec tee -a "$@"
  else
    LLMTRAIN_REDACT="$(printf '%s\n' "${secret_values[@]}")" PYTHONPATH="$root_pythonpath" \
      exec "$PYTHON" -u -m llmtrain.config.secrets filter "$@"
  fi
}

log_dir="$output_dir/logs"
mkdir -p "$log_dir"
stamp="$(date +%Y%m%d-%H%M%S)-node$NODE_RANK"
printf '%q ' "${shown_cmd[@]}" >"$log_dir/launch-$stamp.sh"
echo >>"$log_dir/launch-$stamp.sh"
log="$log_dir/launch-$stamp.log"
# One line to the console and the log, without a pipe: a signal to the process group cannot cut it.
say() {
  printf '%s\n' "$*"
  printf '%s\n' "$*" >>"$log"
}
say "launch: ${shown_cmd[*]}"
echo "log: $log"

# --- Interruption ---------------------------------------------------------------------------------
# Schedulers and terminals signal the whole foreground process group (scancel, timeout, a k8s eviction,
# Ctrl-C). The training job runs in a session of its own (setsid), so that signal reaches this script and
# the log copy only, never DeepSpeed's launcher (whose handler kills the ranks at once). This script sends
# one SIGTERM to every rank instead: each finishes its step, saves a complete checkpoint and exits 75.
PREEMPT_GRACE_S="${PREEMPT_GRACE_S:-600}"
[[ "$PREEMPT_GRACE_S" =~ ^[0-9]+$ ]] || { say "launch: PREEMPT_GRACE_S='$PREEMPT_GRACE_S' must be a whole number of seconds"; exit 2; }
stop_signal=""
aborted=0
job_pid=""
watcher_pid=""

descendants() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}

# The training processes of the job: descendants running ENTRY, not a launcher module.
rank_pids() {
  local pid args
  for pid in $(descendants "$1"); do
    args=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || continue
    [[ "$args" == *"$ENTRY"* && "$args" != *deepspeed.launcher* && "$args" != *torch.distributed.run* ]] \
      && echo "$pid"
  done
}

kill_job() {
  # torchrun's workers leave its session, so the process tree is walked, not the group.
  kill -KILL $(descendants "$job_pid") "$job_pid" 2>/dev/null || true
}

# In the background after the first signal: SIGTERM to every rank (also ranks still starting up), then,
# past the grace period, kill what is left.
preempt_watch() {
  trap '' TERM INT HUP
  local signalled=" " pid waited=0
  while (( waited < PREEMPT_GRACE_S )); do
    for pid in $(rank_pids "$job_pid"); do
      [[ "$signalled" == *" $pid "* ]] && continue
      kill -TERM "$pid" 2>/dev/null && signalled+="$pid "
    done
    sleep 1
    waited=$((waited + 1))
  done
  say "launch: the ranks did not stop within PREEMPT_GRACE_S=${PREEMPT_GRACE_S}s; killing them"
  kill_job
}

on_stop_signal() {
  local name=$1
  if [[ -z "$job_pid" ]]; then
    say "launch: SIG$name before training started; stopping"
    exit $(( 128 + $(kill -l "$name") ))
  fi
  if [[ -n "$stop_signal" ]]; then
    if [[ "$name" == INT ]]; then
      aborted=1
      say "launch: second SIGINT: killing every rank now"
      kill_job
    fi
    return
  fi
  stop_signal=$name
  say "launch: SIG$name: every rank saves a complete checkpoint after its current step, then stops" \
    "(up to PREEMPT_GRACE_S=${PREEMPT_GRACE_S}s; a second Ctrl-C aborts)"
  preempt_watch &
  watcher_pid=$!
  disown "$watcher_pid"  # killed when the job ends; bash need not report it
}
trap 'on_stop_signal TERM' TERM
trap 'on_stop_signal INT' INT
trap 'on_stop_signal HUP' HUP

# Preflight: config, GPUs vs ranks, tokenizer, data files, output dir, disk (python -m llmtrain.tools.doctor --fast).
if [[ "${SKIP_DOCTOR:-0}" != 1 ]]; then
  set +e
  PYTHONPATH="$root_pythonpath" "$PYTHON" -m llmtrain.tools.doctor "$(basename "$ENTRY" .py)" --fast \
    "${args[@]}" 2>&1 | (redact_output "$log")
  status=${PIPESTATUS[0]}
  set -e
  if (( status != 0 )); then
    say "launch: preflight failed (exit $status); fix the ERROR lines above (SKIP_DOCTOR=1 skips the check)"
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

# The ranks' own exit code, where the launcher in between reports another. torchrun exits 1 whatever its workers'
# codes ("exitcode  : 75" in its failure report). DeepSpeed's runner exits with its launch.py's code, which is the
# first failing rank's ("... exits with return code = 75", logged per node; pdsh carries the remote nodes' lines
# back, prefixed by the host), but is 1 when launch.py itself was signalled, and the runner dies (143) when it is.
# Every rank also logs "rank N exits with return code = 75" (llmtrain/cli.py). Negative codes are ranks killed by
# a signal, which the launchers send to the other ranks once one has stopped: ignored. When the codes left agree
# on one of ours (2, 3, 75), that code is the run's.
worker_exit_code() {
  local codes
  codes=$(tail -n "+$1" "$log" | grep -oE '(exitcode *: *|exits with return code = )-?[0-9]+' \
    | grep -oE -- '-?[0-9]+$' | grep -v -- '^-' | sort -u)
  [[ -n "$codes" && $(wc -l <<<"$codes") -eq 1 ]] && echo "$codes"
}

# One attempt: the job in its own session, its output through a log copy that ignores the stop signals
# (so the console log survives them and records the save). Sets status.
run_job() {
  local fifo="$log_dir/.launch-$stamp.fifo" tee_pid
  rm -f "$fifo"
  mkfifo "$fifo"
  (trap '' TERM INT HUP; redact_output "$log" <"$fifo") &
  tee_pid=$!
  setsid "${cmd[@]}" >"$fifo" 2>&1 &
  job_pid=$!
  set +e
  while true; do  # a trapped signal returns wait early; the job is still there then
    wait "$job_pid" 2>/dev/null  # (no "Killed" line from bash: the launcher says what happened)
    status=$?
    kill -0 "$job_pid" 2>/dev/null || break
  done
  while true; do
    wait "$tee_pid"
    kill -0 "$tee_pid" 2>/dev/null || break
  done
  set -e
  rm -f "$fifo"
  job_pid=""
  if [[ -n "$watcher_pid" ]]; then
    kill -KILL "$watcher_pid" 2>/dev/null || true
    watcher_pid=""
  fi
}

# A crashed run is restarted (it resumes by itself) up to MAX_RESTARTS times, but only while
# each attempt leaves a newer complete checkpoint behind. Bad input (2), a non-finite loss under
# nonfinite_policy: stop (3), preemption (75, also when only the ranks were signalled), a stop signal to this
# script, and DeepSpeed's runner or torchrun killed by one (129, 130, 143) are never retried.
export PYTHONUNBUFFERED=1
restarts=0
while true; do
  before=$(newest_complete_step)
  first_line=$(( $(wc -l <"$log") + 1 ))
  run_job
  if [[ ! "$status" =~ ^(0|2|3|75)$ ]]; then
    worker_status=$(worker_exit_code "$first_line" || true)
    [[ "$worker_status" =~ ^(2|3|75)$ ]] && status=$worker_status
  fi
  if (( aborted )); then
    say "launch: aborted by a second SIGINT (exit 130); the newest complete checkpoint is step $(newest_complete_step)"
    exit 130
  fi
  if [[ -n "$stop_signal" ]]; then
    if (( status == 75 )); then
      say "launch: stopped on SIG$stop_signal after saving a complete checkpoint (step $(newest_complete_step)) (exit 75);" \
        "rerun the same command to resume"
    else
      say "launch: stopped on SIG$stop_signal; the ranks ended with exit $status before saving (exit 75);" \
        "rerun the same command to resume from the newest complete checkpoint (step $(newest_complete_step))"
    fi
    exit 75
  fi
  case "$status" in
    0) exit 0 ;;
    2) say "launch: bad input or configuration (exit 2); not retrying"; exit 2 ;;
    3) say "launch: non-finite loss or gradients (exit 3); not retrying"; exit 3 ;;
    75) say "launch: the ranks stopped on a signal after saving a complete checkpoint (step $(newest_complete_step))" \
          "(exit 75); not retrying: rerun the same command to resume"
        exit 75 ;;
    129|130|143)  # DeepSpeed's runner or torchrun was itself stopped by SIGHUP/SIGINT/SIGTERM: a stop request
        say "launch: the job was stopped by SIG$(kill -l $((status - 128))) (exit $status), not by this script;" \
          "not retrying: rerun the same command to resume from the newest complete checkpoint (step $(newest_complete_step))"
        exit "$status" ;;
  esac
  after=$(newest_complete_step)
  if (( after <= before )); then
    say "launch: exit $status with no new complete checkpoint since this attempt began (newest: step $after); not retrying"
    exit "$status"
  fi
  if (( restarts >= MAX_RESTARTS )); then
    say "launch: exit $status; giving up after $restarts restart(s) (MAX_RESTARTS=$MAX_RESTARTS)"
    exit "$status"
  fi
  restarts=$((restarts + 1))
  say "launch: exit $status; restart $restarts/$MAX_RESTARTS resumes from step $after"
done
