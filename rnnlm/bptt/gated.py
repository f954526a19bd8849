"""Hand-written forward and BPTT backward for whole windows of GRU and LSTM layers.

The same idea as `rnn.py` for the gated cells: run the T steps of one layer with
preallocated buffers and no autograd bookkeeping, and write the backward pass out. What
makes it fast on a CPU, where each step's matmul is small:

* every derivative factor that does not depend on the incoming gradient (sigma', tanh',
  gate products) is computed for the whole window in a few vectorised ops *after* the loop,
  so a backward step is one matmul and two to four elementwise ops;
* all gates share one recurrent matmul per step, against a contiguous (in, out) copy of
  W_hh (a transposed view is ~1.7x slower on MKL at these shapes);
* dW_hh is one (G*H, T*B) @ (T*B, H) GEMM for the window, not T small ones.

On a CPU in float32 the loops run in C instead (native.py, model.cell_kernel): the whole
window with MKL's GEMM called from C where PyTorch's MKL can be reached, else one C call for
each step's elementwise part; the TorchScript loops here are the reference and the fallback.

Weights use torch.nn's layout and equations (GRU gates r|z|n with the reset gate applied to
W_hn h + b_hn; LSTM gates i|f|g|o), so results equal nn.GRU / nn.LSTM to rounding.

`xi` (T,) optionally multiplies each step's Jacobian d(state_t)/d(state_{t-1}) (randomized
truncation, see rnn.py); None means full backpropagation within the window.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from rnnlm.kernels import native
from rnnlm.kernels.scripting import scripted


def _check_xi(xi, like: torch.Tensor):
    return None if xi is None else xi.detach().to(device=like.device, dtype=like.dtype)


@scripted
def _lstm_forward_loop(xw: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                       W_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor]:
    """[h0..hT], [c0..cT] (T+1, B, H), gate activations (T, B, 4H), tanh(c_t) (T, B, H)."""
    T, B, G = xw.shape[0], xw.shape[1], xw.shape[2]
    H = G // 4
    W_t = W_hh.t().contiguous()  # (H, 4H)
    hbuf = xw.new_empty((T + 1, B, H))  # [h0, h1, ..., hT]
    cbuf = xw.new_empty((T + 1, B, H))  # [c0, c1, ..., cT]
    acts = xw.new_empty((T, B, G))  # sigma(i), sigma(f), tanh(g), sigma(o)
    tanh_c = xw.new_empty((T, B, H))
    pre = xw.new_empty((B, G))
    hbuf[0].copy_(h0)
    cbuf[0].copy_(c0)
    for t in range(T):
        torch.addmm(xw[t], hbuf[t], W_t, out=pre)
        a = acts[t]
        torch.sigmoid(pre, out=a)
        torch.tanh(pre[:, 2 * H: 3 * H], out=a[:, 2 * H: 3 * H])
        c = cbuf[t + 1]
        torch.mul(a[:, H: 2 * H], cbuf[t], out=c)  # f * c_{t-1}
        c.addcmul_(a[:, :H], a[:, 2 * H: 3 * H])  # + i * g
        torch.tanh(c, out=tanh_c[t])
        torch.mul(a[:, 3 * H:], tanh_c[t], out=hbuf[t + 1])  # o * tanh(c)
    return hbuf, cbuf, acts, tanh_c


@scripted
def _lstm_backward_loop(dhs: torch.Tensor, dc: torch.Tensor, hbuf: torch.Tensor,
                        cbuf: torch.Tensor, acts: torch.Tensor, tanh_c: torch.Tensor,
                        W_hh: torch.Tensor, xi: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """d gates (T, B, 4H), which is also d xw; dc (B, H) becomes dL/dc_0 in place."""
    T, B, G = acts.shape[0], acts.shape[1], acts.shape[2]
    H = G // 4
    i, f, g, o = acts[..., :H], acts[..., H: 2 * H], acts[..., 2 * H: 3 * H], acts[..., 3 * H:]
    # Factors for the whole window (module docstring): dgates_t = [dc*Pi, dc*Pf, dc*Pg,
    # dh*Po] and dc_t += dh_t * Q_t, with dc_t carried back as dc_t * f_t.
    factors = torch.empty_like(acts)
    Pi, Pf = factors[..., :H], factors[..., H: 2 * H]
    Pg, Po = factors[..., 2 * H: 3 * H], factors[..., 3 * H:]
    torch.mul(g, i * (1 - i), out=Pi)
    torch.mul(cbuf[:-1], f * (1 - f), out=Pf)
    torch.mul(i, 1 - g * g, out=Pg)
    torch.mul(tanh_c, o * (1 - o), out=Po)
    Q = o * (1 - tanh_c * tanh_c)
    P3 = factors[..., : 3 * H].unflatten(-1, (3, H))  # (T, B, 3, H)

    dgates = torch.empty_like(acts)  # (T, B, 4H)
    dg3 = dgates[..., : 3 * H].unflatten(-1, (3, H))
    dh = hbuf.new_empty((B, H))
    for t in range(T - 1, -1, -1):
        if t == T - 1:
            dh.copy_(dhs[t])
        elif xi is None:  # dh_t = dhs_t + dgates_{t+1} W_hh
            torch.addmm(dhs[t], dgates[t + 1], W_hh, out=dh)
        else:
            torch.mm(dgates[t + 1], W_hh, out=dh)
            dh.mul_(xi[t + 1]).add_(dhs[t])
        dc.addcmul_(dh, Q[t])
        torch.mul(dh, Po[t], out=dgates[t][:, 3 * H:])
        torch.mul(dc.unsqueeze(1), P3[t], out=dg3[t])
        dc.mul_(f[t])
        if xi is not None:
            dc.mul_(xi[t])
    return dgates, dc


@scripted
def _gru_forward_loop(xw: torch.Tensor, h0: torch.Tensor, W_hh: torch.Tensor,
                      b_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor]:
    """[h0..hT] (T+1, B, H), W_hh h_{t-1} + b_hh (T, B, 3H), r|z (T, B, 2H), n (T, B, H)."""
    T, B, G = xw.shape[0], xw.shape[1], xw.shape[2]
    H = G // 3
    W_t = W_hh.t().contiguous()  # (H, 3H)
    hbuf = xw.new_empty((T + 1, B, H))
    gh = xw.new_empty((T, B, G))  # W_hh h_{t-1} + b_hh (hn is needed by the backward)
    rz = xw.new_empty((T, B, 2 * H))
    n = xw.new_empty((T, B, H))
    diff = xw.new_empty((B, H))
    hbuf[0].copy_(h0)
    for t in range(T):
        torch.addmm(b_hh, hbuf[t], W_t, out=gh[t])
        torch.add(xw[t, :, : 2 * H], gh[t, :, : 2 * H], out=rz[t]).sigmoid_()
        torch.addcmul(xw[t, :, 2 * H:], rz[t, :, :H], gh[t, :, 2 * H:], out=n[t]).tanh_()
        torch.sub(hbuf[t], n[t], out=diff)
        torch.addcmul(n[t], rz[t, :, H:], diff, out=hbuf[t + 1])  # n + z * (h - n)
    return hbuf, gh, rz, n


@scripted
def _gru_backward_loop(dhs: torch.Tensor, z: torch.Tensor, to_gh: torch.Tensor,
                       W_hh: torch.Tensor, xi: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """d(W_hh h_{t-1} + b_hh) (T, B, 3H) and dL/dh_t (T, B, H) for every step."""
    T, B, H = dhs.shape[0], dhs.shape[1], dhs.shape[2]
    dgh = dhs.new_empty((T, B, 3 * H))
    dgh3 = dgh.unflatten(-1, (3, H))
    dh_all = dhs.new_empty((T, B, H))  # dL/dh_t, kept for the vectorised d xw
    for t in range(T - 1, -1, -1):
        dh = dh_all[t]
        # dh_t = dhs_t + xi_{t+1} (z_{t+1} dh_{t+1} + dgh_{t+1} W_hh)
        if t == T - 1:
            dh.copy_(dhs[t])
        elif xi is None:
            torch.addcmul(dhs[t], z[t + 1], dh_all[t + 1], out=dh)
            dh.addmm_(dgh[t + 1], W_hh)
        else:
            torch.mm(dgh[t + 1], W_hh, out=dh)
            dh.addcmul_(z[t + 1], dh_all[t + 1]).mul_(xi[t + 1]).add_(dhs[t])
        torch.mul(dh.unsqueeze(1), to_gh[t], out=dgh3[t])
    return dgh, dh_all


class LSTMWindow(torch.autograd.Function):
    """(xw (T,B,4H) incl. both biases, h0, c0 (B,H), W_hh (4H,H), xi, cell_kernel) ->
    (hs (T,B,H), c_T)."""

    @staticmethod
    def forward(ctx, xw, h0, c0, W_hh, xi, cell_kernel, bf16=False):
        ctx.native = native.usable_for(cell_kernel, xw, xi)
        ctx.bf16 = bf16 and ctx.native
        if ctx.native:
            hbuf, cbuf, acts, tanh_c = native.lstm_forward_loop(xw, h0, c0, W_hh, bf16=ctx.bf16)
        else:
            hbuf, cbuf, acts, tanh_c = _lstm_forward_loop(xw, h0, c0, W_hh)
        ctx.save_for_backward(hbuf, cbuf, acts, tanh_c, W_hh,
                              *(() if xi is None else (_check_xi(xi, xw),)))
        ctx.has_xi = xi is not None
        return hbuf[1:], cbuf[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs, dcT):
        hbuf, cbuf, acts, tanh_c, W_hh, *rest = ctx.saved_tensors
        xi = rest[0] if ctx.has_xi else None
        T, B, G = acts.shape
        H = G // 4
        dc = dcT.clone() if dcT is not None else hbuf.new_zeros((B, H))
        if ctx.native:
            dgates, dc = native.lstm_backward_loop(dhs, dc, hbuf, cbuf, acts, tanh_c, W_hh,
                                                   bf16=ctx.bf16)
        else:
            dgates, dc = _lstm_backward_loop(dhs, dc, hbuf, cbuf, acts, tanh_c, W_hh, xi)
        dh0 = dgates[0] @ W_hh
        if xi is not None:
            dh0.mul_(xi[0])
        dW = native.window_outer_sum(dgates, hbuf[:-1], ctx.bf16)
        return dgates, dh0, dc, dW, None, None, None


class GRUWindow(torch.autograd.Function):
    """(xw (T,B,3H) incl. b_ih, h0 (B,H), W_hh (3H,H), b_hh (3H,), xi, cell_kernel) ->
    hs (T,B,H)."""

    @staticmethod
    def forward(ctx, xw, h0, W_hh, b_hh, xi, cell_kernel, bf16=False):
        ctx.native = native.usable_for(cell_kernel, xw, xi)
        ctx.bf16 = bf16 and ctx.native
        if ctx.native:
            hbuf, gh, rz, n = native.gru_forward_loop(xw, h0, W_hh, b_hh, bf16=ctx.bf16)
        else:
            hbuf, gh, rz, n = _gru_forward_loop(xw, h0, W_hh, b_hh)
        ctx.save_for_backward(hbuf, gh, rz, n, W_hh,
                              *(() if xi is None else (_check_xi(xi, xw),)))
        ctx.has_xi = xi is not None
        return hbuf[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        hbuf, gh, rz, n, W_hh, *rest = ctx.saved_tensors
        xi = rest[0] if ctx.has_xi else None
        T, B, G = gh.shape
        H = G // 3
        z = rz[..., H:]
        if ctx.native:
            dxw, dgh, dh_all = native.gru_backward_loop(dhs, hbuf, gh, rz, n, W_hh,
                                                        bf16=ctx.bf16)
        else:
            dxw, dgh, dh_all = _gru_backward_window(dhs, hbuf, gh, rz, n, W_hh, xi)
        dh0 = torch.addcmul(dgh[0] @ W_hh, z[0], dh_all[0])
        if xi is not None:
            dh0.mul_(xi[0])
        dW = native.window_outer_sum(dgh, hbuf[:-1], ctx.bf16)
        return dxw, dh0, dW, dgh.sum(dim=(0, 1)), None, None, None


def _gru_backward_window(dhs, hbuf, gh, rz, n, W_hh, xi):
    """d xw, d(W_hh h + b_hh) (T, B, 3H) and dL/dh_t (T, B, H), in tensor ops."""
    H = n.shape[-1]
    r, z = rz[..., :H], rz[..., H:]
    hn = gh[..., 2 * H:]
    # h = (1-z) n + z h_prev. Every gate gradient is dh_t times a factor known after the
    # forward pass: [A_r, A_z, A_n] for d xw and [A_r, A_z, A_n * r] for d(W_hh h + b_hh).
    A_n = (1 - z) * (1 - n * n)
    A_z = (hbuf[:-1] - n) * z * (1 - z)
    A_r = A_n * hn * r * (1 - r)
    to_gh = torch.stack([A_r, A_z, A_n * r], dim=2)  # (T, B, 3, H)
    dgh, dh_all = _gru_backward_loop(dhs, z, to_gh, W_hh, xi)
    dxw = torch.cat([dgh[..., : 2 * H], dh_all * A_n], dim=-1)
    return dxw, dgh, dh_all


def lstm_window(xw, h0, c0, W_hh, xi=None, cell_kernel="auto"):
    """All hidden states (T, B, H) and the final cell state of one LSTM layer.
    cell_kernel: model.cell_kernel (auto | c | torch), see native.usable_for; bf16 autocast
    as for rnn.manual_rnn_window."""
    with native.float32_window(xw) as (xw, bf16):
        return LSTMWindow.apply(xw, h0, c0, W_hh, xi, cell_kernel, bf16)


def gru_window(xw, h0, W_hh, b_hh, xi=None, cell_kernel="auto"):
    """All hidden states (T, B, H) of one GRU layer (cell_kernel as for lstm_window)."""
    with native.float32_window(xw) as (xw, bf16):
        return GRUWindow.apply(xw, h0, W_hh, b_hh, xi, cell_kernel, bf16)
