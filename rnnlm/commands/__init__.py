"""The commands of `rnnlm` (train, sample, evaluate, compare, diagnose, bench), one module each.

Every module holds the whole of one command: SUMMARY (its line in `rnnlm --help`),
DESCRIPTION (its --help text, with the names of the commands left as {prog} and {train}),
an optional EPILOG (the end of its --help text, e.g. its exit codes),
`add_arguments(parser)`, an optional `check(args)` that returns a usage error for argparse
to print, and `run(args) -> int`. rnnlm.cli builds the `rnnlm` parser from them; the
top-level scripts (train.py, sample.py, ...) run the same modules under their old names.

A command module imports nothing at its top that loads torch (the standard library, and
rnnlm.tools.presets for bench's list); the rest of rnnlm is imported inside `run`, so that
`--help` answers at once. The commands
sit above everything else: they may import any part of rnnlm, and no part of rnnlm imports
them.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from types import ModuleType

COMMANDS = ("train", "sample", "evaluate", "compare", "diagnose", "bench")


@dataclass(frozen=True)
class Invocation:
    """How the user called a command, for its help text and for the commands it tells them
    to type next: the script form (`python train.py`) or the console form (`rnnlm train`)."""

    prog: str  # this command: "python train.py", "rnnlm train" or "python -m rnnlm train"
    train: str  # the train command as help texts name it: "train.py" or "rnnlm train"
    argv: tuple[str, ...] = ()  # the arguments after the command's name

    @classmethod
    def script(cls, name: str, argv=()) -> Invocation:
        return cls(f"python {name}.py", "train.py", tuple(argv))

    @classmethod
    def console(cls, cli: str, name: str, argv=()) -> Invocation:
        return cls(f"{cli} {name}", f"{cli} train", tuple(argv))

    @property
    def line(self) -> str:
        """The command line as typed (words joined by spaces)."""
        return " ".join([self.prog, *self.argv])


def command(name: str) -> ModuleType:
    """The module of command `name` (light: see the module docstring)."""
    return importlib.import_module(f"rnnlm.commands.{name}")


def configure(parser: argparse.ArgumentParser, module: ModuleType,
              invocation: Invocation) -> None:
    """Give `parser` the description and the options of `module`'s command."""
    parser.description = module.DESCRIPTION.format(prog=invocation.prog,
                                                   train=invocation.train)
    parser.formatter_class = getattr(module, "FORMATTER", argparse.HelpFormatter)
    if getattr(module, "EPILOG", None):  # e.g. the exit codes
        parser.epilog = module.EPILOG.format(prog=invocation.prog, train=invocation.train)
    module.add_arguments(parser)


def run_parsed(parser: argparse.ArgumentParser, module: ModuleType, args: argparse.Namespace,
               invocation: Invocation) -> int:
    """Run `module`'s command on the `args` that `parser` read (a usage error that only the
    command can see exits 2 through argparse). A ConfigError it raises is left to
    rnnlm.cli.run_main, which prints it as one line."""
    problem = module.check(args) if hasattr(module, "check") else None
    if problem:
        parser.error(problem)
    args.invocation = invocation
    return module.run(args)


def run_script(name: str, argv=None) -> int:
    """The top-level script `name`.py: command `name` parsed from `argv` (default: the
    process's arguments) under the script's own name, then run."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    module = command(name)
    parser = argparse.ArgumentParser()
    invocation = Invocation.script(name, argv)
    configure(parser, module, invocation)
    return run_parsed(parser, module, parser.parse_args(argv), invocation)
