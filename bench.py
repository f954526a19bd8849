"""Benchmark the book presets against the D2L reference: python bench.py [--help]; time
training commands to a held-out target: python bench.py speedrun [--help]; recall after a gap
of K characters per model kind: python bench.py probe [--help] (the `rnnlm bench` command; its
code is rnnlm/commands/bench.py, the benchmarks rnnlm/tools/bench.py, rnnlm/tools/speedrun.py
and rnnlm/tools/probe.py)."""

from rnnlm.cli import run_main, script_main

main = script_main("bench")

if __name__ == "__main__":
    run_main(main)
