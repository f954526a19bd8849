"""Benchmark the book presets against the D2L reference: python bench.py [--help]; time
training commands to a held-out target: python bench.py speedrun [--help] (the `rnnlm bench`
command; its code is rnnlm/commands/bench.py, the benchmarks rnnlm/tools/bench.py and
rnnlm/tools/speedrun.py)."""

from rnnlm.cli import run_main, script_main

main = script_main("bench")

if __name__ == "__main__":
    run_main(main)
