"""Gradient-flow measurements: how BPTT gradients vanish or explode, and why.

* ``state_gradient_norms``: ||dL/dh_t|| against the distance from the end of the window, for
  the window loss L and for the last step's loss alone (the product of Jacobians);
* ``spectral_summary``: eigenvalues and spectral radius of W_hh, per layer and per gate block;
* ``truncation_pattern``: ||dl_s/dh_t|| for every loss s and step t of a few consecutive
  training batches, with the truncation the run actually used (which steps receive gradient
  from which losses, D2L fig. 8.7.1 drawn from a real run).

All three work on any model of the contract (torch.nn ones included): the window is run one
token at a time, so each step's state is a tensor of its own, and the logits of a step are
computed from the top layer's state, so dL/dh_t is the total gradient (output and recurrence).
h_t is the top layer's hidden state. The passes run in eval mode (no dropout, no random draw)
and take gradients with torch.autograd.grad: parameter gradients and the training run's
random streams are untouched.

Keys written into metrics.jsonl (``epoch_record``):
  diag_gnorm       [d = 0 .. T-1] mean over lanes of ||dL/dh_{T-d}||, L the window's mean loss
  diag_gnorm_last  [d = 0 .. T-1] the same for the last step's loss only
  diag_rho         {block: spectral radius of W_hh}; blocks "l0", "l1", ... or "l0.r", "l0.z",
                   "l0.n" (GRU), "l0.i", "l0.f", "l0.g", "l0.o" (LSTM)
  diag_eig         {block: the leading eigenvalues as [re, im], by decreasing modulus}
(``clipped_frac``, the fraction of steps whose gradient was clipped, is always recorded.)
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from rnnlm.models import LanguageModel, State, detach_state

LEADING_EIGENVALUES = 6


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
        logits.append(model.output(state[0][-1]))
    return logits, states


def _mean_lane_norm(g: torch.Tensor | None) -> float:
    """g: the gradient of a whole state tensor (layers, B, H); the top layer's is measured."""
    return 0.0 if g is None else float(g[-1].norm(dim=-1).mean())


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
        # the whole (layers, B, H) tensor, not a slice: every later use is a view of it
        hs = [s[0] for s in states]
        total = torch.autograd.grad(torch.stack(losses).mean(), hs, retain_graph=True)
        last = torch.autograd.grad(losses[-1], hs, allow_unused=True)
    return ([_mean_lane_norm(g) for g in reversed(total)],
            [_mean_lane_norm(g) for g in reversed(last)])


def recurrent_blocks(model: LanguageModel) -> dict[str, torch.Tensor]:
    """W_hh of every layer split into its gate blocks (H, H), float64 on the CPU."""
    names = model.gate_names or ("",)
    blocks = {}
    for k in range(model.num_layers):
        W = model.recurrent_weight(k).detach().to("cpu", torch.float64)
        for name, block in zip(names, W.chunk(len(names), dim=0)):
            blocks[f"l{k}" + (f".{name}" if name else "")] = block
    return blocks


def eigenvalues(model: LanguageModel) -> dict[str, np.ndarray]:
    """All eigenvalues of every W_hh block, complex, by decreasing modulus."""
    out = {}
    for name, W in recurrent_blocks(model).items():
        ev = torch.linalg.eigvals(W).numpy()
        out[name] = ev[np.argsort(-np.abs(ev), kind="stable")]
    return out


def complex_pairs(ev: np.ndarray, digits: int = 5) -> list[list[float]]:
    return [[round(float(z.real), digits), round(float(z.imag), digits)] for z in ev]


def spectral_summary(model: LanguageModel, leading: int = LEADING_EIGENVALUES) -> dict:
    eig = eigenvalues(model)
    return {"diag_rho": {name: float(np.abs(ev[0])) for name, ev in eig.items()},
            "diag_eig": {name: complex_pairs(ev[:leading]) for name, ev in eig.items()}}


def epoch_record(model: LanguageModel, X: torch.Tensor, Y: torch.Tensor) -> dict:
    """The diagnostics keys of one metrics.jsonl record (module docstring)."""
    total, last = state_gradient_norms(model, X, Y)
    return {"diag_gnorm": significant(total), "diag_gnorm_last": significant(last),
            **spectral_summary(model)}


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
            hs = [s[0] for s in states]
            for s, lg in enumerate(logits):
                grads = torch.autograd.grad(F.cross_entropy(lg, Y[:, s]), hs[: s + 1],
                                            retain_graph=True, allow_unused=True)
                for t, g in enumerate(grads):
                    pattern[start + s, start + t] = _mean_lane_norm(g)
            state, start = states[-1], start + X.shape[1]
    return pattern
