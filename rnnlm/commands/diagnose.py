"""`rnnlm diagnose` (and diagnose.py): gradient-flow measurements of a checkpoint, and the
figures drawn from diagnosed runs."""

from __future__ import annotations

import argparse

SUMMARY = "gradient-flow diagnostics of a checkpoint; figures of runs"
DESCRIPTION = """\
Gradient-flow diagnostics: measure a checkpoint, or draw figures from diagnosed runs.

  {prog} --checkpoint out_dir/last.pt [--out DIR] [--set key=value ...]
  {prog} --figure gradients|eigenvalues|lambdas|truncation --runs DIR [DIR ...] --out PNG

lambdas: the eigenvalues over training, coloured by epoch, on the unit disk (for the LRU all
its lambdas; for minGRU and minLSTM, whose coefficient depends on the input, each channel's
mean over held-out text, with histograms of |a_t|).
"""
FORMATTER = argparse.RawDescriptionHelpFormatter
FIGURES = ("gradients", "eigenvalues", "lambdas", "truncation")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="PATH",
                      help="measure this checkpoint: ||dL/dh_t|| against distance, the "
                           "eigenvalues of W_hh, the truncation pattern")
    what.add_argument("--figure", choices=FIGURES,
                      help="draw runs trained with train.diagnostics=true side by side")
    parser.add_argument("--runs", nargs="+", metavar="DIR", help="run folders for --figure")
    parser.add_argument("--out", help="--checkpoint: output folder (default: "
                                      "diagnose-NAME beside it); --figure: the PNG to write")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="--checkpoint: override its config, e.g. data.data_dir=data")


def run(args: argparse.Namespace) -> int:
    from rnnlm.errors import ConfigError

    if args.checkpoint:
        if args.runs:
            raise ConfigError("--runs goes with --figure, not --checkpoint")
        from rnnlm.diagnostics.report import diagnose_checkpoint, format_record

        plot, record = diagnose_checkpoint(args.checkpoint, args.out, args.set)
        print(format_record(record))
        print(f"wrote {plot} and {plot.with_name('diagnostics.json')}")
        return 0
    if not args.runs or not args.out:
        raise ConfigError(f"--figure {args.figure} needs --runs DIR [DIR ...] and --out FILE.png")
    if not args.out.lower().endswith(".png"):
        raise ConfigError(f"--out {args.out} must name a .png file")
    from rnnlm.diagnostics import plots

    runs = [plots.load_run(folder) for folder in args.runs]
    draw = {"gradients": plots.plot_gradient_norms, "eigenvalues": plots.plot_eigenvalues,
            "lambdas": plots.plot_lambdas,
            "truncation": plots.plot_truncation_patterns}[args.figure]
    print(f"wrote {draw(runs, args.out)}")
    return 0
