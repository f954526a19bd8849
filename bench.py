"""Benchmark the book presets against the D2L reference: python bench.py [--help]."""

import sys

from rnnlm.bench import main

if __name__ == "__main__":
    sys.exit(main())
