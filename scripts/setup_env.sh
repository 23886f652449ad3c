#!/usr/bin/env bash
# Create the project's virtual environment (.venv) and install the pinned stack and dev tools.
# Idempotent: pip runs again only when requirements*.txt changed. Needs Python >= 3.11.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BOOTSTRAP_PYTHON="${BOOTSTRAP_PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  echo "creating .venv with $("$BOOTSTRAP_PYTHON" --version)"
  "$BOOTSTRAP_PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
wanted=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
  echo "installing requirements-dev.txt into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
  .venv/bin/python -m pip check
  echo "$wanted" >"$stamp"
fi
