"""train.precision: bf16 on the C windows: the recurrent products take bf16 operands and
accumulate in float32, everything else stays float32 (native.bf16_products). The plain RNN
is checked against that definition written out step by step; the gated windows against
float32 to bf16's rounding; and a bf16 run trains on the C windows with the hand-written
backward."""

from __future__ import annotations

import pytest
import torch

from rnnlm.bptt import gated, rnn
from rnnlm.config import load_config
from rnnlm.kernels import native
from rnnlm.models import build_model
from tests.conftest import spy_on_c_loops

pytestmark = pytest.mark.skipif(not (native.windows_available() and native._BF16_PRODUCTS),
                                reason="no C windows with MKL's bf16 GEMM here")


def bf(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16 and back: a product's operand."""
    return x.to(torch.bfloat16).float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def reference_rnn(xw, h0, W, dhs):
    """The bf16-product RNN window by definition: hs and d xw (T, B, H), dW."""
    T = xw.shape[0]
    hs, h = [], h0
    for t in range(T):
        h = torch.tanh(xw[t] + bf(h) @ bf(W).t())
        hs.append(h)
    hs = torch.stack(hs)
    dA = torch.empty_like(hs)
    dA[-1] = dhs[-1] * (1 - hs[-1] ** 2)
    for t in range(T - 2, -1, -1):
        dA[t] = (dhs[t] + bf(dA[t + 1]) @ bf(W)) * (1 - hs[t] ** 2)
    h_prev = torch.cat([h0[None], hs[:-1]])
    dW = torch.einsum("tbg,tbh->gh", bf(dA), bf(h_prev))
    return hs, dA, dW


def window_grads(fn, xw, *rest, dhs):
    xw = xw.clone().requires_grad_()
    W = rest[-1].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(xw, *rest[:-1], W)
    hs = out[0] if isinstance(out, tuple) else out
    dxw, dW = torch.autograd.grad(hs, (xw, W), dhs)
    return hs.detach(), dxw, dW


def test_rnn_window_is_float32_math_on_bf16_operands():
    torch.manual_seed(0)
    T, B, H = 9, 5, 40
    xw, h0 = torch.randn(T, B, H), torch.randn(B, H)
    W = torch.randn(H, H) / H ** 0.5
    dhs = torch.randn(T, B, H)
    hs, dxw, dW = window_grads(lambda x, h, w: rnn.manual_rnn_window(x, h, w), xw, h0, W,
                               dhs=dhs)
    ref_hs, ref_dA, ref_dW = reference_rnn(xw, h0, W, dhs)
    # the same products in another summation order: float32 rounding, not bf16's
    assert relative(hs, ref_hs) < 1e-5
    assert relative(dxw, ref_dA) < 1e-5
    # the weight gradient comes out of its GEMM in bf16, as autocast's own weight gradients
    # do: within one bf16 rounding (2^-8) of the float32 sum
    assert relative(dW, ref_dW) < 2 ** -8
    # and bf16 rounding is really there: float32 products differ by bf16's 2^-8 order
    fp32 = rnn.manual_rnn_window(xw, h0, W)
    assert 1e-4 < relative(hs, fp32) < 3e-2


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gated_windows_run_bf16_products(cell, monkeypatch):
    torch.manual_seed(1)
    T, B, H = 7, 4, 24
    gates = {"gru": 3, "lstm": 4}[cell]
    xw, h0, c0 = torch.randn(T, B, gates * H), torch.randn(B, H), torch.randn(B, H)
    W, b = torch.randn(gates * H, H) / H ** 0.5, torch.randn(gates * H)
    dhs = torch.randn(T, B, H)
    if cell == "gru":
        def fn(x, h, w):
            return gated.gru_window(x, h, w, b)
    else:
        def fn(x, h, w):
            return gated.lstm_window(x, h, c0, w)
    calls = spy_on_c_loops(monkeypatch, [cell])
    hs, dxw, dW = window_grads(fn, xw, h0, W, dhs=dhs)
    assert f"{cell}_forward_loop" in calls and f"{cell}_backward_loop" in calls
    xw32, W32 = xw.clone().requires_grad_(), W.clone().requires_grad_()
    out = fn(xw32, h0, W32)
    hs32 = out[0] if isinstance(out, tuple) else out
    dxw32, dW32 = torch.autograd.grad(hs32, (xw32, W32), dhs)
    for ours, full in ((hs, hs32), (dxw, dxw32), (dW, dW32)):
        assert 1e-5 < relative(ours, full) < 3e-2


def test_bf16_input_projection_comes_back_to_float32():
    """Under autocast an embedding's projection arrives in bf16; the window computes in
    float32 from it and hands its gradient back in the input's dtype."""
    torch.manual_seed(2)
    T, B, H = 5, 3, 16
    x = torch.randn(T, B, H, requires_grad=True)
    W_ih, W = torch.randn(H, H) / 4, torch.randn(H, H) / 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xw = x @ W_ih.t()
        assert xw.dtype == torch.bfloat16
        hs = rnn.manual_rnn_window(xw, torch.zeros(B, H), W)
    assert hs.dtype == torch.float32
    hs.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kind", ["rnn_scratch", "lstm_scratch"])
def test_bf16_training_runs_the_c_windows_by_hand(kind, monkeypatch, tmp_path):
    """precision bf16 on the CPU keeps the hand-written backward and the C windows, and a
    few steps land where float32 lands to bf16's rounding."""
    cfg = load_config(f"configs/{kind}.yaml")
    cfg.train.precision = "bf16"
    model = build_model(cfg.model, 28, cfg.train, "cpu")
    assert getattr(model.layers[0], "window", None) is not None  # manual windows
    cell = kind.split("_")[0]
    calls = spy_on_c_loops(monkeypatch, [cell])
    torch.manual_seed(3)
    X, Y = torch.randint(0, 28, (8, 35)), torch.randint(0, 28, (8, 35))
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(4)
        net = build_model(cfg.model, 28, cfg.train, "cpu")
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits, _ = net(X, net.begin_state(8))
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 28),
                                                         Y.t().reshape(-1))
            loss.backward()
            opt.step()
        losses[precision] = float(loss.detach())
    assert f"{cell}_backward_loop" in calls
    assert abs(losses["bf16"] - losses["fp32"]) < 0.02 * losses["fp32"]
