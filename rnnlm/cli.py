"""Shared command-line plumbing: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from rnnlm.config import ConfigError


def run_main(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except BrokenPipeError:  # e.g. `python sample.py ... | head`
        code = 0
    leave(code or 0)


def leave(code: int) -> None:
    """Exit with `code`. A torchrun worker flushes its output and leaves with os._exit,
    skipping the interpreter's shutdown: DistributedDataParallel keeps the gloo process group
    (and its worker threads) alive past destroy_process_group, and a worker thread that
    releases the last collective a moment after the main thread has started shutting down
    needs the GIL to free it, which aborts the process ("terminate called without an active
    exception", about one run in a hundred on a busy 2-core machine). Nothing is lost: every
    file the trainer writes is closed (checkpoints are fsynced) before this point."""
    if not torchrun_worker():
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to deliver
            pass
    os._exit(code)


def torchrun_worker(environ=None) -> bool:
    """Whether this process is one of several that torchrun started (WORLD_SIZE > 1).
    Read here rather than through distributed.context_from_env because this module, like
    config.py, imports no torch (distributed.py does at its top)."""
    environ = os.environ if environ is None else environ
    try:
        return int(environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False
