"""A fork server for the entry points: ``python -m tests.entry_server``, for tests that run many short refusals.

Each run of ``python pretrain.py ...`` spends most of its start importing torch, transformers, DeepSpeed and
PEFT (~4 s on an idle 2-core machine, 2026-12-07). This server imports both entry modules once, then forks a
child per request that runs the entry exactly as ``python ENTRY ARGS`` would (``runpy`` with ``__name__ ==
"__main__"``, so ``run_cli`` and its exit codes), in the request's directory, environment and argv, with
stdout and stderr going to the request's files and stdin from /dev/null; the child runs the interpreter's
exit handlers, then exits with the entry's code. Every run starts from the server's freshly imported state,
never from another run's.

Protocol: one JSON request per line on stdin (``entry``, ``args``, ``cwd``, ``env``, ``stdout``, ``stderr``);
one JSON line back on stdout per request, in order: ``{"returncode": N}`` (negative: killed by signal N).
Settings read at import time (``HF_HUB_OFFLINE`` and the like) come from the server's own environment,
which the tests give the same offline values as every run's.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import os
import runpy
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ENTRIES = ("pretrain", "finetune")


def run_child(request: dict) -> None:
    """In the forked child: become ``python ENTRY ARGS`` and never return."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        stdin = os.open(os.devnull, os.O_RDONLY)
        stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        stderr = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for source, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(source, target)
            os.close(source)
        entry = str(REPO_ROOT / request["entry"])
        sys.argv = [entry, *request["args"]]
        try:
            runpy.run_path(entry, run_name="__main__")
            code = 0
        except SystemExit as ended:
            code = ended.code if isinstance(ended.code, int) else (0 if ended.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed stream at exit changes nothing
                stream.flush()
        os._exit(code)


def serve() -> None:
    sys.path.insert(0, str(REPO_ROOT))
    gc.disable()  # as each entry does when run: the imports without collections, then settled as in run_cli
    for name in ENTRIES:
        importlib.import_module(name)
    from llmtrain.cli import settle_imports

    settle_imports()
    requests = sys.stdin
    replies = sys.stdout
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in requests:
        request = json.loads(line)
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_child(request)
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()
