"""The parallel scans of rnnlm.bptt.scan against the step-by-step recurrence, and the
hand-written BPTT backward of the diagonal recurrence against autograd (float64, complex128)."""

from __future__ import annotations

import math

import pytest
import torch

from rnnlm.bptt.scan import (
    ManualLinearScan,
    diagonal_closed_form_state_grads,
    diagonal_state_grads,
    linear_recurrence_loop,
    linear_scan,
    log_linear_recurrence_loop,
    log_linear_scan,
    manual_linear_scan,
)

TOL = dict(atol=1e-10, rtol=1e-10)
LENGTHS = [1, 2, 3, 5, 7, 35, 64, 100, 129, 1000]  # powers of two, one past, and neither
DTYPES = [torch.float64, torch.complex128]
B, N = 2, 3  # trailing batch and channel dims
# Where a lives: a step-dependent coefficient per element, one broadcast over the batch
# (as a gate computed per step and channel would be), and a constant diagonal (the LRU).
A_SHAPES = {"time": lambda T: (T, B, N), "time_bcast": lambda T: (T, 1, N), "const": lambda T: (N,)}


def _coefficients(shape, dtype, g, low=0.5, high=0.99):
    """Coefficients with modulus in [low, high) (random sign or phase): long memory, no blow-up."""
    r = low + (high - low) * torch.rand(shape, generator=g, dtype=torch.float64)
    if dtype.is_complex:
        theta = 2 * math.pi * torch.rand(shape, generator=g, dtype=torch.float64)
        return torch.polar(r, theta)
    sign = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return r * sign


def _randn(shape, dtype, g):
    return torch.randn(shape, generator=g, dtype=dtype)


def _problem(T, dtype, a_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = _coefficients(A_SHAPES[a_kind](T), dtype, g).requires_grad_()
    b = _randn((T, B, N), dtype, g).requires_grad_()
    h0 = _randn((B, N), dtype, g).requires_grad_()
    w = _randn((T, B, N), dtype, g)  # the upstream gradient dL/dh_t
    return a, b, h0, w


def _value_and_grads(fn, a, b, h0, w):
    hs = fn(a, b, h0)
    inputs = [x for x in (a, b, h0) if x is not None]
    return hs.detach(), torch.autograd.grad(hs, inputs, grad_outputs=w)


@pytest.mark.parametrize("a_kind", list(A_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["real", "complex"])
@pytest.mark.parametrize("T", LENGTHS)
def test_scans_equal_the_loop_in_outputs_and_gradients(T, dtype, a_kind):
    a, b, h0, w = _problem(T, dtype, a_kind, seed=T)
    ref, ref_grads = _value_and_grads(linear_recurrence_loop, a, b, h0, w)
    assert ref.shape == (T, B, N) and ref.dtype == dtype
    for fn in (linear_scan, manual_linear_scan):
        hs, grads = _value_and_grads(fn, a, b, h0, w)
        torch.testing.assert_close(hs, ref, **TOL)
        for got, want, x in zip(grads, ref_grads, (a, b, h0)):
            assert got.shape == x.shape and got.dtype == x.dtype
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=["real", "complex"])
@pytest.mark.parametrize("T", [1, 6, 35, 129])
def test_hand_written_backward_equals_autograd_through_the_scan(T, dtype):
    a, b, h0, w = _problem(T, dtype, "time", seed=100 + T)
    _, auto = _value_and_grads(linear_scan, a, b, h0, w)
    _, manual = _value_and_grads(manual_linear_scan, a, b, h0, w)
    for got, want in zip(manual, auto):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("a_kind", list(A_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["real", "complex"])
def test_hand_written_backward_passes_gradcheck(dtype, a_kind):
    a, b, h0, _ = _problem(5, dtype, a_kind, seed=7)
    assert torch.autograd.gradcheck(ManualLinearScan.apply, (a, b, h0))
    assert torch.autograd.gradcheck(lambda a, b: manual_linear_scan(a, b), (a, b))


@pytest.mark.parametrize("dtypes", [(torch.complex128, torch.float64),
                                    (torch.float64, torch.complex128)],
                         ids=["complex_a_real_b", "real_a_complex_b"])
def test_mixed_real_and_complex_inputs_get_real_gradients(dtypes):
    g = torch.Generator().manual_seed(3)
    T = 9
    a = _coefficients((T, B, N), dtypes[0], g).requires_grad_()
    b = _randn((T, B, N), dtypes[1], g).requires_grad_()
    h0 = _randn((N,), torch.float64, g).requires_grad_()  # broadcast over the batch
    w = _randn((T, B, N), torch.complex128, g)
    ref, ref_grads = _value_and_grads(linear_recurrence_loop, a, b, h0, w)
    assert ref.dtype == torch.complex128
    for fn in (linear_scan, manual_linear_scan):
        hs, grads = _value_and_grads(fn, a, b, h0, w)
        torch.testing.assert_close(hs, ref, **TOL)
        for got, want, x in zip(grads, ref_grads, (a, b, h0)):
            assert got.dtype == x.dtype and got.shape == x.shape
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=["real", "complex"])
def test_zero_initial_state_is_the_default(dtype):
    a, b, _, w = _problem(13, dtype, "const", seed=5)
    zeros = torch.zeros(B, N, dtype=dtype, requires_grad=True)
    ref, ref_grads = _value_and_grads(linear_recurrence_loop, a, b, zeros, w)
    for fn in (linear_scan, manual_linear_scan):
        hs, grads = _value_and_grads(fn, a, b, None, w)
        torch.testing.assert_close(hs, ref, **TOL)
        for got, want in zip(grads, ref_grads[:2]):
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=["real", "complex"])
@pytest.mark.parametrize("T", [1, 5, 64, 100])
def test_reverse_scan_equals_the_reverse_loop(T, dtype):
    a, b, h0, _ = _problem(T, dtype, "time_bcast", seed=T)
    want = linear_recurrence_loop(a, b, h0, reverse=True)
    torch.testing.assert_close(linear_scan(a, b, h0, reverse=True), want, **TOL)
    # h_T = a_T * h0 + b_T: the reverse recurrence starts from the end.
    torch.testing.assert_close(want[-1], (a[-1] * h0 + b[-1]).detach(), **TOL)


@pytest.mark.parametrize("a_kind", list(A_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["real", "complex"])
def test_state_grads_are_step_3_of_the_chapter(dtype, a_kind):
    a, _, _, dhs = _problem(17, dtype, a_kind, seed=11)
    a = a.detach()
    g = diagonal_state_grads(a, dhs)
    torch.testing.assert_close(g, diagonal_closed_form_state_grads(a, dhs), **TOL)
    # The recursion itself: g_T = dhs_T, g_t = dhs_t + conj(a_{t+1}) g_{t+1}.
    a_full = a.expand(17, B, N)
    torch.testing.assert_close(g[-1], dhs[-1], **TOL)
    torch.testing.assert_close(g[:-1], dhs[:-1] + a_full[1:].conj() * g[1:], **TOL)


def test_each_channel_vanishes_or_explodes_by_its_own_lambda():
    T = 40
    lam = torch.tensor([0.5, 1.0, 1.5, -0.9], dtype=torch.float64)
    dhs = torch.zeros(T, 4, dtype=torch.float64)
    dhs[-1] = 1.0  # only the last step's loss: the gradient it sends back d steps
    g = diagonal_state_grads(lam, dhs)
    d = torch.arange(T - 1, -1, -1, dtype=torch.float64)[:, None]  # distance T - t
    torch.testing.assert_close(g, lam ** d, **TOL)
    assert g[0, 0] < 1e-11 and g[0, 1] == 1.0 and g[0, 2] > 1e6


@pytest.mark.parametrize("dtype", DTYPES, ids=["real", "complex"])
@pytest.mark.parametrize("fn", [linear_scan, manual_linear_scan, linear_recurrence_loop])
def test_carried_state_splits_a_window_in_two(fn, dtype):
    a, b, h0, _ = _problem(37, dtype, "time", seed=2)
    whole = fn(a, b, h0)
    first = fn(a[:20], b[:20], h0)
    second = fn(a[20:], b[20:], first[-1])
    torch.testing.assert_close(torch.cat((first, second)), whole, **TOL)
    # The constant diagonal needs no slicing: the same lambda in both halves.
    lam = a[0, 0].detach()
    whole = fn(lam, b, h0)
    torch.testing.assert_close(fn(lam, b[20:], fn(lam, b[:20], h0)[-1]), whole[20:], **TOL)


def _log_problem(T, seed, log_a_range=(-3.0, -0.01), log_b_range=(-3.0, 1.0), shape=(B, N)):
    g = torch.Generator().manual_seed(seed)

    def uniform(lo, hi, size):
        x = lo + (hi - lo) * torch.rand(size, generator=g, dtype=torch.float64)
        return x.requires_grad_()

    log_a = uniform(*log_a_range, (T, *shape))
    log_b = uniform(*log_b_range, (T, *shape))
    log_h0 = uniform(-2.0, 1.0, shape)
    w = torch.randn((T, *shape), generator=g, dtype=torch.float64)
    return log_a, log_b, log_h0, w


@pytest.mark.parametrize("T", LENGTHS)
def test_log_scan_equals_the_loops(T):
    log_a, log_b, log_h0, w = _log_problem(T, seed=T)
    ref, ref_grads = _value_and_grads(log_linear_recurrence_loop, log_a, log_b, log_h0, w)
    got, grads = _value_and_grads(log_linear_scan, log_a, log_b, log_h0, w)
    torch.testing.assert_close(got, ref, **TOL)
    for x, y in zip(grads, ref_grads):
        torch.testing.assert_close(x, y, **TOL)
    # And in linear space, where the values are representable: the plain recurrence.
    lin, lin_grads = _value_and_grads(
        lambda la, lb, lh: linear_recurrence_loop(la.exp(), lb.exp(), lh.exp()).log(),
        log_a, log_b, log_h0, w)
    torch.testing.assert_close(got, lin, **TOL)
    for x, y in zip(grads, lin_grads):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("T", [1, 7, 100, 1000])
def test_log_scan_stays_finite_where_linear_space_underflows(T):
    # a ~ 1e-30 and b ~ e^-1000: b is 0 in float64, and the products of a reach 1e-30000.
    log_a, log_b, log_h0, w = _log_problem(T, seed=T, log_a_range=(-70.0, -68.0),
                                           log_b_range=(-1001.0, -999.0))
    assert torch.all(log_b.exp() == 0)
    got, grads = _value_and_grads(log_linear_scan, log_a, log_b, log_h0, w)
    ref, ref_grads = _value_and_grads(log_linear_recurrence_loop, log_a, log_b, log_h0, w)
    assert torch.isfinite(got).all() and all(torch.isfinite(x).all() for x in grads)
    torch.testing.assert_close(got, ref, **TOL)
    for x, y in zip(grads, ref_grads):
        torch.testing.assert_close(x, y, **TOL)
    # After the first step h_0's share is a_1 * h0 ~ 1e-30 against b ~ e^-1000: it is gone.
    if T > 1:
        torch.testing.assert_close(got[1:], (log_a[1:] + got[:-1]).logaddexp(log_b[1:]).detach(),
                                   **TOL)


def test_log_scan_broadcasts_and_takes_a_zero_state():
    T = 29
    log_a, log_b, _, w = _log_problem(T, seed=4)
    log_lam = log_a[0, 0].detach().requires_grad_()  # (N,): one coefficient per channel
    for log_h0 in (None, torch.full((B, N), -math.inf, dtype=torch.float64, requires_grad=True)):
        got, grads = _value_and_grads(log_linear_scan, log_lam, log_b, log_h0, w)
        ref, ref_grads = _value_and_grads(log_linear_recurrence_loop, log_lam, log_b, None, w)
        torch.testing.assert_close(got, ref, **TOL)
        for x, y in zip(grads, ref_grads):
            torch.testing.assert_close(x, y, **TOL)
        if log_h0 is not None:  # h0 = 0 exactly: gradient 0, not NaN
            assert torch.equal(grads[-1], torch.zeros(B, N, dtype=torch.float64))


def test_log_scan_carried_state_splits_a_window_in_two():
    log_a, log_b, log_h0, _ = _log_problem(64, seed=8)
    whole = log_linear_scan(log_a, log_b, log_h0)
    first = log_linear_scan(log_a[:23], log_b[:23], log_h0)
    second = log_linear_scan(log_a[23:], log_b[23:], first[-1])
    torch.testing.assert_close(torch.cat((first, second)), whole, **TOL)


def test_bad_shapes_and_dtypes_are_refused():
    b = torch.zeros(4, B, N, dtype=torch.float64)
    with pytest.raises(ValueError, match="must broadcast"):
        linear_scan(torch.zeros(4, N, 1, dtype=torch.float64), b)
    with pytest.raises(ValueError, match="must broadcast"):
        linear_scan(torch.zeros(2, 4, B, N, dtype=torch.float64), b)
    with pytest.raises(ValueError, match="h0"):
        linear_scan(torch.zeros(N, dtype=torch.float64), b, torch.zeros(B + 1, N))
    with pytest.raises(ValueError, match="T >= 1"):
        linear_scan(torch.zeros(N), torch.zeros(0, N))
    with pytest.raises(TypeError, match="floating"):
        linear_scan(torch.zeros(N, dtype=torch.int64), b)
    with pytest.raises(TypeError, match="real floating"):
        log_linear_scan(torch.zeros(N, dtype=torch.complex128), b)
