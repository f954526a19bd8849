"""Benchmark the book presets against the D2L reference: python bench.py [--help] (the
`rnnlm bench` command; its code is rnnlm/commands/bench.py, the benchmark rnnlm/tools/bench.py)."""

from rnnlm.cli import run_main, script_main

main = script_main("bench")

if __name__ == "__main__":
    run_main(main)
