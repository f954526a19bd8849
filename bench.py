"""Benchmark the book presets against the D2L reference: python bench.py [--help]."""

from rnnlm.cli import run_main
from rnnlm.tools.bench import main

if __name__ == "__main__":
    run_main(main)
