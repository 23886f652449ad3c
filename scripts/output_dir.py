"""Print the output_dir a launch will use after checking it can be made, without the training stack (fast).

Run by the launchers before anything else, to validate the run config and place their logs:
``python scripts/output_dir.py ENTRY.py [config.yaml] [--key value ...]``; without a config.yaml,
the stage's default config (:mod:`llmtrain.stages`) is read. The YAML file is read by
:mod:`llmtrain.config.yaml_file`, the entry points' own reader. A bad config (invalid YAML, not
UTF-8, not a mapping) or an output_dir that cannot be made (a file, a read-only mount) is one
``launch: ...`` line on stderr and exit 2, with nothing written.
"""

import sys
from pathlib import Path

from llmtrain.config.yaml_file import read_run_config, split_config_path
from llmtrain.errors import USER_ERROR_EXIT_CODE, ConfigError, UserInputError
from llmtrain.paths import writable_problem
from llmtrain.stages import find_stage

DEFAULT_OUTPUT_DIR = "trainer_output"  # TrainingArguments' own default
LOG_DIR = "logs"  # where the launcher writes its command and console log


def find_output_dir(argv: list[str]) -> str:
    """``ENTRY.py [config.yaml] [--key value ...]`` -> the output_dir: the last CLI value, else the YAML's."""
    entry, *args = argv
    config_path, overrides = split_config_path(args, find_stage(entry).default_config)
    output_dir = None
    if config_path is not None:
        config = read_run_config(config_path)
        output_dir = config.values.get("output_dir")
        if isinstance(output_dir, list | dict):
            raise ConfigError(f"{config.where('output_dir')}: 'output_dir' takes a single path")
    for index, arg in enumerate(overrides):
        flag, has_value, value = arg.partition("=")
        if flag not in ("--output_dir", "--output-dir"):  # the parser takes both spellings
            continue
        if has_value:
            output_dir = value
        elif index + 1 < len(overrides):
            output_dir = overrides[index + 1]
    return str(output_dir) if output_dir not in (None, "") else DEFAULT_OUTPUT_DIR


def directory_problem(path: Path) -> str | None:
    """Why the directory ``path`` cannot be made and written in, or None.

    Beyond the run's own probe (:func:`llmtrain.paths.writable_problem`, which creates and deletes a
    file in ``path`` or its nearest existing parent), a file or a broken link at ``path`` is named as such.
    """
    if path.is_symlink() and not path.exists():
        return f"{path} is a broken symbolic link"
    if path.exists() and not path.is_dir():
        return f"{path} is a file" if path.is_file() else f"{path} is not a directory"
    return writable_problem(path)


def main(argv: list[str]) -> int:
    """Print the output_dir and return 0, or print why not (``launch: ...`` on stderr) and return 2."""
    try:
        output_dir = find_output_dir(argv)
    except UserInputError as error:
        sys.stderr.write(f"launch: {error}\n")
        return USER_ERROR_EXIT_CODE
    problem = directory_problem(Path(output_dir)) or directory_problem(Path(output_dir) / LOG_DIR)
    if problem is not None:
        sys.stderr.write(f"launch: output_dir: {problem}\n")
        return USER_ERROR_EXIT_CODE
    sys.stdout.write(output_dir + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
