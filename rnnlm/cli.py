"""Shared command-line plumbing: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

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
    sys.exit(code or 0)
