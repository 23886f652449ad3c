"""Print the output_dir a launch will use, without importing the training stack (fast).

Used by the launchers to place their logs before Python training starts:
``python scripts/output_dir.py DEFAULT_CONFIG [config.yaml] [--key value ...]``.
"""

import sys
from pathlib import Path

import yaml


def main(argv: list[str]) -> str:
    default_config, *args = argv
    config = Path(default_config)
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
