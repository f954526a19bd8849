"""TorchScript for the hand-written recurrent loops, compiled when their module is imported.

A window's loop is T small steps of a few ops each. Run from Python, every op pays the
interpreter's dispatch and holds the GIL between ops, so two batch shards on two threads
(`rnnlm.training.step`) mostly wait for each other. A TorchScript function runs the whole loop in
C++ with the GIL released: the shards then truly run side by side, one per core, and each op
costs less. The loops use only `out=` and in-place ops, which TorchScript runs as written (no
fusion), so the numbers are the same as the Python loop's, bit for bit.

torch 2.13 marks torch.jit.script deprecated in favour of torch.compile. We keep it here on
purpose: torch.compile needs 45-95 s to compile these models cold on the 2-core CPU, and its
generated code calls the kernels from Python (GIL held between them), so it is no way to run
shards side by side (docs/benchmarks.md). TorchScript compiles the loops in about 40 ms.
The warning is silenced for these calls only, and a torch without torch.jit.script runs the
plain Python loop (same results, slower).
"""

from __future__ import annotations

import functools
import warnings

import torch


def scripted(fn):
    """`fn` compiled with torch.jit.script, for calls on CPU tensors. Compiled right away,
    when its module is imported (about 40 ms for all the loops): TorchScript reads the
    function's source file when it compiles, and a run that compiled later would pick up
    whatever that file holds by then. On a GPU the plain function runs: its kernels are
    queued asynchronously anyway, CUDA graphs (train.cuda_graphs) remove the launch cost, and
    the graph capture should not meet TorchScript's profiling runs. The first argument must
    be a tensor."""
    compiled = _script(fn)

    @functools.wraps(fn)
    def call(*args):
        if args[0].device.type != "cpu":
            return fn(*args)
        return compiled(*args)

    call.python = fn  # the plain function, for tests and for reading
    return call


def _script(fn):
    script = getattr(torch.jit, "script", None)
    if script is None:
        return fn
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated",
                                category=DeprecationWarning)
        return script(fn)
