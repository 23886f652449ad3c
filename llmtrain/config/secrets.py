"""Which settings are credentials, and how they are kept out of logs, saved configs, pickles and trackers.

Light (standard library only): the launchers run it as a helper, with the checkout on PYTHONPATH::

    python -m llmtrain.config.secrets redact WORD...  # the words, each ended by NUL, secret values as ***
    python -m llmtrain.config.secrets filter [LOG]    # stdin to stdout (and appended to LOG), the values
                                                      # in $LLMTRAIN_REDACT as ***

``filter`` takes the values to hide, one per line, from the environment (never from its command
line, which ``ps`` shows to every user).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

logger = logging.getLogger(__name__)

# A key is a credential when one of its words (split at "_" or "-", as HfArgumentParser also accepts --hub-token)
# is one of these, or two of them in a row are a pair below: hub_token, swanlab_api_key, client_secret,
# db_password. Whole words, so tokenized_path, tokenizer_name and include_num_input_tokens_seen are not.
SECRET_WORDS = frozenset({"token", "secret", "password", "passwd", "apikey", "credentials"})
SECRET_WORD_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key")})
# Keys whose value is a token of the vocabulary (a string such as "<|im_end|>"), not a credential.
VOCABULARY_TOKEN_KEYS = frozenset({"end_of_turn_token", "pad_token", "eos_token", "bos_token", "unk_token"})
REDACTED = "***"
FILTER_VALUES_VARIABLE = "LLMTRAIN_REDACT"  # the values `filter` hides, one per line


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


def redact_secrets(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every secret flag replaced, for logging.

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


def redact_command_line() -> None:
    """Hide secret flag values from this process's own command line, once its arguments are parsed.

    Both copies change: ``sys.argv``, and the arguments the kernel shows in ``/proc/self/cmdline``
    (``ps``), which is what SwanLab records as the run's command on Linux. Callers must have
    copied the real values first (:func:`llmtrain.cli.run_cli` passes ``sys.argv[1:]`` to ``main``).
    """
    sys.argv[:] = redact_secrets(sys.argv)
    if sys.platform == "linux":
        try:
            _redact_kernel_arguments()
        except (OSError, ValueError) as error:  # e.g. /proc not mounted: nothing more can be done
            logger.warning("could not hide secret values from /proc/self/cmdline: %s", error)


def _redact_kernel_arguments() -> None:
    """Overwrite the secret values in the process's argument area (what ``/proc/self/cmdline`` reads).

    The area keeps its length: each redacted word is cut to its original length and the rest is
    NUL bytes, which readers of ``cmdline`` (``ps``, SwanLab) skip as empty arguments.
    """
    with open("/proc/self/cmdline", "rb") as file:
        shown = file.read()
    with open("/proc/self/stat", "rb") as file:
        stat = file.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # fields 3.. of proc(5); arg_start/arg_end are 48, 49
    start, end = int(fields[48 - 3]), int(fields[49 - 3])
    with open("/proc/self/mem", "r+b", buffering=0) as memory:
        memory.seek(start)
        area = memory.read(end - start)
        if area != shown:  # moved (setproctitle) or extended: not an area this code understands
            raise ValueError("the argument area does not hold the command line")
        words = area.rstrip(b"\0").split(b"\0")
        redacted = [
            new.encode(errors="surrogateescape")[: len(old)]
            for old, new in zip(words, redact_secrets([w.decode(errors="surrogateescape") for w in words]), strict=True)
        ]
        if redacted == words:
            return
        new_area = b"\0".join(redacted)
        memory.seek(start)
        memory.write(new_area + b"\0" * (len(area) - len(new_area)))


def redact_chunks(chunks: Iterable[bytes], values: Sequence[bytes]) -> Iterator[bytes]:
    """The stream of ``chunks`` with every occurrence of ``values`` replaced by ``***``.

    A value split between two chunks is still found: the end of a chunk that could begin a value
    is held back until the next chunk (or the end) arrives; nothing else is delayed.

    >>> b"".join(redact_chunks([b"token=hf_ab", b"c9 ok\\n", b"hf_"], [b"hf_abc9"]))
    b'token=*** ok\\nhf_'
    """
    ordered = sorted({value for value in values if value}, key=len, reverse=True)
    pending = b""
    for chunk in chunks:
        data = pending + chunk
        for value in ordered:
            data = data.replace(value, REDACTED.encode())
        keep = _partial_value_at_end(data, ordered)
        pending = data[len(data) - keep :]
        if len(data) > keep:
            yield data[: len(data) - keep]
    if pending:
        yield pending


def _partial_value_at_end(data: bytes, values: Sequence[bytes]) -> int:
    """Length of the longest end of ``data`` that is the start of one of ``values`` (0 if none)."""
    longest = 0
    for value in values:
        for size in range(min(len(value) - 1, len(data)), longest, -1):
            if data.endswith(value[:size]):
                longest = size
                break
    return longest


def _read_chunks(fd: int) -> Iterator[bytes]:
    while chunk := os.read(fd, 1 << 16):
        yield chunk


def main(argv: list[str]) -> int:
    """The launchers' helper (module docstring)."""
    command, *words = argv or [""]
    if command == "filter" and len(words) <= 1:
        values = os.environb.get(FILTER_VALUES_VARIABLE.encode(), b"").splitlines()
        with open(words[0], "ab", buffering=0) if words else contextlib.nullcontext() as log:
            for piece in redact_chunks(_read_chunks(sys.stdin.fileno()), values):
                sys.stdout.buffer.write(piece)
                sys.stdout.buffer.flush()
                if log is not None:
                    log.write(piece)
        return 0
    if command == "redact":
        sys.stdout.write("".join(f"{word}\0" for word in redact_secrets(words)))
        return 0
    sys.stderr.write(__doc__ or "")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
