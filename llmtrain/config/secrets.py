"""Which settings are credentials: refused as flags and run-config keys, and left out of what a run records.

A credential reaches a run through the environment (``HF_TOKEN``, ``SWANLAB_API_KEY``) or the
library's own stored login (``hf auth login``, ``swanlab login``), where the library that uses it
reads it; never through a flag, which every user of the machine sees in ``ps`` and which every
record of the command keeps (the launcher's ``logs/launch-*.sh``, SwanLab's metadata), nor through
a run config, which is saved, copied and shared. :func:`refuse_secret_settings` turns such a flag
or key away at parse time, with the variable to set instead: in :func:`llmtrain.config.parser.parse_args`
(the entry points and the doctor), in :func:`llmtrain.cli.run_cli` (the flags of every tool) and in the
launcher's plan (:mod:`llmtrain.launch.plan`), before anything is written or started. What a run
records leaves out every key :func:`is_secret_key` names, whatever reached it: the resolved run config
(:func:`llmtrain.config.parser.resolved_config`), the pickled training arguments
(``TrainArguments.__getstate__``), the recorded command (:func:`redact_secrets`). Under ``HOSTFILE``
no variable :func:`is_secret_variable` names is passed to another host, where it would be on a command
line (:mod:`llmtrain.launch.remote_env`).

Light (standard library and :mod:`llmtrain.errors` only): the launcher imports it before anything starts.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from llmtrain.errors import ConfigError

if TYPE_CHECKING:
    from llmtrain.config.yaml_file import RunConfig

# A key is a credential when one of its words (split at "_" or "-", as HfArgumentParser also accepts --hub-token)
# is one of these, or two of them in a row are a pair below: hub_token, swanlab_api_key, client_secret,
# db_password. Whole words, so tokenized_path, tokenizer_name and include_num_input_tokens_seen are not.
SECRET_WORDS = frozenset({"token", "secret", "password", "passwd", "apikey", "credentials"})
SECRET_WORD_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key")})
# Keys whose value is a token of the vocabulary (a string such as "<|im_end|>"), not a credential.
VOCABULARY_TOKEN_KEYS = frozenset({"end_of_turn_token", "pad_token", "eos_token", "bos_token", "unk_token"})
# Environment variables named like credentials that hold none (huggingface_hub's constants.py): where the
# stored token is, and whether to send it.
NOT_SECRET_VARIABLES = frozenset({"HF_TOKEN_PATH", "HF_HUB_DISABLE_IMPLICIT_TOKEN"})
REDACTED = "***"

# Where each credential is read from instead, by the library that uses it. huggingface_hub's get_token()
# reads HF_TOKEN, then the file `hf auth login` stores, for every download and upload (the Trainer's
# hub_token left unset included); swanlab reads SWANLAB_API_KEY, then `swanlab login`'s .netrc; wandb
# reads WANDB_API_KEY, then `wandb login`'s .netrc. use_auth_token and push_to_hub_token are transformers 4's.
ENVIRONMENT_VARIABLES = {
    "hub_token": "HF_TOKEN",
    "hf_token": "HF_TOKEN",
    "token": "HF_TOKEN",
    "use_auth_token": "HF_TOKEN",
    "push_to_hub_token": "HF_TOKEN",
    "swanlab_api_key": "SWANLAB_API_KEY",
    "wandb_api_key": "WANDB_API_KEY",
}
LOGIN_COMMANDS = {"HF_TOKEN": "hf auth login", "SWANLAB_API_KEY": "swanlab login", "WANDB_API_KEY": "wandb login"}
WHY_NOT_A_FLAG = "a credential never goes in a flag, which ps and every record of the command show"
WHY_NOT_A_KEY = "a credential never goes in a run config, which is saved, copied and shared"


def is_secret_key(key: str) -> bool:
    """True for keys such as ``hub_token`` whose values are credentials (and must never be written out).

    >>> [is_secret_key(k) for k in ("hub_token", "SWANLAB_API_KEY", "hub-token", "tokenizer_name", "end_of_turn_token")]
    [True, True, True, False, False]
    """
    normalised = key.lower().replace("-", "_")
    if normalised in VOCABULARY_TOKEN_KEYS:
        return False
    words = normalised.split("_")
    return not SECRET_WORDS.isdisjoint(words) or not SECRET_WORD_PAIRS.isdisjoint(itertools.pairwise(words))


def is_secret_variable(name: str) -> bool:
    """True for an environment variable whose value is a credential: named as :func:`is_secret_key` says.

    >>> [is_secret_variable(n) for n in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "DB_PASSWORD")]
    [True, True, True, True]
    >>> [is_secret_variable(n) for n in ("MY_SECRET", "HF_HOME", "TOKENIZERS_PARALLELISM", "HF_TOKEN_PATH")]
    [True, False, False, False]
    """
    return name not in NOT_SECRET_VARIABLES and is_secret_key(name)


def instead(key: str) -> str:
    """What to do instead of giving the credential ``key`` as a setting: the environment variable to set.

    >>> instead("hub-token")
    'set the HF_TOKEN environment variable instead (or run `hf auth login`)'
    """
    variable = ENVIRONMENT_VARIABLES.get(key.lower().replace("-", "_"))
    if variable is None:
        return (
            "set it in the environment, where the library that uses it reads it (HF_TOKEN for the Hugging Face "
            "Hub, SWANLAB_API_KEY for SwanLab)"
        )
    return f"set the {variable} environment variable instead (or run `{LOGIN_COMMANDS[variable]}`)"


def secret_flag(args: Sequence[str]) -> str | None:
    """The first flag of ``args`` that names a credential, as spelled (``--hub-token`` of ``--hub-token=X``), or None.

    Every spelling the parser takes counts: ``_`` or ``-`` between words, the value after ``=`` or
    as the next word; and one leading dash, which argparse would report back, value and all, as unknown.

    >>> secret_flag(["--seed", "1", "--hub-token=hf_x"]), secret_flag(["--tokenizer_name_or_path", "t"])
    ('--hub-token', None)
    """
    for arg in args:
        flag = arg.partition("=")[0]
        if flag.startswith("-") and is_secret_key(flag.lstrip("-")):
            return flag
    return None


def refuse_secret_settings(overrides: Sequence[str], config: RunConfig | None = None) -> None:
    """Raise :class:`ConfigError` for a credential given as a CLI flag in ``overrides`` or a key of ``config``.

    The message names the flag or ``file:line: 'key'`` and the environment variable to set
    instead; it never holds the value. Present at all is enough: an empty ``hub_token:`` is refused too.

    >>> refuse_secret_settings(["--seed", "1", "--swanlab_api_key", "sk-1"])
    Traceback (most recent call last):
    ...
    llmtrain.errors.ConfigError: --swanlab_api_key is not supported (a credential never goes in a flag, which \
ps and every record of the command show): set the SWANLAB_API_KEY environment variable instead (or run `swanlab login`)
    """
    flag = secret_flag(overrides)
    if flag is not None:
        raise ConfigError(f"{flag} is not supported ({WHY_NOT_A_FLAG}): {instead(flag.lstrip('-'))}")
    if config is None:
        return
    for key in config.values:
        if is_secret_key(key):
            raise ConfigError(f"{config.where(key)}: '{key}' is not supported ({WHY_NOT_A_KEY}): {instead(key)}")


def redact_secrets(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every secret flag replaced, for logging and recording a command.

    Flags can no longer carry secrets (:func:`refuse_secret_settings`); this stays as a cheap second
    line wherever a command line is logged or written.

    >>> redact_secrets(["--hub_token", "hf_x", "--seed", "1", "--hub_token=hf_y"])
    ['--hub_token', '***', '--seed', '1', '--hub_token=***']
    >>> redact_secrets(["--hub_token", "--seed", "1"])  # no value given: the next flag is not one
    ['--hub_token', '--seed', '1']
    """
    redacted: list[str] = []
    hide_next = False
    for item in argv:
        flag, has_value, _ = item.partition("=")
        if hide_next and not item.startswith("--"):
            redacted.append(REDACTED)
            hide_next = False
        elif flag.startswith("--") and is_secret_key(flag[2:]):
            redacted.append(f"{flag}={REDACTED}" if has_value else item)
            hide_next = not has_value
        else:
            redacted.append(item)
            hide_next = False
    return redacted
