#!/usr/bin/env bash
# One command on a fresh machine: set up .venv, pretrain the embedded tiny default on CPU
# (about two minutes), then sample from the saved model. Extra arguments go to pretrain.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$ROOT/scripts/setup_env.sh"
bash "$ROOT/pretrain.sh" "$@"
output_dir=$("$ROOT/.venv/bin/python" "$ROOT/scripts/output_dir.py" "$ROOT/configs/pretrain_tiny.yaml" "$@")
echo "--- a sample from $output_dir ---"
"$ROOT/.venv/bin/python" -m llmtrain.generate --model "$output_dir" --prompt "Return the"
