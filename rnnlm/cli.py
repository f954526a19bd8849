"""The `rnnlm` console command and what every entry point shares.

`main` builds the `rnnlm` parser from the command modules of rnnlm.commands (one
subcommand each) and runs the one asked for; `script_main` gives the top-level scripts
(train.py, sample.py, ...) the same commands under their old names. `run_main` turns user
errors into one line on stderr and exit code 2, and `leave` is how a torchrun worker exits.
Nothing here imports torch, so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from rnnlm import __version__
from rnnlm.commands import COMMANDS, Invocation, command, configure, run_parsed, run_script
from rnnlm.errors import ConfigError

DESCRIPTION = "Character-level recurrent language models, trained the D2L chapter-8 way."
EPILOG = """Each command has its own options: {prog} COMMAND --help. The scripts train.py,
sample.py, evaluate.py, compare.py, diagnose.py and bench.py run the same commands."""


def build_parser(prog: str = "rnnlm") -> argparse.ArgumentParser:
    """The `rnnlm` parser: one subparser per command, which it keeps as the default of
    `_parser` (for the usage errors that the command finds after parsing)."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                     epilog=EPILOG.format(prog=prog))
    parser.add_argument("--version", action="version", version=f"rnnlm {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command",
                                     required=True)
    for name in COMMANDS:
        module = command(name)
        sub = commands.add_parser(name, help=module.SUMMARY)
        configure(sub, module, Invocation.console(prog, name))
        sub.set_defaults(_parser=sub)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "rnnlm") -> None:
    """The `rnnlm` command: `rnnlm COMMAND [options]`, `prog` naming it in help texts and
    hints ("rnnlm", or "python -m rnnlm"). Exits with the command's code."""
    argv = sys.argv[1:] if argv is None else list(argv)

    def run() -> int:
        args = build_parser(prog).parse_args(argv)  # exits on --help, --version, bad usage
        # Only --help and --version may come before the command: it is the first argument.
        rest = argv[argv.index(args.command) + 1:]
        return run_parsed(args._parser, command(args.command), args,
                          Invocation.console(prog, args.command, rest))

    run_main(run)


def script_main(name: str) -> Callable[..., int]:
    """`main(argv=None) -> int` of the top-level script `name`.py (argv: default the
    process's arguments). A ConfigError propagates: run it through run_main."""

    def main(argv: Sequence[str] | None = None) -> int:
        return run_script(name, argv)

    main.__doc__ = f"The {name} command run as {name}.py; see rnnlm.commands.{name}."
    return main


def run_main(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except BrokenPipeError:  # e.g. `python sample.py ... | head`
        code = 0
    except KeyboardInterrupt:  # Ctrl-C before a command's own handler is in place
        print("interrupted; nothing was saved", file=sys.stderr)
        code = 130
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
    rnnlm.config, imports no torch (distributed.py does at its top)."""
    environ = os.environ if environ is None else environ
    try:
        return int(environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False
