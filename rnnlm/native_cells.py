"""LSTM and GRU window loops that do each step's elementwise work in one C call.

`rnnlm/native/cells.c` fuses what a step does besides its recurrent matmul (gate
nonlinearities, state update, gate derivatives) into one pass over memory. It is compiled on
first use with the system's C compiler (`cc`, well under a second) into a cache folder
(RNNLM_NATIVE_CACHE, default ~/.cache/rnnlm/native), keyed by the source, the flags and the
machine, and loaded with ctypes, which releases the GIL for each call: two batch shards on
two threads still run side by side. Without a compiler `available()` is False and the
TorchScript loops of gated_bptt run instead (model.cell_kernel says which may be used).

The forward loops return what gated_bptt's loops return, so either feeds the same autograd
Function; the backward loops also compute each gate's derivative factors step by step, which
gated_bptt does for the whole window in separate tensor ops (memory-bound passes over
(T, B, H) arrays that cost the GRU as much as its matmuls). They take float32 CPU tensors and
no randomized-truncation xi. Results match the TorchScript loops to float32 rounding (cells.c
computes exp itself, to ~1e-7 relative error): tests/test_native_cells.py.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native") / "cells.c"
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno")
_F32 = 4  # bytes per float32


class NativeUnavailable(RuntimeError):
    """The C kernels could not be built or loaded here (no compiler, failed build)."""


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "rnnlm" / "native"
    return Path(os.environ.get("RNNLM_NATIVE_CACHE", default))


def find_compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


@functools.cache
def _load() -> ctypes.CDLL | str:
    """The loaded library, or why there is none (a one-line reason)."""
    compiler = find_compiler()
    if compiler is None:
        return "no C compiler found (set CC or install gcc)"
    source = SOURCE.read_bytes()
    key = hashlib.sha1(source + " ".join((compiler, *FLAGS, platform.machine(),
                                          platform.node())).encode()).hexdigest()[:16]
    target = cache_dir() / f"cells-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Build beside the target and rename: parallel processes never load half a file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            result = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                os.unlink(tmp)
                first = (result.stderr.strip().splitlines() or ["no message"])[0]
                return f"building {SOURCE.name} failed: {first}"
            os.replace(tmp, target)
        except OSError as e:
            return f"cannot build {SOURCE.name} in {target.parent}: {e}"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return f"cannot load {target}: {e}"
    # each step function: that many buffer pointers, then B and H
    for name, buffers in (("lstm_forward_step", 5), ("lstm_backward_step", 6),
                          ("gru_forward_step", 6), ("gru_backward_step", 9)):
        step = getattr(lib, name)
        step.argtypes = [ctypes.c_void_p] * buffers + [ctypes.c_int64] * 2
        step.restype = None
    return lib


def available() -> bool:
    return not isinstance(_load(), str)


def library() -> ctypes.CDLL:
    lib = _load()
    if isinstance(lib, str):
        raise NativeUnavailable(lib)
    return lib


def unavailable_reason() -> str | None:
    lib = _load()
    return lib if isinstance(lib, str) else None


def usable_for(kernel: str, like: torch.Tensor, xi) -> bool:
    """Whether a window with this model.cell_kernel setting runs the C loops: float32 on a
    CPU without randomized truncation, where the library could be built. "c" differs from
    "auto" before training, not here: the trainer refuses a "c" run whose windows could not
    use it (trainer.check_cell_kernel, config.validate); evaluation or sampling elsewhere (a
    checkpoint sampled on a GPU) runs the tensor ops."""
    fits = like.device.type == "cpu" and like.dtype == torch.float32 and xi is None
    return kernel != "torch" and fits and available()


def lstm_forward_loop(xw: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                      W_hh: torch.Tensor):
    """As gated_bptt._lstm_forward_loop: [h0..hT], [c0..cT], gate activations, tanh(c_t)."""
    step = library().lstm_forward_step
    T, B, G = xw.shape
    H = G // 4
    W_t = W_hh.t().contiguous()
    hbuf, cbuf = xw.new_empty((T + 1, B, H)), xw.new_empty((T + 1, B, H))
    # The pre-activations start as xw, copied once; each step adds h W_hh^T in place (no
    # per-step copy of its xw slice) and the kernel turns them into gate activations.
    acts, tanh_c = xw.clone(memory_format=torch.contiguous_format), xw.new_empty((T, B, H))
    hbuf[0].copy_(h0)
    cbuf[0].copy_(c0)
    hs, gates = hbuf.unbind(0), acts.unbind(0)
    a, c, tc, h = (x.data_ptr() for x in (acts, cbuf, tanh_c, hbuf))
    da, dh = B * G * _F32, B * H * _F32  # bytes per step
    for t in range(T):
        gates[t].addmm_(hs[t], W_t)
        step(a + t * da, c + t * dh, c + (t + 1) * dh, tc + t * dh, h + (t + 1) * dh, B, H)
    return hbuf, cbuf, acts, tanh_c


def lstm_backward_loop(dhs: torch.Tensor, dc: torch.Tensor, hbuf: torch.Tensor,
                       cbuf: torch.Tensor, acts: torch.Tensor, tanh_c: torch.Tensor,
                       W_hh: torch.Tensor):
    """As gated_bptt._lstm_backward_loop without xi: d gates (T, B, 4H) and dL/dc_0."""
    step = library().lstm_backward_step
    T, B, G = acts.shape
    H = G // 4
    dc = dc.contiguous()
    dgates = torch.empty_like(acts)
    dh = dhs.clone(memory_format=torch.contiguous_format)  # dhs_t, then += dgates_{t+1} W_hh
    dgs, dh_l = dgates.unbind(0), dh.unbind(0)
    p_dh, p_dc, a, c, tc, dg = (x.data_ptr() for x in (dh, dc, acts, cbuf, tanh_c, dgates))
    da, dstate = B * G * _F32, B * H * _F32
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            dh_l[t].addmm_(dgs[t + 1], W_hh)
        step(p_dh + t * dstate, p_dc, a + t * da, c + t * dstate, tc + t * dstate,
             dg + t * da, B, H)
    return dgates, dc


def gru_forward_loop(xw: torch.Tensor, h0: torch.Tensor, W_hh: torch.Tensor,
                     b_hh: torch.Tensor):
    """As gated_bptt._gru_forward_loop: [h0..hT], W_hh h_{t-1} + b_hh, r|z, n."""
    step = library().gru_forward_step
    T, B, G = xw.shape
    H = G // 3
    xw = xw.contiguous()
    W_t = W_hh.t().contiguous()
    hbuf, gh = xw.new_empty((T + 1, B, H)), xw.new_empty((T, B, G))
    rz, n = xw.new_empty((T, B, 2 * H)), xw.new_empty((T, B, H))
    hbuf[0].copy_(h0)
    gh.copy_(b_hh)  # every step's b_hh at once; the steps add h W_hh^T in place
    hs, ghs = hbuf.unbind(0), gh.unbind(0)
    x, g, h, r, nn_ = (t.data_ptr() for t in (xw, gh, hbuf, rz, n))
    dg, dh = B * G * _F32, B * H * _F32
    for t in range(T):
        ghs[t].addmm_(hs[t], W_t)
        step(x + t * dg, g + t * dg, h + t * dh, r + t * 2 * dh, nn_ + t * dh,
             h + (t + 1) * dh, B, H)
    return hbuf, gh, rz, n


def gru_backward_loop(dhs: torch.Tensor, hbuf: torch.Tensor, gh: torch.Tensor,
                      rz: torch.Tensor, n: torch.Tensor, W_hh: torch.Tensor):
    """Backward through a GRU window from its forward buffers: d(x W_ih^T + b_ih) and
    d(W_hh h + b_hh) (T, B, 3H), and dL/dh_t (T, B, H) for every step."""
    step = library().gru_backward_step
    T, B, H = dhs.shape
    dxw, dgh = hbuf.new_empty((T, B, 3 * H)), hbuf.new_empty((T, B, 3 * H))
    dh_all = dhs.clone(memory_format=torch.contiguous_format)  # dhs_t, then the rest added
    dghs, dh_l = dgh.unbind(0), dh_all.unbind(0)
    p_dh, p_rz, p_n, p_gh, p_h, p_dgh, p_dxw = (
        x.data_ptr() for x in (dh_all, rz, n, gh, hbuf, dgh, dxw))
    d3, d2, d1 = B * 3 * H * _F32, B * 2 * H * _F32, B * H * _F32
    for t in range(T - 1, -1, -1):
        if t == T - 1:
            dh_next = rz_next = None  # nothing flows back from beyond the window
        else:  # dhs_t + dgh_{t+1} W_hh; the kernel adds z_{t+1} dh_{t+1}
            dh_l[t].addmm_(dghs[t + 1], W_hh)
            dh_next, rz_next = p_dh + (t + 1) * d1, p_rz + (t + 1) * d2
        step(p_dh + t * d1, dh_next, rz_next, p_rz + t * d2, p_n + t * d1, p_gh + t * d3,
             p_h + t * d1, p_dgh + t * d3, p_dxw + t * d3, B, H)
    return dxw, dgh, dh_all
