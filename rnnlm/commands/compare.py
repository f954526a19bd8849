"""`rnnlm compare` (and compare.py): train variants of one config and tabulate them."""

from __future__ import annotations

import argparse
import sys

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
                        help="stop a run after this long (it saves last.pt and is reported "
                             "as failed; --resume continues it)")
    rerun = parser.add_mutually_exclusive_group()
    rerun.add_argument("--overwrite", action="store_true",
                       help="out_dir holds an earlier comparison: start all its runs over")
    rerun.add_argument("--resume", action="store_true",
                       help="out_dir holds an earlier comparison: keep its finished runs, "
                            "continue those with a last.pt, train the missing ones")


def run(args: argparse.Namespace) -> int:
    from rnnlm.tools.compare import compare, parse_seeds

    rerun = "overwrite" if args.overwrite else "resume" if args.resume else None
    try:
        _, results = compare(args.config, args.vary, parse_seeds(args.seeds), args.set,
                             timeout=args.timeout, command=args.invocation.line, rerun=rerun)
    except KeyboardInterrupt:  # the run in progress has saved its last.pt (tools.compare)
        again = args.invocation.line.replace(" --overwrite", "")
        again += "" if args.resume else " --resume"
        print(f"interrupted: no tables written; continue with: {again}", file=sys.stderr)
        return 130
    return 1 if any(r.error for r in results) else 0  # a failed run is not a success
