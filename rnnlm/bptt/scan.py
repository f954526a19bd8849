"""Diagonal linear recurrences over a whole window: the step-by-step loop, the parallel scan,
the scan in log space, and their backpropagation through time written by hand.

The recurrence, elementwise over any trailing shape, time-major (dim 0 is time):

    h_t = a_t * h_{t-1} + b_t,    t = 1..T,    h_0 the carried state

Holds:
* ``linear_recurrence_loop``: the recurrence one step after another (the reference);
* ``linear_scan``: the same h_1..h_T by a parallel associative scan, recorded by autograd;
* ``ManualLinearScan`` / ``manual_linear_scan``: the scan with the BPTT backward written out;
* ``diagonal_state_grads``: D2L 8.7's step 3 for this recurrence, dL/dh_t by a reverse scan;
* ``diagonal_closed_form_state_grads``: the same as the explicit sum (quadratic; tests, docs);
* ``log_linear_scan`` / ``log_linear_recurrence_loop``: for positive a, b, h_0 (minGRU,
  minLSTM) the scan and its reference on log h, log a, log b.

The textbook story. For h_t = W_hh h_{t-1} + W_hx x_t, D2L 8.7's step 3 sends the loss at
step i back to h_t through (W_hh^T)^(i-t), and the eigenvalues of W_hh decide whether that
vanishes or explodes, only through bounds and only after a change of basis. When the
recurrence is diagonal, W_hh = diag(lambda) (the LRU's complex lambda, minGRU's 1 - z_t),
the matrix powers are elementwise powers: every channel is its own one-dimensional
recurrence and

    dL/dh_t = sum_{i >= t} lambda^(i-t) * dL/dh_i(direct)      (elementwise; a product of
                                                                 the a_j when they vary in t)

so |lambda| < 1 makes that channel's gradient vanish geometrically with the distance i - t
and |lambda| > 1 makes it explode, exactly and channel by channel: the lambdas are the
eigenvalues, and a model that keeps them inside the unit disk by construction cannot explode.

Why a scan works: the recurrence is linear in h, so step t is the affine map
h -> a_t * h + b_t, and composing affine maps is associative,
(a2, b2) o (a1, b1) = (a2 * a1, a2 * b1 + b2). All T prefixes then take about 2 log2(T)
rounds of elementwise work over the whole window (compose neighbouring pairs, recurse on the
half-length sequence, fill in the rest: Blelloch's work-efficient scan, O(T) work in all)
instead of T dependent steps. A tanh between the steps breaks the associativity, which is
why the classic RNN cannot be scanned.

The backward pass is the same recurrence run from the end of the window (step 3 again):

    g_T = dh_T,   g_t = dh_t + conj(a_{t+1}) * g_{t+1}          (a reverse scan)
    dL/db_t = g_t,   dL/da_t = g_t * conj(h_{t-1}),   dL/dh_0 = conj(a_1) * g_1

with dh_t the gradient reaching h_t directly. The conjugates are PyTorch's convention for
complex tensors (the gradient is the conjugate Wirtinger derivative, so y = a * x sends
grad_y * conj(a) to x); for real tensors they do nothing.

Shapes and dtypes. ``b`` (T, ...) with T >= 1 sets the shape of the result. ``a`` broadcasts
to ``b`` by torch's right-aligned rules: give it a leading time axis of length T to vary it
over time (e.g. (T, 1, N) against b (T, B, N)); without one (fewer dims, e.g. a constant
diagonal (N,), or a leading 1) it is the same at every step. ``h0`` broadcasts to
``b.shape[1:]``; None means zeros. Real floating or complex dtypes, promoted together; each
gradient comes back in its input's shape and dtype (summed over the dims it was broadcast
along, its real part for a real input of a complex recurrence).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without enlarging it (right-aligned)."""
    return len(shape) <= len(target) and all(
        n in (1, m) for n, m in zip(reversed(shape), reversed(target)))


def _check(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None,
           complex_ok: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """a with b's number of dims (leading 1s added), and h0; all in the promoted dtype."""
    if b.dim() == 0 or b.shape[0] == 0:
        raise ValueError(f"b must be (T, ...) with T >= 1, got {tuple(b.shape)}")
    if not _broadcasts_to(a.shape, b.shape):
        raise ValueError(f"a {tuple(a.shape)} must broadcast to b {tuple(b.shape)}")
    if h0 is not None and not _broadcasts_to(h0.shape, b.shape[1:]):
        raise ValueError(f"h0 {tuple(h0.shape)} must broadcast to {tuple(b.shape[1:])}")
    tensors = (a, b) if h0 is None else (a, b, h0)
    dtype = a.dtype
    for x in tensors:
        if not (x.is_floating_point() or (complex_ok and x.is_complex())):
            kinds = "floating or complex" if complex_ok else "real floating"
            raise TypeError(f"expected {kinds} tensors, got {x.dtype}")
        dtype = torch.promote_types(dtype, x.dtype)
    # Right-aligned broadcasting made explicit: dim 0 of a is now time, of length 1 or T.
    a = a.reshape((1,) * (b.dim() - a.dim()) + tuple(a.shape))
    return a.to(dtype), b.to(dtype), None if h0 is None else h0.to(dtype)


def _steps(a: torch.Tensor, T: int) -> list[torch.Tensor]:
    """a_1..a_T as a list. unbind, not a[t]: autograd then stacks the T step gradients once,
    where indexing would write each into a zero tensor of the whole window (quadratic in T)."""
    return list(a.unbind(0)) if a.shape[0] > 1 else [a[0]] * T


def linear_recurrence_loop(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                           reverse: bool = False) -> torch.Tensor:
    """h_1..h_T (T, ...) of h_t = a_t * h_{t-1} + b_t, one step at a time (the reference).

    reverse=True runs from the end instead: h_t = a_t * h_{t+1} + b_t with h_{T+1} = h0.
    """
    a, b, h0 = _check(a, b, h0)
    T = b.shape[0]
    a_steps, b_steps = _steps(a, T), b.unbind(0)
    h, out = h0, [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h = b_steps[t] if h is None else a_steps[t] * h + b_steps[t]
        out[t] = h.expand(b.shape[1:])  # h0 may be smaller than a state: stack needs equal shapes
    return torch.stack(out)


def _odd_even_scan(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Inclusive scan of the affine maps h -> A_t * h + B_t over dim 0, applied to zero.

    One level composes neighbouring pairs (maps 2k and 2k+1) into a sequence of half the
    length, scans that recursively (which gives every odd position), then takes each even
    position one step on from its left neighbour. ceil(log2 T) levels down and back up, O(T)
    elementwise work in all (Blelloch's work-efficient scan, written recursively). Autograd
    records it: the slice writes go into a fresh tensor. A (T, ...) broadcasts against B.
    """
    T = B.shape[0]
    if T == 1:
        return B
    m = T // 2  # number of pairs; an odd T leaves the last map unpaired
    A_odd = A[1:2 * m:2]
    odd = _odd_even_scan(A_odd * A[0:2 * m:2], torch.addcmul(B[1:2 * m:2], A_odd, B[0:2 * m:2]))
    out = torch.empty_like(B)
    out[1::2] = odd  # h at positions 1, 3, 5, ...
    out[0] = B[0]
    # h at position 2k (k >= 1) is map 2k applied to h at position 2k - 1.
    out[2::2] = torch.addcmul(B[2::2], A[2::2], odd[: (T - 1) // 2])
    return out


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                reverse: bool = False) -> torch.Tensor:
    """The same h_1..h_T as ``linear_recurrence_loop``, by a parallel scan over time.

    Differentiable by autograd, which records every level (several windows' worth of saved
    tensors; ``manual_linear_scan`` keeps only a, h0 and the states). reverse: as in the loop.
    """
    a, b, h0 = _check(a, b, h0)
    if reverse:
        return linear_scan(a.flip(0), b.flip(0), h0).flip(0)
    T = b.shape[0]
    A = a.expand((T,) + tuple(a.shape[1:]))
    if h0 is not None:
        # Fold the carried state into the first map's offset: h_1 = a_1 * h0 + b_1, so the
        # scan of the maps applied to zero is the recurrence started from h0.
        B = torch.cat(((A[0] * h0 + b[0]).expand(b.shape[1:])[None], b[1:]))
    else:
        B = b
    return _odd_even_scan(A, B)


def diagonal_state_grads(a: torch.Tensor, dhs: torch.Tensor) -> torch.Tensor:
    """dL/dh_t for t = 1..T (T, ...): D2L 8.7's step 3 for the diagonal recurrence.

    dhs[t] is the gradient reaching h_t directly (from the layer above, and at T from the
    final state); g_t = dhs_t + conj(a_{t+1}) * g_{t+1} is a reverse linear scan, so it runs
    in about 2 log2(T) rounds like the forward pass. ``a`` follows the module's broadcast rule.
    """
    a, dhs, _ = _check(a, dhs, None)
    if a.shape[0] > 1:
        # g_t takes a_{t+1}: shift by one step; the last step's coefficient multiplies
        # g_{T+1} = 0, so any value does.
        a = torch.cat((a[1:], torch.zeros_like(a[:1])))
    return linear_scan(a.conj(), dhs, None, reverse=True)


def diagonal_closed_form_state_grads(a: torch.Tensor, dhs: torch.Tensor) -> torch.Tensor:
    """dL/dh_t as the explicit sum of step 3, with no recursion (quadratic in T; tests, docs):

        dL/dh_t = sum_{i >= t} conj(a_{t+1} * ... * a_i) * dhs_i

    (for a constant over time, conj(lambda)^(i-t) * dhs_i).
    """
    a, dhs, _ = _check(a, dhs, None)
    T = dhs.shape[0]
    a_steps, out = _steps(a, T), torch.zeros_like(dhs)
    for t in range(T):
        power = torch.ones_like(a[0])
        for i in range(t, T):
            if i > t:
                power = power * a_steps[i].conj()
            out[t] = out[t] + power * dhs[i]
    return out


def _reduce_grad(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """grad summed over the dims ``like`` was broadcast along, in like's dtype."""
    if grad.is_complex() and not like.is_complex():
        grad = grad.real  # a real input of a complex recurrence: PyTorch keeps the real part
    return grad.sum_to_size(like.shape).to(like.dtype)


class ManualLinearScan(torch.autograd.Function):
    """hs = h_1..h_T by ``linear_scan``, with the backward written out (module docstring).

    forward(a, b, h0) -> hs; h0 may be None (zeros). It saves a, h0 and hs only: O(T) memory.
    Only first-order gradients (once_differentiable): the backward itself is not recorded.
    """

    @staticmethod
    def forward(ctx, a, b, h0):
        hs = linear_scan(a, b, h0)
        ctx.has_h0 = h0 is not None
        ctx.b_dtype = b.dtype
        ctx.save_for_backward(a, hs, *(() if h0 is None else (h0,)))
        return hs

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        if ctx.has_h0:
            a, hs, h0 = ctx.saved_tensors
        else:
            (a, hs), h0 = ctx.saved_tensors, None
        need_a, need_b, need_h0 = ctx.needs_input_grad[:3]
        a_t, dhs, _ = _check(a, dhs.to(hs.dtype), None)
        g = diagonal_state_grads(a_t, dhs)  # dL/dh_t, the whole of step 3

        da = db = dh0 = None
        if need_b:
            # b has the result's shape: nothing to sum, at most a real part to take.
            db = (g.real if g.is_complex() and not ctx.b_dtype.is_complex else g).to(ctx.b_dtype)
        if need_a:
            # h_{t-1} for every step: the carried state, then the window's own states.
            first = hs.new_zeros(()) if h0 is None else h0.to(hs.dtype)
            h_prev = torch.cat((first.expand(hs.shape[1:])[None], hs[:-1]))
            da = _reduce_grad(g * h_prev.conj(), a)
        if need_h0:
            dh0 = _reduce_grad(a_t[0].conj() * g[0], h0)
        return da, db, dh0


def manual_linear_scan(a: torch.Tensor, b: torch.Tensor,
                       h0: torch.Tensor | None = None) -> torch.Tensor:
    """h_1..h_T (T, ...) by the parallel scan, with the hand-written BPTT backward."""
    return ManualLinearScan.apply(a, b, h0)


def log_linear_scan(log_a: torch.Tensor, log_b: torch.Tensor,
                    log_h0: torch.Tensor | None = None) -> torch.Tensor:
    """log h_1..log h_T (T, ...) of h_t = a_t * h_{t-1} + b_t for positive a, b, h0, from
    their logs, computed in log space throughout (real dtypes; broadcasting as for a, b, h0).

    With A_t = a_1 * ... * a_t the recurrence unrolls to h_t = A_t * (h0 + sum_{s<=t} b_s / A_s),
    so log h_t = log A_t + logcumsumexp_s(log b_s - log A_s), with log h0 as the sum's first
    term and log A a cumsum. In linear space b_s / A_s overflows once the products underflow;
    in log space the terms are only added. Caveat: log A_t grows like t * |log a|, and the
    final addition cancels it, so the rounding error of log h_t grows with it (in float32
    about 2e-4 after 2,000 steps at log a = -0.7; in float64 about 1e-12).
    log_h0: None for a zero state; entries of -inf (h0 = 0) are allowed and get gradient 0.

    Autograd differentiates it. Written by hand the backward would be the linear-space one:
    dL/dlog b_t = g_t * b_t and dL/dlog a_t = g_t * a_t * h_{t-1}, with g from
    ``diagonal_state_grads`` and dh_t = dL/dlog h_t / h_t; it is left to autograd because
    g_t and 1 / h_t can overflow where the log-space forward does not.
    """
    log_a, log_b, log_h0 = _check(log_a, log_b, log_h0, complex_ok=False)
    T = log_b.shape[0]
    log_A = torch.cumsum(log_a.expand((T,) + tuple(log_a.shape[1:])), dim=0)
    terms = log_b - log_A
    if log_h0 is None:
        return log_A + torch.logcumsumexp(terms, dim=0)
    # -inf would give logcumsumexp a NaN gradient; the most negative finite value has the
    # same exp (0), and clamp_min sends the entry gradient 0, its true value.
    first = log_h0.clamp_min(torch.finfo(log_h0.dtype).min).expand(log_b.shape[1:])
    return log_A + torch.logcumsumexp(torch.cat((first[None], terms)), dim=0)[1:]


def log_linear_recurrence_loop(log_a: torch.Tensor, log_b: torch.Tensor,
                               log_h0: torch.Tensor | None = None) -> torch.Tensor:
    """The reference for ``log_linear_scan``: log h_t = logaddexp(log a_t + log h_{t-1}, log b_t),
    one step at a time, finite wherever the logs are (no exp of anything large)."""
    log_a, log_b, log_h0 = _check(log_a, log_b, log_h0, complex_ok=False)
    log_h, out = log_h0, []
    for log_a_t, log_b_t in zip(_steps(log_a, log_b.shape[0]), log_b.unbind(0)):
        log_h = log_b_t if log_h is None else torch.logaddexp(log_a_t + log_h, log_b_t)
        out.append(log_h.expand(log_b.shape[1:]))
    return torch.stack(out)
