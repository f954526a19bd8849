"""RNN, LSTM and GRU window loops in C: each step's elementwise work in one call, and, where
PyTorch's MKL can be reached, the whole loop with its recurrent matmuls.

`rnnlm/kernels/cells.c` fuses what a gated step does besides its recurrent matmul (gate
nonlinearities, state update, gate derivatives) into one pass over memory. It is compiled on
first use with the system's C compiler (`cc`, well under a second) into a cache folder
(RNNLM_NATIVE_CACHE, default ~/.cache/rnnlm/native), keyed by the source, the flags and the
machine, and loaded with ctypes, which releases the GIL for each call: two batch shards on
two threads still run side by side. Without a compiler `available()` is False and the
TorchScript loops of rnnlm.bptt run instead (model.cell_kernel says which may be used).

The forward loops return what rnnlm.bptt's loops return, so either feeds the same autograd
Function; the backward loops also compute each gate's derivative factors step by step, which
rnnlm.bptt does for the whole window in separate tensor ops (memory-bound passes over
(T, B, H) arrays that cost the GRU as much as its matmuls). They take float32 CPU tensors and
no randomized-truncation xi. Results match the TorchScript loops to float32 rounding (cells.c
computes exp itself, to ~1e-7 relative error): tests/kernels/test_native.py.

Whole windows (`windows_available()`): the step loop itself also runs in C, calling the
single-precision GEMM of the MKL inside PyTorch's x86-64 builds, whose entry points are
looked up in the loaded torch library and handed to cells.c at load (no link step, no new
dependency). That removes two Python dispatches per step and lets the forward product use a
weight matrix packed once per window; measured on the 2-core CPU at the book presets'
half-batch shapes (one thread, 35 steps): LSTM forward 6.2 -> 5.3 ms and backward 4.3 -> 3.7,
GRU 3.9 -> 3.5 and 3.5 -> 2.9, RNN (h512) 4.3 -> 3.9 and 3.6 -> 2.9. Where the symbols are
missing (another BLAS, another OS) the per-step loops below run instead; the scratch RNN,
which has no elementwise kernel of its own, then keeps its TorchScript loop.

bf16 products (train.precision: bf16 on a CPU, `bf16_products`): the whole-window loops can
also hand each step's product to MKL's gemm_bf16bf16f32, with the left-hand side rounded to
bf16 into a buffer first and the weights converted once per window; the state, the cells and
the sums stay float32 (tests/kernels/test_bf16_products.py writes that definition out).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cells.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno")
# Tried first, dropped if the compiler refuses them. x86: let the loops use 512-bit vectors
# where the CPU has them (GCC and Clang default to 256 bits); the LSTM forward step measured
# 23 -> 17 us at 16 x 256.
OPTIONAL_FLAGS = ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") \
    else ()
_F32 = 4  # bytes per float32


class NativeUnavailable(RuntimeError):
    """The C kernels could not be built or loaded here (no compiler, failed build)."""


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "rnnlm" / "native"
    return Path(os.environ.get("RNNLM_NATIVE_CACHE", default))


def find_compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _build(compiler: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile SOURCE into target; None, or why it failed (one line)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: parallel processes never load half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        result = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            os.unlink(tmp)
            first = (result.stderr.strip().splitlines() or ["no message"])[0]
            return f"building {SOURCE.name} failed: {first}"
        os.replace(tmp, target)
    except OSError as e:
        return f"cannot build {SOURCE.name} in {target.parent}: {e}"
    return None


@functools.cache
def _load() -> ctypes.CDLL | str:
    """The loaded library, or why there is none (a one-line reason)."""
    compiler = find_compiler()
    if compiler is None:
        return "no C compiler found (set CC or install gcc)"
    source = SOURCE.read_bytes()
    key = hashlib.sha1(source + " ".join((compiler, *FLAGS, *OPTIONAL_FLAGS, platform.machine(),
                                          platform.node())).encode()).hexdigest()[:16]
    target = cache_dir() / f"cells-{key}.so"
    if not target.exists():
        failure = _build(compiler, (*FLAGS, *OPTIONAL_FLAGS), target)
        if failure and OPTIONAL_FLAGS:
            failure = _build(compiler, FLAGS, target)
        if failure:
            return failure
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return f"cannot load {target}: {e}"
    # each step function: that many buffer pointers, then B and H; each window function:
    # that many buffer pointers, then T, B, H (and the RNN's tanh flag)
    for name, buffers, sizes in (("lstm_forward_step", 5, 2), ("lstm_backward_step", 6, 2),
                                 ("gru_forward_step", 6, 2), ("gru_backward_step", 9, 2),
                                 ("lstm_forward_window", 6, 3), ("lstm_backward_window", 8, 3),
                                 ("gru_forward_window", 7, 3), ("gru_backward_window", 9, 3),
                                 ("rnn_forward_window", 3, 4), ("rnn_backward_window", 4, 4)):
        function = getattr(lib, name)
        function.argtypes = [ctypes.c_void_p] * buffers + [ctypes.c_int64] * sizes
        function.restype = None
    lib.recurrent_products.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 4
    lib.recurrent_products.restype = None
    lib.set_blas.argtypes = [ctypes.c_void_p] * 4
    lib.set_blas_bf16.argtypes = [ctypes.c_void_p]
    lib.packed_size.argtypes = [ctypes.c_int] * 3
    lib.packed_size.restype = ctypes.c_size_t
    lib.pack_transposed_rhs.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 3
    return lib


# The MKL entry points the window loops call (cells.c, "Whole windows in C"): PyTorch's
# x86-64 Linux builds link MKL statically into libtorch_cpu and export these symbols.
BLAS_SYMBOLS = ("sgemm_", "cblas_sgemm_pack_get_size", "cblas_sgemm_pack", "cblas_sgemm_compute")
#: and the one for bf16 products (train.precision: bf16), in MKL since 2020
BF16_SYMBOL = "gemm_bf16bf16f32"


def torch_library() -> Path:
    name = {"Darwin": "libtorch_cpu.dylib", "Windows": "torch_cpu.dll"}.get(
        platform.system(), "libtorch_cpu.so")
    return Path(torch.__file__).parent / "lib" / name


_SETUP = threading.Lock()  # the first windows may start on two batch-shard threads at once


@functools.cache
def _window_blas() -> bool | str:
    """True when the C window loops can run (the kernels built and torch's MKL found and
    handed to them), else why not."""
    with _SETUP:
        return _find_blas()


def _find_blas() -> bool | str:
    lib = _load()
    if isinstance(lib, str):
        return lib
    try:
        torch_lib = ctypes.CDLL(str(torch_library()))  # already loaded: the same handle
        addresses = [ctypes.cast(getattr(torch_lib, name), ctypes.c_void_p)
                     for name in BLAS_SYMBOLS]
    except (OSError, AttributeError) as e:
        return f"no MKL sgemm in this PyTorch build ({e})"
    lib.set_blas(*addresses)
    global _BF16_PRODUCTS
    bf16 = getattr(torch_lib, BF16_SYMBOL, None)
    if bf16 is not None:
        lib.set_blas_bf16(ctypes.cast(bf16, ctypes.c_void_p))
    _BF16_PRODUCTS = bf16 is not None
    return True


_BF16_PRODUCTS = False  # set by _find_blas: MKL's bf16 GEMM was found


@functools.cache
def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX-512 BF16 or AMX tiles), where bf16
    products beat float32 ones; elsewhere MKL and oneDNN emulate them, slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def bf16_products(like: torch.Tensor) -> bool:
    """Whether a window's recurrent products run in bf16: under bf16 autocast on a CPU
    (train.precision: bf16), where the C windows found MKL's bf16 GEMM. The products take
    bf16 operands and accumulate in float32, as autocast's matmuls do; the state, the
    cells and the sums stay float32."""
    return (like.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and windows_available() and _BF16_PRODUCTS)


def window_unavailable_reason() -> str | None:
    ready = _window_blas()
    return None if ready is True else ready


def windows_available() -> bool:
    """Whether whole windows run in C (BLAS called from C), not only each step's cell."""
    return _window_blas() is True


def window_library() -> ctypes.CDLL:
    """The library with its BLAS entry points set (raises NativeUnavailable without them)."""
    ready = _window_blas()
    if ready is not True:
        raise NativeUnavailable(ready)
    return library()


def _ptr(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


def _packed_transpose(W: torch.Tensor, rows: int) -> torch.Tensor:
    """W^T (k, n) for W (n, k) in MKL's packed layout, for products with `rows` rows."""
    lib = window_library()
    W = W.contiguous()
    n, k = W.shape
    packed = torch.empty(lib.packed_size(rows, k, n), dtype=torch.uint8)
    lib.pack_transposed_rhs(_ptr(W), _ptr(packed), rows, k, n)
    return packed


@contextlib.contextmanager
def float32_window(xw: torch.Tensor):
    """A hand-written window under bf16 autocast: autocast off inside it and its input
    projection back in float32, so the window computes in float32 like the rest of the
    state; `with ... as (xw, bf16)` also gives whether its recurrent products run in bf16
    (bf16_products, asked before autocast is turned off)."""
    bf16 = bf16_products(xw)
    with torch.autocast(xw.device.type, enabled=False):
        yield (xw.float() if xw.dtype in (torch.bfloat16, torch.float16) else xw), bf16


def window_outer_sum(d: torch.Tensor, h: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """sum_t d_t^T h_t over a window's steps (T, B, G) and (T, B, H): a weight gradient
    (G, H) as one GEMM, far faster than T small ones; bf16: with bf16 operands (2.6x faster
    for the scratch RNN's (512, 1120) x (1120, 512) on two cores), as autocast computes the
    weight gradients of its own matmuls."""
    T, B, G = d.shape
    d, h = d.reshape(T * B, G), h.reshape(T * B, -1)
    if bf16:
        return (d.to(torch.bfloat16).t() @ h.to(torch.bfloat16)).float()
    return d.t() @ h


def _forward_rhs(W: torch.Tensor, rows: int,
                 bf16: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward products' right-hand side W^T for W (n, k), and the bf16 buffer for their
    left-hand side (None: float32, packed): both must outlive the C call."""
    if not bf16:
        return _packed_transpose(W, rows), None
    return W.t().contiguous().to(torch.bfloat16), W.new_empty(rows * W.shape[1],
                                                              dtype=torch.bfloat16)


def _backward_rhs(W: torch.Tensor, rows: int,
                  bf16: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backward products' right-hand side W (n, k) as is, and the bf16 left-hand buffer."""
    if not bf16:
        return W.contiguous(), None
    return W.contiguous().to(torch.bfloat16), W.new_empty(rows * W.shape[0],
                                                          dtype=torch.bfloat16)


def _optional_ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def forget() -> None:
    """Drop what was found at load (tests that change what can be found call it)."""
    _load.cache_clear()
    _window_blas.cache_clear()


def available() -> bool:
    return not isinstance(_load(), str)


def library() -> ctypes.CDLL:
    lib = _load()
    if isinstance(lib, str):
        raise NativeUnavailable(lib)
    return lib


def unavailable_reason(whole_windows: bool = False) -> str | None:
    """Why the C kernels cannot run here (None: they can). whole_windows: the caller has
    only the whole-window loops (the scratch RNN, which has no per-step kernel)."""
    lib = _load()
    if isinstance(lib, str):
        return lib
    return window_unavailable_reason() if whole_windows else None


def usable_for(kernel: str, like: torch.Tensor, xi, whole_windows: bool = False) -> bool:
    """Whether a window with this model.cell_kernel setting runs the C loops: float32 on a
    CPU without randomized truncation, where the library could be built (and, with
    whole_windows, where the window loops can run). "c" differs from "auto" before training,
    not here: the trainer refuses a "c" run whose windows could not use it
    (rnnlm.config.checks); evaluation or sampling elsewhere (a
    checkpoint sampled on a GPU) runs the tensor ops."""
    fits = like.device.type == "cpu" and like.dtype == torch.float32 and xi is None
    return kernel != "torch" and fits and unavailable_reason(whole_windows) is None


def _whole(whole_window: bool | None) -> bool:
    """A loop's whole_window argument: None means wherever windows_available()."""
    return windows_available() if whole_window is None else whole_window


def lstm_forward_loop(xw: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                      W_hh: torch.Tensor, whole_window: bool | None = None,
                      bf16: bool = False):
    """As gated._lstm_forward_loop: [h0..hT], [c0..cT], gate activations, tanh(c_t).
    whole_window: the loop in C (default where windows_available()) or in Python; bf16: its
    recurrent products in bf16 (bf16_products; whole windows only)."""
    T, B, G = xw.shape
    H = G // 4
    hbuf, cbuf = xw.new_empty((T + 1, B, H)), xw.new_empty((T + 1, B, H))
    # The pre-activations start as xw, copied once; each step adds h W_hh^T in place (no
    # per-step copy of its xw slice) and the kernel turns them into gate activations.
    acts, tanh_c = xw.clone(memory_format=torch.contiguous_format), xw.new_empty((T, B, H))
    hbuf[0].copy_(h0)
    cbuf[0].copy_(c0)
    if _whole(whole_window):
        rhs, lhs = _forward_rhs(W_hh, B, bf16)  # referenced here: they outlive the call
        window_library().lstm_forward_window(_ptr(rhs), _optional_ptr(lhs), _ptr(acts),
                                             _ptr(hbuf), _ptr(cbuf), _ptr(tanh_c), T, B, H)
        return hbuf, cbuf, acts, tanh_c
    W_t = W_hh.t().contiguous()
    step = library().lstm_forward_step
    hs, gates = hbuf.unbind(0), acts.unbind(0)
    a, c, tc, h = (x.data_ptr() for x in (acts, cbuf, tanh_c, hbuf))
    da, dh = B * G * _F32, B * H * _F32  # bytes per step
    for t in range(T):
        gates[t].addmm_(hs[t], W_t)
        step(a + t * da, c + t * dh, c + (t + 1) * dh, tc + t * dh, h + (t + 1) * dh, B, H)
    return hbuf, cbuf, acts, tanh_c


def lstm_backward_loop(dhs: torch.Tensor, dc: torch.Tensor, hbuf: torch.Tensor,
                       cbuf: torch.Tensor, acts: torch.Tensor, tanh_c: torch.Tensor,
                       W_hh: torch.Tensor, whole_window: bool | None = None,
                       bf16: bool = False):
    """As gated._lstm_backward_loop without xi: d gates (T, B, 4H) and dL/dc_0."""
    T, B, G = acts.shape
    H = G // 4
    dc = dc.contiguous()
    dgates = torch.empty_like(acts)
    dh = dhs.clone(memory_format=torch.contiguous_format)  # dhs_t, then += dgates_{t+1} W_hh
    if _whole(whole_window):
        rhs, lhs = _backward_rhs(W_hh, B, bf16)
        window_library().lstm_backward_window(_ptr(rhs), _optional_ptr(lhs), _ptr(dh),
                                              _ptr(dc), _ptr(acts), _ptr(cbuf), _ptr(tanh_c),
                                              _ptr(dgates), T, B, H)
        return dgates, dc
    step = library().lstm_backward_step
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
                     b_hh: torch.Tensor, whole_window: bool | None = None,
                     bf16: bool = False):
    """As gated._gru_forward_loop: [h0..hT], W_hh h_{t-1} + b_hh, r|z, n (bf16 as for
    lstm_forward_loop)."""
    T, B, G = xw.shape
    H = G // 3
    xw = xw.contiguous()
    hbuf, gh = xw.new_empty((T + 1, B, H)), xw.new_empty((T, B, G))
    rz, n = xw.new_empty((T, B, 2 * H)), xw.new_empty((T, B, H))
    hbuf[0].copy_(h0)
    gh.copy_(b_hh)  # every step's b_hh at once; the steps add h W_hh^T in place
    if _whole(whole_window):
        rhs, lhs = _forward_rhs(W_hh, B, bf16)
        window_library().gru_forward_window(_ptr(rhs), _optional_ptr(lhs), _ptr(xw), _ptr(gh),
                                            _ptr(hbuf), _ptr(rz), _ptr(n), T, B, H)
        return hbuf, gh, rz, n
    W_t = W_hh.t().contiguous()
    step = library().gru_forward_step
    hs, ghs = hbuf.unbind(0), gh.unbind(0)
    x, g, h, r, nn_ = (t.data_ptr() for t in (xw, gh, hbuf, rz, n))
    dg, dh = B * G * _F32, B * H * _F32
    for t in range(T):
        ghs[t].addmm_(hs[t], W_t)
        step(x + t * dg, g + t * dg, h + t * dh, r + t * 2 * dh, nn_ + t * dh,
             h + (t + 1) * dh, B, H)
    return hbuf, gh, rz, n


def gru_backward_loop(dhs: torch.Tensor, hbuf: torch.Tensor, gh: torch.Tensor,
                      rz: torch.Tensor, n: torch.Tensor, W_hh: torch.Tensor,
                      whole_window: bool | None = None, bf16: bool = False):
    """Backward through a GRU window from its forward buffers: d(x W_ih^T + b_ih) and
    d(W_hh h + b_hh) (T, B, 3H), and dL/dh_t (T, B, H) for every step."""
    T, B, H = dhs.shape
    dxw, dgh = hbuf.new_empty((T, B, 3 * H)), hbuf.new_empty((T, B, 3 * H))
    dh_all = dhs.clone(memory_format=torch.contiguous_format)  # dhs_t, then the rest added
    if _whole(whole_window):
        rhs, lhs = _backward_rhs(W_hh, B, bf16)
        window_library().gru_backward_window(_ptr(rhs), _optional_ptr(lhs), _ptr(dh_all),
                                             _ptr(rz), _ptr(n), _ptr(gh), _ptr(hbuf), _ptr(dgh),
                                             _ptr(dxw), T, B, H)
        return dxw, dgh, dh_all
    step = library().gru_backward_step
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


def rnn_forward_loop(xw: torch.Tensor, h0: torch.Tensor, W_hh: torch.Tensor,
                     tanh: bool, bf16: bool = False) -> torch.Tensor:
    """As bptt._rnn_forward_loop, the whole window in C: [h0, h1, ..., hT] (T + 1, B, H)."""
    T, B, H = xw.shape
    buf = xw.new_empty((T + 1, B, H))
    buf[0].copy_(h0)
    buf[1:].copy_(xw)  # row t+1 starts as xw_t and becomes h_t
    rhs, lhs = _forward_rhs(W_hh, B, bf16)
    window_library().rnn_forward_window(_ptr(rhs), _optional_ptr(lhs), _ptr(buf), T, B, H,
                                        int(tanh))
    return buf


def rnn_backward_loop(buf: torch.Tensor, dhs: torch.Tensor, W_hh: torch.Tensor,
                      tanh: bool, bf16: bool = False) -> torch.Tensor:
    """As bptt._rnn_backward_loop without xi, in C: da_t for every step (T, B, H)."""
    T, B, H = dhs.shape
    dA = dhs.clone(memory_format=torch.contiguous_format)
    rhs, lhs = _backward_rhs(W_hh, B, bf16)
    buf = buf.contiguous()
    window_library().rnn_backward_window(_ptr(rhs), _optional_ptr(lhs), _ptr(dA), _ptr(buf[1]),
                                         T, B, H, int(tanh))
    return dA


def recurrent_products(h: torch.Tensor, W_hh: torch.Tensor, out_f: torch.Tensor,
                       dgates: torch.Tensor, out_b: torch.Tensor, steps: int,
                       bf16: bool = False) -> None:
    """`steps` times out_f += h @ W_hh^T and out_b += dgates @ W_hh, as the window loops
    compute them (W_hh (G, H) packed once, transposed; or bf16 products): the benchmark's
    roofline (bench.py)."""
    B, H = h.shape
    G = W_hh.shape[0]
    forward, lhs_f = _forward_rhs(W_hh, B, bf16)
    backward, lhs_b = _backward_rhs(W_hh, B, bf16)
    window_library().recurrent_products(_ptr(forward), _optional_ptr(lhs_f), _ptr(h),
                                        _ptr(out_f), _ptr(backward), _optional_ptr(lhs_b),
                                        _ptr(dgates), _ptr(out_b), steps, B, H, G)
