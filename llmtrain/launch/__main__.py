"""``python -m llmtrain.launch ENTRY.py [config.yaml] [--key value ...]``: the launcher (see the package docstring)."""

from __future__ import annotations

import sys

from llmtrain.launch.supervisor import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
