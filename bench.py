"""Benchmark the book presets against the D2L reference: python bench.py [--help]."""

from rnnlm.bench import main
from rnnlm.cli import run_main

if __name__ == "__main__":
    run_main(main)
