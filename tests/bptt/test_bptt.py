"""The hand-written BPTT backward (rnnlm.bptt.rnn) against autograd, the closed form and theory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rnnlm.bptt.rnn import (
    ManualRNNWindow,
    autograd_rnn_window,
    linear_closed_form_state_grads,
    manual_rnn_window,
    sample_truncation_xi,
    scale_grad,
)

DT = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)
SHAPES = [(1, 1, 3), (5, 2, 4), (35, 3, 8)]  # (T, B, H)
ACTIVATIONS = ["tanh", "identity"]
V = 5  # vocabulary / input size of the small language model around the layer


def _lm(T, B, H, seed, dtype=DT, w_scale=0.9):
    """Leaf parameters and data of a tiny char-level LM: x -> xw -> RNN window -> logits."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_()

    return dict(
        W_ih=rnd(H, V, scale=0.5), b_ih=rnd(H, scale=0.1), b_hh=rnd(H, scale=0.1),
        # spectral radius near w_scale: powers of W_hh neither vanish nor blow up over 35 steps
        W_hh=rnd(H, H, scale=w_scale / math.sqrt(H)),
        h0=rnd(B, H, scale=0.5),  # a carried state, not zeros
        W_q=rnd(V, H, scale=0.5), b_q=rnd(V, scale=0.1),
        x=torch.randn(T, B, V, generator=g, dtype=dtype),
        y=torch.randint(0, V, (T, B), generator=g),
        R=torch.randn(B, H, generator=g, dtype=dtype),  # weights of a loss on the final state
    )


def _loss_and_grads(rnn, p, activation, xi=None, loss_kind="outputs"):
    xw = p["x"] @ p["W_ih"].T + p["b_ih"] + p["b_hh"]  # (T, B, H)
    hs = rnn(xw, p["h0"], p["W_hh"], activation, xi)
    loss = hs.new_zeros(())
    if loss_kind in ("outputs", "outputs+final"):
        o = hs @ p["W_q"].T + p["b_q"]  # (T, B, V)
        loss = loss + F.cross_entropy(o.reshape(-1, V), p["y"].reshape(-1))
    if loss_kind in ("final", "outputs+final"):
        loss = loss + (hs[-1] * p["R"]).sum()  # the final state's own gradient path
    names = ["h0", "W_hh", "W_q", "b_q", "W_ih", "b_ih", "b_hh"]
    inputs = [xw] + [p[n] for n in names]
    # allow_unused: with the "final" loss the output layer takes no part
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return hs.detach(), dict(zip(["xw"] + names, grads, strict=True))


def _assert_same(a, b):
    hs_a, ga = a
    hs_b, gb = b
    torch.testing.assert_close(hs_a, hs_b, **TOL)
    for name in ga:
        if ga[name] is None or gb[name] is None:
            assert ga[name] is None and gb[name] is None, name
        else:
            torch.testing.assert_close(ga[name], gb[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("loss_kind", ["outputs", "outputs+final", "final"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_manual_matches_autograd(shape, activation, loss_kind):
    p = _lm(*shape, seed=sum(shape))
    _assert_same(_loss_and_grads(manual_rnn_window, p, activation, loss_kind=loss_kind),
                 _loss_and_grads(autograd_rnn_window, p, activation, loss_kind=loss_kind))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 2, 4)])
def test_fixed_xi_matches_autograd_with_scale_grad(shape, activation):
    T = shape[0]
    p = _lm(*shape, seed=7)
    # zeros cut the chain (xi[0] = 0 cuts h0 off); other values exercise the scaling itself
    xi = torch.tensor([0.0, 2.0, 2.0, 0.0, 0.5][:T], dtype=DT)
    manual = _loss_and_grads(manual_rnn_window, p, activation, xi, "outputs+final")
    _assert_same(manual, _loss_and_grads(autograd_rnn_window, p, activation, xi, "outputs+final"))
    if T > 1:  # the cut must change something, or the test above proves nothing
        full = _loss_and_grads(manual_rnn_window, p, activation, None, "outputs+final")
        assert not torch.allclose(manual[1]["W_hh"], full[1]["W_hh"])
    else:
        assert torch.count_nonzero(manual[1]["h0"]) == 0


def test_xi_of_ones_is_full_backprop():
    p = _lm(6, 2, 4, seed=3)
    ones = torch.ones(6, dtype=DT)
    _assert_same(_loss_and_grads(manual_rnn_window, p, "tanh", ones),
                 _loss_and_grads(manual_rnn_window, p, "tanh", None))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("use_xi", [False, True])
def test_gradcheck(activation, use_xi):
    g = torch.Generator().manual_seed(11)
    T, B, H = 4, 2, 3
    xw = torch.randn(T, B, H, generator=g, dtype=DT).requires_grad_()
    h0 = torch.randn(B, H, generator=g, dtype=DT).requires_grad_()
    W_hh = (0.6 * torch.randn(H, H, generator=g, dtype=DT)).requires_grad_()
    xi = torch.tensor([2.0, 0.0, 2.0, 2.0], dtype=DT) if use_xi else None

    def fn(a, b, c):
        return ManualRNNWindow.apply(a, b, c, activation, xi)

    if use_xi:
        # with xi the backward is deliberately not the derivative of the forward, so compare
        # with the autograd reference instead of finite differences
        R = torch.randn(T, B, H, generator=g, dtype=DT)
        ga = torch.autograd.grad((fn(xw, h0, W_hh) * R).sum(), (xw, h0, W_hh))
        gb = torch.autograd.grad((autograd_rnn_window(xw, h0, W_hh, activation, xi) * R).sum(),
                                 (xw, h0, W_hh))
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, b, **TOL)
    else:
        assert torch.autograd.gradcheck(fn, (xw, h0, W_hh))


def test_only_some_inputs_need_grad():
    # h0 detached (regular truncation at a batch boundary) and xw a constant
    g = torch.Generator().manual_seed(5)
    xw = torch.randn(5, 2, 4, generator=g, dtype=DT)
    h0 = torch.randn(2, 4, generator=g, dtype=DT)
    W_hh = (0.5 * torch.randn(4, 4, generator=g, dtype=DT)).requires_grad_()
    (gm,) = torch.autograd.grad(manual_rnn_window(xw, h0, W_hh).square().sum(), W_hh)
    (ga,) = torch.autograd.grad(autograd_rnn_window(xw, h0, W_hh).square().sum(), W_hh)
    torch.testing.assert_close(gm, ga, **TOL)


def test_matches_torch_nn_rnn():
    # conventions check against an independent implementation: h_t = tanh(x W_ih^T + b_ih +
    # h_{t-1} W_hh^T + b_hh), time-major
    torch.manual_seed(0)
    T, B, H = 6, 3, 4
    rnn = torch.nn.RNN(V, H, dtype=DT)
    x = torch.randn(T, B, V, dtype=DT)
    h0 = torch.randn(1, B, H, dtype=DT)
    ref, h_last = rnn(x, h0)
    xw = x @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + rnn.bias_hh_l0
    hs = manual_rnn_window(xw, h0[0], rnn.weight_hh_l0)
    torch.testing.assert_close(hs, ref, **TOL)
    torch.testing.assert_close(hs[-1], h_last[0], **TOL)
    R = torch.randn(T, B, H, dtype=DT)
    params = list(rnn.parameters())
    for a, b in zip(torch.autograd.grad((hs * R).sum(), params),
                    torch.autograd.grad((ref * R).sum(), params), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_float32_close_to_autograd():
    p = _lm(35, 4, 16, seed=2, dtype=torch.float32)
    hs_a, ga = _loss_and_grads(manual_rnn_window, p, "tanh", loss_kind="outputs+final")
    hs_b, gb = _loss_and_grads(autograd_rnn_window, p, "tanh", loss_kind="outputs+final")
    assert hs_a.dtype == torch.float32 and ga["W_hh"].dtype == torch.float32
    torch.testing.assert_close(hs_a, hs_b, atol=1e-5, rtol=1e-5)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-4)


def test_linear_closed_form_equals_recursion():
    # docs/bptt.md §1, step 3: with phi = identity,
    # dL/dh_t = sum_{i>=t} (W_hh^T)^{i-t} W_qh^T dL/do_i.
    # Since a_t = h_t, dL/dh_t (all paths) is the gradient of xw_t; the direct gradients dH
    # (output layer + final state) are those of the stacked hs.
    p = _lm(12, 2, 4, seed=9, w_scale=1.2)  # radius > 1: high powers matter
    xw = (p["x"] @ p["W_ih"].T).detach().requires_grad_()
    for rnn in (autograd_rnn_window, manual_rnn_window):
        hs = rnn(xw, p["h0"], p["W_hh"], "identity")
        hs.retain_grad()
        o = hs @ p["W_q"].T + p["b_q"]
        loss = F.cross_entropy(o.reshape(-1, V), p["y"].reshape(-1)) + (hs[-1] * p["R"]).sum()
        xw.grad = None
        loss.backward()
        closed = linear_closed_form_state_grads(hs.grad, p["W_hh"].detach())
        torch.testing.assert_close(closed, xw.grad, **TOL)
        assert not torch.allclose(closed, hs.grad)  # the recurrence contributes


def test_scale_grad():
    h = torch.randn(3, 2, dtype=DT, requires_grad=True)
    for factor in (2.5, torch.tensor(0.0, dtype=DT)):
        out = scale_grad(h, factor)
        assert torch.equal(out, h)
        (g,) = torch.autograd.grad(out.sum(), h)
        torch.testing.assert_close(g, torch.full_like(h, float(factor)))


def test_sample_truncation_xi():
    pi = 0.3
    xi = sample_truncation_xi(20000, pi, torch.Generator().manual_seed(0), dtype=DT)
    again = sample_truncation_xi(20000, pi, torch.Generator().manual_seed(0), dtype=DT)
    assert xi.shape == (20000,) and xi.dtype == DT and torch.equal(xi, again)
    values = set(xi.unique().tolist())
    assert values == {0.0, 1.0 / pi}
    # E[xi] = 1; sd of the mean is sqrt((1 - pi) / pi / n) ~ 0.011
    assert abs(xi.mean().item() - 1.0) < 0.05
    assert torch.equal(sample_truncation_xi(7, 1.0), torch.ones(7))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            sample_truncation_xi(5, bad)


def test_bad_arguments():
    xw, h0, W = torch.zeros(3, 2, 4), torch.zeros(2, 4), torch.zeros(4, 4)
    with pytest.raises(ValueError, match="activation"):
        manual_rnn_window(xw, h0, W, "relu")
    with pytest.raises(ValueError, match="xi"):
        manual_rnn_window(xw, h0, W, "tanh", torch.ones(2))
    with pytest.raises(ValueError, match="h0"):
        autograd_rnn_window(xw, torch.zeros(1, 4), W)


# --- randomized truncation is unbiased -------------------------------------------------------

def _mean_within_standard_error(samples, target, k=5.0):
    """Elementwise |mean - target| <= k * SE + 1e-12, SE = sample sd / sqrt(N).

    Elementwise rather than one chi-square aggregate: a chi-square needs the estimate's full
    covariance (badly estimated for heavy-tailed 1/pi^k products), while k = 5 per element is
    conservative enough for a handful of elements (a Bonferroni-style margin). The generator
    is seeded, so the outcome is deterministic either way.
    """
    n = samples.shape[0]
    se = samples.std(dim=0) / math.sqrt(n)
    return bool(((samples.mean(dim=0) - target).abs() <= k * se + 1e-12).all())


def _truncated_grads(pi, n, scale):
    T, B, H = 10, 2, 3
    g = torch.Generator().manual_seed(1)
    xw = torch.randn(T, B, H, generator=g, dtype=DT)
    h0 = torch.randn(B, H, generator=g, dtype=DT)
    W_hh = (torch.randn(H, H, generator=g, dtype=DT) / math.sqrt(H)).requires_grad_()
    dhs = torch.randn(T, B, H, generator=g, dtype=DT)  # the output layer's dL/dh_t, fixed

    def grad(xi):
        return torch.autograd.grad(manual_rnn_window(xw, h0, W_hh, "tanh", xi), W_hh, dhs)[0]

    full = grad(None)
    draws = []
    for _ in range(n):
        xi = sample_truncation_xi(T, pi, g, dtype=DT)
        draws.append(grad(xi if scale else (xi > 0).to(DT)))
    return torch.stack(draws), full


def test_randomized_truncation_is_unbiased():
    samples, full = _truncated_grads(pi=0.5, n=2000, scale=True)
    assert _mean_within_standard_error(samples, full)


def test_unbiasedness_check_rejects_a_biased_estimator():
    # xi in {0, 1} (plain random truncation, no 1/pi) shrinks the long-range terms: the same
    # check must catch it, or the test above could not fail
    samples, full = _truncated_grads(pi=0.5, n=2000, scale=False)
    assert not _mean_within_standard_error(samples, full)
