"""Backpropagation through time for the from-scratch RNN, written by hand (D2L 8.7; the
derivation is in docs/bptt.md).

One recurrent layer over a window of T steps, time-major, torch.nn weight layout:

    a_t = xw_t + h_{t-1} @ W_hh.T,    h_t = phi(a_t),    phi = tanh or identity

where ``xw`` (T, B, H) is the input already projected for the whole window
(``x_t @ W_ih.T + b_ih + b_hh``, left to autograd by the caller) and h_0 the carried state.
Given g_t^out = dL/dh_t from everything above the layer (output layer, final state), the
backward pass is D2L 8.7's four steps (docs/bptt.md) with the nonlinearity's factor:

    g_T = g_T^out;   da_t = g_t * phi'(a_t);   g_{t-1} = g_{t-1}^out + xi_t * da_t @ W_hh
    dW_hh = sum_t da_t^T h_{t-1},   d xw = da,   d h_0 = xi_1 * da_1 @ W_hh

with phi'(a_t) = 1 - h_t^2 for tanh. ``xi`` is all ones for full / regular truncation and the
randomized-truncation multipliers of Tallec & Ollivier (2017) otherwise: xi_t = 1/pi with
probability pi, else 0, which keeps the gradient unbiased while cutting it at random depths.

Holds:
* ``ManualRNNWindow`` / ``manual_rnn_window``: the hand-written forward + backward (fast path;
  in float32 on a CPU its loops run in C where native.windows_available(), else the
  TorchScript loops below);
* ``autograd_rnn_window``: the same computation step by step with autograd (reference);
* ``scale_grad``: identity forward, gradient times a factor backward (randomized truncation
  for step-by-step models);
* ``sample_truncation_xi``: draws the xi vector;
* ``linear_closed_form_state_grads``: the closed-form sum of step 3 (docs/bptt.md) for
  phi = identity.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from rnnlm.kernels import native
from rnnlm.kernels.scripting import scripted

_ACTIVATIONS = ("tanh", "identity")


def _check_window(xw: torch.Tensor, h0: torch.Tensor, W_hh: torch.Tensor, activation: str,
                  xi: torch.Tensor | None) -> torch.Tensor | None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if xw.dim() != 3 or xw.shape[0] == 0:
        raise ValueError(f"xw must be (T, B, H) with T >= 1, got {tuple(xw.shape)}")
    T, B, H = xw.shape
    if tuple(h0.shape) != (B, H):
        raise ValueError(f"h0 must be {(B, H)}, got {tuple(h0.shape)}")
    if tuple(W_hh.shape) != (H, H):
        raise ValueError(f"W_hh must be {(H, H)}, got {tuple(W_hh.shape)}")
    if xi is None:
        return None
    if tuple(xi.shape) != (T,):
        raise ValueError(f"xi must be ({T},), got {tuple(xi.shape)}")
    # xi only scales gradients: it is a constant of the graph, never differentiated.
    return xi.detach().to(device=xw.device, dtype=xw.dtype)


@scripted
def _rnn_forward_loop(xw: torch.Tensor, h0: torch.Tensor, W_hh: torch.Tensor,
                      tanh: bool) -> torch.Tensor:
    """[h0, h1, ..., hT] (T + 1, B, H): step t reads buf[t] and writes buf[t+1], so the
    backward gets the stacked h_{t-1} = buf[:-1] for its single dW GEMM without a copy."""
    T, B, H = xw.shape[0], xw.shape[1], xw.shape[2]
    buf = xw.new_empty((T + 1, B, H))
    buf[0].copy_(h0)
    # h @ W^T through a transposed view is ~1.7x slower than through a contiguous (in, out)
    # matrix for these small-M products on MKL: one H x H copy per window pays for itself.
    W_t = W_hh.t().contiguous()
    for t in range(T):
        h = buf[t + 1]
        torch.addmm(xw[t], buf[t], W_t, out=h)
        if tanh:
            h.tanh_()
    return buf


@scripted
def _rnn_backward_loop(buf: torch.Tensor, dhs: torch.Tensor, W_hh: torch.Tensor, tanh: bool,
                       xi: torch.Tensor | None) -> torch.Tensor:
    """da_t for every step (T, B, H), which is also d xw."""
    hs = buf[1:]
    T, B, H = hs.shape[0], hs.shape[1], hs.shape[2]
    # dA doubles as the buffer for phi'(a_t): 1 - h_t^2 is computed for the whole window in
    # one vectorized op, then each step multiplies its slice in place by g_t.
    if tanh:
        dA = hs.square()
        dA.neg_().add_(1)
        dA[-1].mul_(dhs[-1])
    else:
        dA = torch.empty_like(hs)
        dA[-1].copy_(dhs[-1])
    g = hs.new_empty((B, H))  # g_t, reused at every step (tanh only)
    carry = hs.new_empty((B, H))  # da_{t+1} @ W_hh before the xi_{t+1} scaling
    for t in range(T - 2, -1, -1):
        nxt = dA[t + 1]
        # g_t = dL/dh_t(direct) + xi_{t+1} * da_{t+1} @ W_hh; for identity g_t is da_t, so it
        # is written straight into dA[t]. xi stays a tensor (addcmul): no host sync.
        dst = g if tanh else dA[t]
        if xi is None:
            torch.addmm(dhs[t], nxt, W_hh, out=dst)
        else:
            torch.mm(nxt, W_hh, out=carry)
            torch.addcmul(dhs[t], carry, xi[t + 1], out=dst)
        if tanh:
            dA[t].mul_(g)
    return dA


class ManualRNNWindow(torch.autograd.Function):
    """hs = RNN window (T, B, H) with the BPTT backward written out (module docstring).

    forward(xw, h0, W_hh, activation, xi) -> hs; hs[-1] is the final state. Only first-order
    gradients (once_differentiable): the backward itself is not recorded.
    """

    @staticmethod
    def forward(ctx, xw, h0, W_hh, activation: str, xi, cell_kernel: str = "auto",
                bf16: bool = False):
        xi = _check_window(xw, h0, W_hh, activation, xi)
        tanh = activation == "tanh"
        # The loop in C (BLAS called from C, native.py) where it can run; it takes the
        # same steps in the same order, so the results agree to float32 rounding.
        ctx.native = native.usable_for(cell_kernel, xw, xi, whole_windows=True)
        ctx.bf16 = bf16 and ctx.native
        if ctx.native:
            buf = native.rnn_forward_loop(xw, h0, W_hh, tanh, ctx.bf16)
        else:
            buf = _rnn_forward_loop(xw, h0, W_hh, tanh)
        ctx.tanh = tanh
        ctx.has_xi = xi is not None
        # h_t (not a_t) is enough: tanh'(a_t) = 1 - h_t^2 and identity' = 1.
        ctx.save_for_backward(buf, W_hh, *(() if xi is None else (xi,)))
        return buf[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        if ctx.has_xi:
            buf, W_hh, xi = ctx.saved_tensors
        else:
            (buf, W_hh), xi = ctx.saved_tensors, None
        need_xw, need_h0, need_w = ctx.needs_input_grad[:3]
        hs = buf[1:]  # (T, B, H)
        T, B, H = hs.shape
        tanh = ctx.tanh

        if ctx.native:
            dA = native.rnn_backward_loop(buf, dhs, W_hh, tanh, ctx.bf16)
        else:
            dA = _rnn_backward_loop(buf, dhs, W_hh, tanh, xi)

        dh0 = None
        if need_h0:
            dh0 = dA[0] @ W_hh
            if xi is not None:
                dh0.mul_(xi[0])
        # sum_t da_t^T h_{t-1} as ONE (H, T*B) @ (T*B, H) GEMM: far faster than T small ones.
        dW = native.window_outer_sum(dA, buf[:-1], ctx.bf16) if need_w else None
        return (dA if need_xw else None), dh0, dW, None, None, None, None


def manual_rnn_window(xw: torch.Tensor, h0: torch.Tensor, W_hh: torch.Tensor,
                      activation: str = "tanh", xi: torch.Tensor | None = None,
                      cell_kernel: str = "auto") -> torch.Tensor:
    """All hidden states (T, B, H) of one window, with the hand-written BPTT backward.
    cell_kernel: model.cell_kernel (auto | c | torch), see native.usable_for. Under bf16
    autocast the window computes in float32, its recurrent products in bf16 where the C
    windows run (native.bf16_products)."""
    with native.float32_window(xw) as (xw, bf16):
        return ManualRNNWindow.apply(xw, h0, W_hh, activation, xi, cell_kernel, bf16)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, factor):
        if isinstance(factor, torch.Tensor):
            ctx.save_for_backward(factor.detach())
            ctx.factor = None
        else:
            ctx.factor = float(factor)
        # A view, not h itself: autograd then gives the output its own grad_fn.
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        factor = ctx.saved_tensors[0] if ctx.factor is None else ctx.factor
        return grad * factor, None


def scale_grad(h: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Identity forward; multiplies the gradient flowing back through it by ``factor``.

    Applied to h_{t-1} before step t uses it, it turns dh_t/dh_{t-1} into xi_t * dh_t/dh_{t-1}
    (randomized truncation) for any step-by-step cell (RNN, GRU, LSTM).
    """
    return _ScaleGrad.apply(h, factor)


def autograd_rnn_window(xw: torch.Tensor, h0: torch.Tensor, W_hh: torch.Tensor,
                        activation: str = "tanh", xi: torch.Tensor | None = None) -> torch.Tensor:
    """The same window as ``manual_rnn_window``, step by step with autograd (the reference)."""
    xi = _check_window(xw, h0, W_hh, activation, xi)
    h, outs = h0, []
    for t in range(xw.shape[0]):
        if xi is not None:
            # Only the path into step t is scaled; h_{t-1}'s own output keeps its full gradient.
            h = scale_grad(h, xi[t])
        a = xw[t] + h @ W_hh.T
        h = torch.tanh(a) if activation == "tanh" else a
        outs.append(h)
    return torch.stack(outs)


def sample_truncation_xi(num_steps: int, pi: float, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """xi (num_steps,) for randomized truncation: 1/pi with probability pi, else 0.

    E[xi_t] = 1, so the truncated gradient is unbiased. Drawn on the generator's device (a
    CPU generator stays usable for CUDA training), then moved to ``device``.
    """
    if not 0.0 < pi <= 1.0:
        raise ValueError(f"pi must be in (0, 1], got {pi}")
    dtype = dtype or torch.get_default_dtype()
    draw_device = generator.device if generator is not None else device
    keep = torch.rand(num_steps, generator=generator, device=draw_device, dtype=dtype) < pi
    return keep.to(device=device, dtype=dtype) * (1.0 / pi)


def linear_closed_form_state_grads(dH: torch.Tensor, W_hh: torch.Tensor) -> torch.Tensor:
    """dL/dh_t for phi = identity as the explicit sum of step 3 of docs/bptt.md §1 (no recursion).

    dH (T, B, H) holds the gradients reaching each h_t directly (W_qh^T dL/do_t, plus the
    final-state gradient at t = T). In torch.nn's row-vector convention
    dL/dh_t = sum_{i=t..T} dH[i] @ W_hh^(i-t): powers of W_hh are why gradients explode or
    vanish. Quadratic in T, for tests and docs only.
    """
    T = dH.shape[0]
    powers = [torch.linalg.matrix_power(W_hh, k) for k in range(T)]
    out = torch.zeros_like(dH)
    for t in range(T):
        for i in range(t, T):
            out[t] += dH[i] @ powers[i - t]
    return out
