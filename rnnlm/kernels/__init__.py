"""The engine under the equations: the recurrent window loops in C (native.py, cells.c,
calling PyTorch's BLAS) and their TorchScript twins (scripting.py). Same numbers as the
plain PyTorch loops, far fewer interpreter round trips.

Imports nothing of rnnlm: like torch itself, it sits below every other package. A reader
following the chapter can skip it.
"""
