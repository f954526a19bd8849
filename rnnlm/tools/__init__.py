"""Tools around training: the speed benchmark against the D2L reference (bench.py), the data
preparation benchmark (bench_data.py) and the comparison of config variants (compare.py).

May import everything below the commands (rnnlm.training included); only the commands import
it.
"""
