"""Compare variants of one config: python compare.py --config FILE --vary KEY=V1,V2 [...]."""

import argparse

from rnnlm.cli import run_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/lstm.yaml")
    parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                        help="values to compare for one key (repeatable: every combination)")
    parser.add_argument("--seeds", default="1", metavar="N",
                        help="runs per variant, with seeds seed .. seed+N-1 (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for every variant (repeatable)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up on a run after this long (it is reported as failed)")
    args = parser.parse_args()

    from rnnlm.tools.compare import compare, parse_seeds  # after argparse, so --help is instant

    _, results = compare(args.config, args.vary, parse_seeds(args.seeds), args.set,
                         timeout=args.timeout)
    return 0 if any(r.error is None for r in results) else 1


if __name__ == "__main__":
    run_main(main)
