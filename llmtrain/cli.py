"""The command-line wrapper of every entry point and tool: console logging, exit codes, secret flags refused.

Light on purpose (logging, :mod:`llmtrain.errors`, :mod:`llmtrain.config.secrets` and
:mod:`llmtrain.supervision` only): ``python -m llmtrain.tools.chat`` imports this, not the training stack.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Callable

from llmtrain.config.secrets import refuse_secret_settings
from llmtrain.errors import (
    DIVERGED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
    TrainingDiverged,
    TrainingPreempted,
    UserInputError,
)
from llmtrain.supervision import attach_rank, report_exit

logger = logging.getLogger(__name__)


def setup_logging() -> None:
    """Console logging for entry points: INFO on the launcher's rank 0, warnings on the others.

    ``RANK`` (set by every launcher) is read here because arguments are logged while being
    parsed, before the Trainer knows the rank; :func:`llmtrain.run.process.set_rank_log_level` takes over after.
    """
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
        stream=sys.stdout,
    )
    # DeepSpeed probes for libaio with a test compile at import; its gcc lines are not ours to show.
    logging.getLogger("compilers").setLevel(logging.WARNING)


def settle_imports() -> None:
    """Exempt every object alive now from the cyclic garbage collector, then (re)enable it.

    An entry point turns collection off before importing the training stack and this turns it back on:
    torch, transformers, DeepSpeed and PEFT leave millions of objects that live as long as the process,
    and every full collection walks all of them again, during the imports, the training steps and the
    interpreter's exit. Frozen (:func:`gc.freeze`), they stay out of every collection, those of the data
    loader workers forked later included. Measured on one 2-core machine, 2026-12-07: importing
    transformers' Trainer and DeepSpeed and exiting took 5.5 s, 3.6 s this way.
    """
    gc.freeze()
    gc.enable()


def run_cli(main: Callable[[list[str]], None]) -> int:
    """Run an entry point's ``main``: bad input is one logged line and exit 2, preemption exit 75,
    a non-finite loss under ``nonfinite_policy: stop`` exit 3.

    ``main`` gets a copy of the arguments. A credential given as a flag is refused first, for every
    tool whatever its parser (exit 2, naming the variable to set instead; :mod:`llmtrain.config.secrets`):
    no run goes on with one on its command line, and no parser echoes its value back as unknown. A rank of a launch
    first waits for its launcher's preflight and comes under its control, and records its exit code
    for it (:mod:`llmtrain.supervision`), an uncaught exception as 1.
    """
    settle_imports()
    setup_logging()
    argv = sys.argv[1:]
    try:
        code = _run(main, argv)
    except SystemExit as ended:
        report_exit(ended.code if isinstance(ended.code, int) else 1)
        raise
    except BaseException:
        report_exit(1)
        raise
    report_exit(code)
    if code != 0 and "WORLD_SIZE" in os.environ:
        # For whoever reads a rank's log (the launcher itself reads the recorded code).
        logger.warning("rank %s exits with return code = %d", os.environ.get("RANK", "?"), code)
    return code


def _run(main: Callable[[list[str]], None], argv: list[str]) -> int:
    try:
        attach_rank()
        refuse_secret_settings(argv)
        main(argv)
    except UserInputError as error:
        logger.error("%s", error)
        return USER_ERROR_EXIT_CODE
    except TrainingPreempted as stopped:
        logger.warning("%s", stopped)
        return PREEMPTED_EXIT_CODE
    except TrainingDiverged as diverged:
        logger.error("%s", diverged)
        return DIVERGED_EXIT_CODE
    return 0
