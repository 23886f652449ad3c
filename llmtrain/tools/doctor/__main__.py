"""``python -m llmtrain.tools.doctor``: print the report, exit 2 when a check failed (usage: the package docstring)."""

from __future__ import annotations

import sys

from llmtrain.cli import run_cli
from llmtrain.tools.doctor.cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
