"""Gradient-flow measurements: how BPTT gradients vanish or explode, and why.

* ``state_gradient_norms``: ||dL/dh_t|| against the distance from the end of the window, for
  the window loss L and for the last step's loss alone (the product of Jacobians);
* ``spectral_summary``: eigenvalues and spectral radius of W_hh, per layer and per gate block;
* ``diagonal_summary``: for a diagonal recurrence (LRU, minGRU, minLSTM) all N eigenvalues
  of every layer, and the distribution of its per-step coefficients a_t over a held-out batch
  (for minGRU and minLSTM a_t = 1 - z_t depends on the input; for the LRU a_t = lambda);
* ``truncation_pattern``: ||dl_s/dh_t|| for every loss s and step t of a few consecutive
  training batches, with the truncation the run actually used (which steps receive gradient
  from which losses, D2L fig. 8.7.1 drawn from a real run).

All of them work on any model of the contract (torch.nn ones included): the window is run one
token at a time, so each step's state is a tensor of its own, and the logits of a step are
computed from that state (LanguageModel.step_logits), so dL/dh_t is the total gradient (output
and recurrence). h_t is the top layer's hidden state, made of the state tensors that
LanguageModel.hidden names: h for the RNN, GRU and LSTM (not the LSTM's cell c), both Re h and
Im h for the LRU, so that its norm is the complex state's. The eigenvalues are each model's
own (LanguageModel.eigenvalues): of W_hh's gate blocks, or the exact diagonal of a linear
recurrence. The passes run in eval mode (no dropout, no random draw) and take gradients with
torch.autograd.grad: parameter gradients and the training run's random streams are untouched.

Keys written into metrics.jsonl (``epoch_record``):
  diag_gnorm       [d = 0 .. T-1] mean over lanes of ||dL/dh_{T-d}||, L the window's mean loss
  diag_gnorm_last  [d = 0 .. T-1] the same for the last step's loss only
  diag_rho         {block: spectral radius of W_hh}; blocks "l0", "l1", ... or "l0.r", "l0.z",
                   "l0.n" (GRU), "l0.i", "l0.f", "l0.g", "l0.o" (LSTM)
  diag_eig         {block: the leading eigenvalues as [re, im], by decreasing modulus}
and for the kinds whose recurrence is diagonal (LanguageModel.recurrence_coefficients):
  diag_lambda      {layer: all N eigenvalues as [re, im], by decreasing modulus} (the LRU's
                   lambda exactly; minGRU's and minLSTM's a at zero input)
  diag_a           {layer: {"mean": [re, im] per channel, the mean of a_t over the held-out
                   batch; "hist": the fraction of all a_t whose |a_t| falls in each of
                   A_BINS equal bins of [0, 1]; "max": the largest |a_t|; "input_dependent":
                   whether a_t differs between steps or lanes}}
(``clipped_frac``, the fraction of steps whose gradient was clipped, is always recorded.)
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from rnnlm.models import LanguageModel, State, detach_state

LEADING_EIGENVALUES = 6
A_BINS = 50  # bins of |a_t| on [0, 1] in diag_a's histograms


@contextmanager
def eval_mode(model: LanguageModel):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def diagnostic_batch(ids: np.ndarray, batch_size: int, num_steps: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch, the same every epoch: lane b is the window starting at b * num_steps."""
    starts = np.arange(batch_size)[:, None] * num_steps + np.arange(num_steps)
    ids = np.asarray(ids, dtype=np.int64)
    return torch.from_numpy(ids[starts]), torch.from_numpy(ids[starts + 1])


def _run_steps(model: LanguageModel, X: torch.Tensor, state: State,
               xi: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[State]]:
    """One window token by token: per-step logits (B, V) read from the top state, and states."""
    logits, states = [], []
    for t in range(X.shape[1]):
        _, state = model(X[:, t: t + 1], state, xi=None if xi is None else xi[t: t + 1])
        states.append(state)
        logits.append(model.step_logits(X[:, t], state))
    return logits, states


def _mean_lane_norm(grads) -> float:
    """grads: the gradients of the tensors that make up h (LanguageModel.hidden), each of a
    whole state tensor (layers, B, H), None where none flowed; the top layer's is measured,
    its norm taken over all of them (for Re h and Im h: the norm of the complex gradient)."""
    squares = [g[-1].square().sum(dim=-1) for g in grads if g is not None]
    return 0.0 if not squares else float(torch.stack(squares).sum(dim=0).sqrt().mean())


def _hidden_grads(model: LanguageModel, loss: torch.Tensor, states: list[State],
                  retain_graph: bool) -> list[tuple]:
    """d loss / dh_t for each step's state: per step, the gradients of model.hidden's tensors
    (whole (layers, B, H) tensors, not slices: every later use is a view of them)."""
    parts = [model.hidden(s) for s in states]
    flat = torch.autograd.grad(loss, [t for p in parts for t in p], retain_graph=retain_graph,
                               allow_unused=True)
    grads, start = [], 0
    for p in parts:
        grads.append(flat[start: start + len(p)])
        start += len(p)
    return grads


def state_gradient_norms(model: LanguageModel, X: torch.Tensor, Y: torch.Tensor
                         ) -> tuple[list[float], list[float]]:
    """(total, last): mean-over-lanes ||dL/dh_t|| indexed by distance d from the window's end
    (d = 0 is the last step), for L = the window's mean cross-entropy and for the last step's
    loss only. Starts from a zero state."""
    device = model.output.weight.device
    X, Y = X.to(device), Y.to(device)
    with eval_mode(model), torch.enable_grad():
        logits, states = _run_steps(model, X, model.begin_state(X.shape[0]))
        losses = [F.cross_entropy(lg, Y[:, t]) for t, lg in enumerate(logits)]
        total = _hidden_grads(model, torch.stack(losses).mean(), states, retain_graph=True)
        last = _hidden_grads(model, losses[-1], states, retain_graph=False)
    return ([_mean_lane_norm(g) for g in reversed(total)],
            [_mean_lane_norm(g) for g in reversed(last)])


def eigenvalues(model: LanguageModel) -> dict[str, np.ndarray]:
    """All eigenvalues of every layer's W_hh blocks, complex, by decreasing modulus."""
    out = {}
    for k in range(model.num_layers):
        for name, ev in model.eigenvalues(k).items():
            ev = ev.numpy()
            out[f"l{k}" + (f".{name}" if name else "")] = ev[np.argsort(-np.abs(ev),
                                                                        kind="stable")]
    return out


def complex_pairs(ev: np.ndarray, digits: int = 5) -> list[list[float]]:
    return [[round(float(z.real), digits), round(float(z.imag), digits)] for z in ev]


def spectral_summary(model: LanguageModel, leading: int = LEADING_EIGENVALUES) -> dict:
    eig = eigenvalues(model)
    return {"diag_rho": {name: float(np.abs(ev[0])) for name, ev in eig.items()},
            "diag_eig": {name: complex_pairs(ev[:leading]) for name, ev in eig.items()}}


def coefficient_summary(model: LanguageModel, X: torch.Tensor) -> dict | None:
    """diag_a (module docstring) over the windows X (B, T), each from a zero state; None for a
    model whose W_hh is dense."""
    device = model.output.weight.device
    X = X.to(device)
    with eval_mode(model):
        layers = model.recurrence_coefficients(X, model.begin_state(X.shape[0]))
    if layers is None:
        return None
    out = {}
    for k, a in enumerate(layers):
        a = a.detach().to("cpu", torch.complex128).flatten(0, 1)  # (T * B, N)
        modulus = a.abs().numpy().ravel()
        counts, _ = np.histogram(np.clip(modulus, 0.0, 1.0), bins=A_BINS, range=(0.0, 1.0))
        out[f"l{k}"] = {"mean": complex_pairs(a.mean(dim=0).numpy(), 6),
                        "hist": significant(counts / modulus.size, 4),
                        "max": float(modulus.max()),
                        "input_dependent": bool((a != a[:1]).any())}
    return out


def diagonal_summary(model: LanguageModel, X: torch.Tensor) -> dict:
    """diag_lambda and diag_a (module docstring) for a diagonal recurrence; {} for a dense
    W_hh, whose leading eigenvalues diag_eig already holds."""
    coefficients = coefficient_summary(model, X)
    if coefficients is None:
        return {}
    return {"diag_lambda": {name: complex_pairs(ev, 6) for name, ev in eigenvalues(model).items()},
            "diag_a": coefficients}


def epoch_record(model: LanguageModel, X: torch.Tensor, Y: torch.Tensor,
                 heldout: torch.Tensor | None = None) -> dict:
    """The diagnostics keys of one metrics.jsonl record (module docstring); diag_a over the
    windows `heldout` (default: X)."""
    total, last = state_gradient_norms(model, X, Y)
    return {"diag_gnorm": significant(total), "diag_gnorm_last": significant(last),
            **spectral_summary(model), **diagonal_summary(model, X if heldout is None else heldout)}


def significant(values, digits: int = 5) -> list[float]:
    """Round to significant digits, not decimals: vanishing gradients stay visible."""
    return [float(f"{v:.{digits}g}") for v in values]


def truncation_pattern(model: LanguageModel, windows, carry_state: bool) -> np.ndarray:
    """||dl_s/dh_t|| (S, S) over consecutive training windows of one lane, as trained.

    windows: [(X (1, T_i), Y (1, T_i), xi (T_i,) or None)] in training order. The state is
    carried and detached between windows (carry_state) or fresh for each one, as the trainer
    does, and xi cuts or scales the steps as in training. Row s = the loss at global step s,
    column t = the state at global step t; exact zeros mean no gradient reaches h_t from l_s.
    """
    device = model.output.weight.device
    total = sum(X.shape[1] for X, _, _ in windows)
    pattern = np.zeros((total, total))
    state, start = None, 0
    with eval_mode(model), torch.enable_grad():
        for X, Y, xi in windows:
            X, Y = X.to(device), Y.to(device)
            if state is None or not carry_state:
                state = model.begin_state(1)
            else:
                state = detach_state(state)
            if xi is not None:
                xi = xi.to(device=device, dtype=model.output.weight.dtype)
            logits, states = _run_steps(model, X, state, xi)
            for s, lg in enumerate(logits):
                grads = _hidden_grads(model, F.cross_entropy(lg, Y[:, s]), states[: s + 1],
                                      retain_graph=True)
                for t, g in enumerate(grads):
                    pattern[start + s, start + t] = _mean_lane_norm(g)
            state, start = states[-1], start + X.shape[1]
    return pattern
