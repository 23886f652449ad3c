"""Print the output_dir a launch will use, without importing the training stack (fast).

Used by the launchers to place their logs before Python training starts:
``python scripts/output_dir.py ENTRY.py [config.yaml] [--key value ...]``; without a config.yaml,
the stage's default config (:mod:`llmtrain.stages`) is read.
"""

import sys
from pathlib import Path

import yaml

from llmtrain.stages import find_stage


def main(argv: list[str]) -> str:
    entry, *args = argv
    config = find_stage(entry).default_config
    if args and not args[0].startswith("-"):
        config = Path(args.pop(0))
    output_dir = None
    if config.is_file():
        output_dir = (yaml.safe_load(config.read_text()) or {}).get("output_dir")
    for index, arg in enumerate(args):
        if arg == "--output_dir" and index + 1 < len(args):
            output_dir = args[index + 1]
        elif arg.startswith("--output_dir="):
            output_dir = arg.split("=", 1)[1]
    return output_dir or "trainer_output"


if __name__ == "__main__":
    sys.stdout.write(main(sys.argv[1:]) + "\n")
