"""The hand-written GRU/LSTM windows against torch.nn and against step-by-step autograd."""

import pytest
import torch

from rnnlm.bptt.gated import gru_window, lstm_window
from rnnlm.bptt.rnn import scale_grad
from rnnlm.models.scratch import gru_cell, lstm_cell

TOL = dict(atol=1e-10, rtol=1e-10)


def autograd_window(cell, xw, state, W_hh, b_hh, xi=None):
    outs = []
    for t in range(xw.shape[0]):
        if xi is not None:
            state = tuple(scale_grad(s, xi[t]) for s in state)
        state = cell(xw[t], state, W_hh, b_hh)
        outs.append(state[0])
    return torch.stack(outs), state


def make(T, B, H, gates, seed):
    g = torch.Generator().manual_seed(seed)
    xw = torch.randn(T, B, gates * H, generator=g, dtype=torch.float64)
    W = torch.randn(gates * H, H, generator=g, dtype=torch.float64) * 0.6
    b = torch.randn(gates * H, generator=g, dtype=torch.float64) * 0.3
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64)
    c0 = torch.randn(B, H, generator=g, dtype=torch.float64)
    return [t.requires_grad_(True) for t in (xw, W, b, h0, c0)]


def loss_of(hs, final, weights):
    return (hs * weights).sum() + sum((f ** 3).sum() for f in final)


XI_CASES = [None, "fixed"]


@pytest.mark.parametrize("T, B, H", [(1, 1, 3), (6, 2, 4), (35, 3, 5)])
@pytest.mark.parametrize("xi_case", XI_CASES)
def test_lstm_window_matches_autograd(T, B, H, xi_case):
    xw, W, b, h0, c0 = make(T, B, H, 4, seed=T)
    xi = None if xi_case is None else torch.tensor([0.0, 2.0] * T, dtype=torch.float64)[:T]
    weights = torch.randn(T, B, H, dtype=torch.float64)
    results = []
    for manual in (True, False):
        for p in (xw, W, b, h0, c0):
            p.grad = None
        if manual:
            hs, cT = lstm_window(xw + b, h0, c0, W, xi)
            final = (hs[-1], cT)
        else:
            hs, final = autograd_window(lstm_cell, xw, (h0, c0), W, b, xi)
        loss_of(hs, final, weights).backward()
        results.append([hs.detach(), *[f.detach() for f in final]] +
                       [p.grad.clone() for p in (xw, W, b, h0, c0)])
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, **TOL)


@pytest.mark.parametrize("T, B, H", [(1, 1, 3), (6, 2, 4), (35, 3, 5)])
@pytest.mark.parametrize("xi_case", XI_CASES)
def test_gru_window_matches_autograd(T, B, H, xi_case):
    xw, W, b, h0, _ = make(T, B, H, 3, seed=T + 1)
    xi = None if xi_case is None else torch.tensor([2.0, 0.0, 2.0] * T, dtype=torch.float64)[:T]
    weights = torch.randn(T, B, H, dtype=torch.float64)
    results = []
    for manual in (True, False):
        for p in (xw, W, b, h0):
            p.grad = None
        if manual:
            hs = gru_window(xw, h0, W, b, xi)
            final = (hs[-1],)
        else:
            hs, final = autograd_window(gru_cell, xw, (h0,), W, b, xi)
        loss_of(hs, final, weights).backward()
        results.append([hs.detach()] + [p.grad.clone() for p in (xw, W, b, h0)])
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, **TOL)


def test_windows_match_torch_nn_layers():
    torch.manual_seed(0)
    T, B, I, H = 7, 3, 5, 6
    x = torch.randn(T, B, I, dtype=torch.float64)
    for cls in (torch.nn.GRU, torch.nn.LSTM):
        layer = cls(I, H).double()
        h0 = torch.randn(1, B, H, dtype=torch.float64)
        c0 = torch.randn(1, B, H, dtype=torch.float64)
        if cls is torch.nn.LSTM:
            ref, (hT, cT) = layer(x, (h0, c0))
            xw = x @ layer.weight_ih_l0.t() + layer.bias_ih_l0 + layer.bias_hh_l0
            hs, cT2 = lstm_window(xw, h0[0], c0[0], layer.weight_hh_l0)
            torch.testing.assert_close(cT2, cT[0], **TOL)
        else:
            ref, hT = layer(x, h0)
            xw = x @ layer.weight_ih_l0.t() + layer.bias_ih_l0
            hs = gru_window(xw, h0[0], layer.weight_hh_l0, layer.bias_hh_l0)
        torch.testing.assert_close(hs, ref, **TOL)


def test_gradcheck_tiny():
    xw, W, b, h0, c0 = make(3, 2, 2, 4, seed=9)
    assert torch.autograd.gradcheck(lambda *a: lstm_window(*a)[0].sum() + lstm_window(*a)[1].sum(),
                                    (xw.detach().requires_grad_(), h0, c0, W))
    xw, W, b, h0, _ = make(3, 2, 2, 3, seed=10)
    assert torch.autograd.gradcheck(lambda *a: gru_window(*a), (xw, h0, W, b))
