"""Train a character-level recurrent language model: python train.py --config FILE."""

import argparse

from rnnlm.cli import run_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/lstm.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=50 (repeatable)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar or per-epoch lines, only the final summary")
    args = parser.parse_args()

    from rnnlm.config import load_config  # after argparse, so --help is instant
    from rnnlm.trainer import train

    cfg = load_config(args.config, args.set)
    train(cfg, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    run_main(main)
