"""Tools around training: the speed benchmark against the D2L reference (bench.py), the data
preparation benchmark (bench_data.py), the time to a held-out target (speedrun.py), the
long-dependency probe (probe.py: recall after a gap of K characters, per model kind), the
comparison of config variants (compare.py) and the list of the book presets (presets.py, light
enough for `rnnlm bench --help`).

May import everything below the commands (rnnlm.training included); only the commands import
it.
"""
