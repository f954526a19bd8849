"""`rnnlm compare` (and compare.py): train variants of one config and tabulate them."""

from __future__ import annotations

import argparse

SUMMARY = "train variants of one config and tabulate them"
DESCRIPTION = "Compare variants of one config: {prog} --config FILE --vary KEY=V1,V2 [...]."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/lstm.yaml")
    parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                        help="values to compare for one key (repeatable: every combination)")
    parser.add_argument("--seeds", default="1", metavar="N",
                        help="runs per variant, with seeds seed .. seed+N-1 (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for every variant (repeatable)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up on a run after this long (it is reported as failed)")


def run(args: argparse.Namespace) -> int:
    from rnnlm.tools.compare import compare, parse_seeds

    _, results = compare(args.config, args.vary, parse_seeds(args.seeds), args.set,
                         timeout=args.timeout, command=args.invocation.line)
    return 0 if any(r.error is None for r in results) else 1
