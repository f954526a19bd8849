"""Recurrences linear in h, trained by parallel scan: the LRU (Orvieto et al. 2023, "Resurrecting
Recurrent Neural Networks for Long Sequences") and minGRU and minLSTM (Feng et al. 2024, "Were
RNNs All We Needed?") behind the model contract of base.py.

Every layer's state follows h_t = a_t * h_{t-1} + b_t elementwise, so its W_hh is diagonal and
the a's are its eigenvalues, exactly: the LRU's lambda = exp(-exp(nu) + i*theta) and minGRU's
1 - z_t lie inside the unit disk by construction, so D2L 8.7's powers of W_hh^T can vanish but
never explode. And because each step is an affine map of h, a whole window is one associative
scan started from the carried state (rnnlm.bptt.scan) instead of T dependent steps.

The network (the same for the three kinds; width d = model.hidden_size, depth model.num_layers):

    tokens -> embedding (model.embedding_dim; one-hot input is a lookup of a V x d table)
           -> encoder Linear(E, d) (left out when E = d)
           -> num_layers x residual block:   u = u + drop(recurrence(LayerNorm(u)))
                                             u = u + drop(GLU-MLP(LayerNorm(u)))
           -> final LayerNorm -> the contract's `output` Linear(d, V)

`drop` is model.dropout on each residual branch (the residual stream itself is never dropped);
the MLP is position-wise, d -> 2d GELU-gated units -> d. The recurrences (state size d, so the
state keeps the contract's (num_layers, B, hidden_size) shape):

* LRU: h_t = lambda * h_{t-1} + gamma * (B x_t), complex; y_t = Re(C h_t) + D * x_t.
  lambda = exp(-exp(nu_log) + i * exp(theta_log)) per channel, ring initialisation: |lambda|
  uniform in area between R_MIN and R_MAX, phase uniform in [0, MAX_PHASE]; gamma = exp(
  gamma_log), initialised to sqrt(1 - |lambda|^2) (so that white noise of unit variance gives
  a state of unit variance whatever |lambda|) and trained, as the paper does. State (Re h,
  Im h).
* minGRU: z_t = sigmoid(k_t), h_t = (1 - z_t) * h_{t-1} + z_t * g(p_t), with k, p linear in
  x_t (the gate depends on the input only), then y_t = Linear(h_t). g(p) = p + 0.5 for p >= 0,
  sigmoid(p) below: the paper's positive candidate of its log-space version, used by every
  path here so that all of them compute the same function. State (h,).
* minLSTM: f_t, i_t = sigmoid of two linear maps of x_t, normalised to f' = f / (f + i) and
  i' = i / (f + i); h_t = f' * h_{t-1} + i' * g(p_t), y_t = Linear(h_t). State (h,).

How a window runs (model.backward): "manual" (auto's choice) is the parallel scan with the
hand-written BPTT backward (rnnlm.bptt.scan.manual_linear_scan); "autograd" differentiates
the scan as recorded: the LRU's complex linear scan, and for minGRU and minLSTM the paper's
log-space scan (log_linear_scan on log a, log b; the carried state enters linearly, so it may
have any sign). "loop", offered to tests only, is the step-by-step recurrence the scans must
equal. None of these kinds steps through time in Python, so randomized truncation (a per-step
xi) and the C kernels are not offered; bf16 and compile are untested and refused (Supports
below), and so is DropConnect: there is no W_hh matrix to drop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rnnlm.bptt.scan import (
    linear_recurrence_loop,
    linear_scan,
    log_linear_scan,
    manual_linear_scan,
)
from rnnlm.models.base import LanguageModel, State, Supports

#: model.backward (and "loop", the tests' reference) -> the scan that runs a window in linear
#: space; "autograd" of a positive recurrence (minGRU, minLSTM) runs in log space instead
LINEAR_SCANS = {"manual": manual_linear_scan, "autograd": linear_scan,
                "loop": linear_recurrence_loop}


def g(p: torch.Tensor) -> torch.Tensor:
    """Feng et al.'s positive activation: p + 0.5 for p >= 0, sigmoid(p) below (continuous at 0)."""
    return torch.where(p >= 0, p + 0.5, torch.sigmoid(p))


def log_g(p: torch.Tensor) -> torch.Tensor:
    """log g(p), without forming g (relu keeps the unused branch's log finite)."""
    return torch.where(p >= 0, torch.log(F.relu(p) + 0.5), -F.softplus(-p))


class Recurrence(nn.Module):
    """One layer's time mixing: input projections, h_t = a_t * h_{t-1} + b_t over the window,
    and the readout y_t of h_t (and x_t). Subclasses say how a, b and y are made, and how the
    layer's part of the contract's state tensors (to_state, from_state) holds h."""

    def coefficients(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of the window's recurrence from its normalised input v (T, B, H)."""
        raise NotImplementedError

    def log_coefficients(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(log a, log b) where the recurrence is positive (minGRU, minLSTM), else None."""
        return None

    def readout(self, hs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The layer's output y (T, B, H) from its states hs and its input v."""
        raise NotImplementedError

    def to_state(self, state: State) -> torch.Tensor:
        """The carried state tensors of this layer (B, H) each -> h0 of the scan."""
        return state[0]

    def from_state(self, h: torch.Tensor) -> State:
        """h of the last step -> the state tensors carried to the next window."""
        return (h,)

    def eigenvalues(self) -> torch.Tensor:
        """The diagonal of W_hh, complex128 on the CPU: the recurrence's eigenvalues."""
        raise NotImplementedError

    def forward(self, v: torch.Tensor, state: State, how: str) -> tuple[torch.Tensor, State]:
        h0 = self.to_state(state)
        logs = self.log_coefficients(v) if how == "autograd" else None
        if logs is not None:
            log_a, log_b = logs
            # The paper's log-space scan covers the part started from zero; the carried state
            # enters linearly, h_t = (a_1 * ... * a_t) * h0 + scan_t, so it may be negative
            # (a test's random state) or zero (a fresh one: log 0 is not needed).
            hs = torch.exp(log_linear_scan(log_a, log_b)) + torch.exp(log_a.cumsum(0)) * h0
        else:
            a, b = self.coefficients(v)
            hs = LINEAR_SCANS[how](a, b, h0)
        return self.readout(hs, v), self.from_state(hs[-1])


class LRURecurrence(Recurrence):
    """The LRU's complex diagonal recurrence with its projections B, C, D (Orvieto et al.).

    Ring initialisation for character-level text: R_MIN = 0.5 gives channels that forget
    within a character or two (the spelling of the current word, which matters most for the
    next character), R_MAX = 0.999 channels that keep ~1,000 steps (sentences, beyond the
    64-step training window, reached through the carried state). The paper's 0.9 lower end
    (its tasks are pixels and long-range puzzles) would leave no channel shorter than 10
    steps. The radius is uniform in area between the two, as the paper samples it: time
    constants -1 / log|lambda| under 5 steps for about half the channels, over 10 for a
    quarter, over 100 for 2-3%. MAX_PHASE = pi is the paper's default, rotation periods from
    2 steps up; its small phases (pi / 10) were for PathX's thousands of steps, not for text.
    """

    R_MIN, R_MAX, MAX_PHASE = 0.5, 0.999, math.pi
    #: the recurrence's own parameters, which train.weight_decay leaves alone (as the paper
    #: does): decay would pull nu_log towards 0, that is every |lambda| towards e^-1 = 0.37,
    #: and shorten the memory the ring initialisation gave
    NO_WEIGHT_DECAY = ("nu_log", "theta_log", "gamma_log")

    def __init__(self, width: int):
        super().__init__()
        n = width  # the state is as wide as the model (the contract's hidden_size)
        radius_sq = torch.rand(n) * (self.R_MAX ** 2 - self.R_MIN ** 2) + self.R_MIN ** 2
        phase = self.MAX_PHASE * (1 - torch.rand(n))  # (0, MAX_PHASE]: its log is finite
        self.nu_log = nn.Parameter(torch.log(-0.5 * torch.log(radius_sq)))  # |lambda| = e^-e^nu
        self.theta_log = nn.Parameter(torch.log(phase))
        self.gamma_log = nn.Parameter(0.5 * torch.log(1 - radius_sq))
        # The paper's scales: B's rows mix a d-wide real input into a complex channel, C's rows
        # read n complex channels.
        self.b_re = nn.Parameter(torch.randn(n, width) / math.sqrt(2 * width))
        self.b_im = nn.Parameter(torch.randn(n, width) / math.sqrt(2 * width))
        self.c_re = nn.Parameter(torch.randn(width, n) / math.sqrt(n))
        self.c_im = nn.Parameter(torch.randn(width, n) / math.sqrt(n))
        self.d = nn.Parameter(torch.randn(width))

    def diagonal(self) -> torch.Tensor:
        """lambda (n,), complex."""
        return torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))

    def coefficients(self, v):
        gamma = torch.exp(self.gamma_log)[:, None]
        # gamma * (B v) as one real matmul: gamma scales B's rows, real and imaginary parts
        # side by side
        bv = F.linear(v, torch.cat((gamma * self.b_re, gamma * self.b_im)))
        re, im = bv.chunk(2, dim=-1)
        return self.diagonal(), torch.complex(re, im)  # lambda broadcasts over (T, B)

    def readout(self, hs, v):
        # Re(C h) = C_re Re h - C_im Im h: one matmul over the (re, im) pairs that
        # view_as_real lays side by side, no copy of hs
        weight = torch.stack((self.c_re, -self.c_im), dim=-1).flatten(-2)  # (d, 2n)
        return F.linear(torch.view_as_real(hs).flatten(-2), weight) + self.d * v

    def to_state(self, state):
        return torch.complex(state[0], state[1])

    def from_state(self, h):
        return (h.real, h.imag)

    def eigenvalues(self):
        return self.diagonal().detach().to("cpu", torch.complex128)


class MinGRURecurrence(Recurrence):
    """minGRU (Feng et al.): a = 1 - z = sigmoid(-d), b = z * g(p) = sigmoid(d) * g(p), with the
    gate's logit d and the candidate's p linear in the input only; y = Linear(h), because h is
    positive (a convex mixture of g's) and the residual stream is not."""

    #: gate logits computed by the input projection before the candidate's
    gate_rows = 1

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.proj = nn.Linear(width, (self.gate_rows + 1) * width)
        self.out = nn.Linear(width, width)

    def gate_logit(self, k: torch.Tensor) -> torch.Tensor:
        """d = log(z / (1 - z)) from the gate rows k (..., gate_rows * H): minGRU's k itself."""
        return k

    def split(self, v):
        k, p = self.proj(v).split((self.gate_rows * self.width, self.width), dim=-1)
        return self.gate_logit(k), p

    def coefficients(self, v):
        d, p = self.split(v)
        return torch.sigmoid(-d), torch.sigmoid(d) * g(p)

    def log_coefficients(self, v):
        d, p = self.split(v)
        return -F.softplus(d), -F.softplus(-d) + log_g(p)

    def readout(self, hs, v):
        return self.out(hs)

    def eigenvalues(self):
        """a_t depends on the input; given at zero input (the projection's bias alone): where
        each channel's coefficient rests before the input moves it, real in (0, 1)."""
        bias = self.proj.bias.detach()[: self.gate_rows * self.width]
        return torch.sigmoid(-self.gate_logit(bias)).to("cpu", torch.complex128)


class MinLSTMRecurrence(MinGRURecurrence):
    """minLSTM (Feng et al.): f = sigmoid(k_f), i = sigmoid(k_i), normalised to f' = f / (f + i)
    and i' = i / (f + i). With d = log(i / f) = softplus(-k_f) - softplus(-k_i) that is
    f' = sigmoid(-d), i' = sigmoid(d): minGRU's update with another gate logit."""

    gate_rows = 2

    def gate_logit(self, k):
        k_f, k_i = k.chunk(2, dim=-1)
        return F.softplus(-k_f) - F.softplus(-k_i)


class GatedMLP(nn.Module):
    """Position-wise GLU: d -> `expansion` * d units, each a value times GELU(its gate) -> d."""

    def __init__(self, width: int, expansion: int = 2):
        super().__init__()
        self.up = nn.Linear(width, 2 * expansion * width)
        self.down = nn.Linear(expansion * width, width)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        value, gate = self.up(v).chunk(2, dim=-1)
        return self.down(value * F.gelu(gate))


class Block(nn.Module):
    """One residual layer's modules; LinearRecurrentLM.core spells out how they connect."""

    def __init__(self, width: int, recurrence: Recurrence):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.recurrence = recurrence
        self.norm2 = nn.LayerNorm(width)
        self.mlp = GatedMLP(width)


class LinearRecurrentLM(LanguageModel):
    """Embedding, encoder, residual blocks around a linear recurrence, final norm, output."""

    recurrence_class: type[Recurrence] = MinGRURecurrence
    # Whole windows by scan, never step by step in Python: no per-step xi (randomized
    # truncation), no C windows. bf16 and compile are untested (complex numbers, custom
    # autograd Function); sharding by lanes is correct but unmeasured, so auto leaves it off.
    # The top output is the final LayerNorm's, not a recurrent state: AR/TAR on it would
    # penalise the norm's gain, not the recurrence's activations.
    supports = Supports(manual_backward=True, bf16=False, compile=False, auto_shards=False,
                        weight_dropout=False, activation_penalties=False)
    dropout_from_layers = 1  # model.dropout is on every block's residual branches

    def __init__(self, vocab_size, hidden_size, num_layers=1, dropout=0.0, embedding_dim=None,
                 backward: str = "manual", **options):
        super().__init__(vocab_size, hidden_size, num_layers, dropout, embedding_dim, **options)
        if self.weight_dropout:
            raise ValueError(f"{type(self).__name__} has no W_hh for DropConnect "
                             f"(weight_dropout): its recurrence is diagonal")
        if backward not in LINEAR_SCANS:
            raise ValueError(f"backward must be one of {tuple(LINEAR_SCANS)}, got {backward!r}")
        self.backward = backward
        # One-hot input times the encoder's matrix is a row of it: a V x d lookup table.
        if embedding_dim is None:
            self.encoder: nn.Module = nn.Embedding(vocab_size, hidden_size)
        elif embedding_dim != hidden_size:
            self.encoder = nn.Linear(embedding_dim, hidden_size)
        else:
            self.encoder = nn.Identity()  # a second d x d map after the embedding adds nothing
        self.blocks = nn.ModuleList(Block(hidden_size, self.recurrence_class(hidden_size))
                                    for _ in range(num_layers))
        self.between = self.make_dropout(dropout)  # on every residual branch
        self.norm = nn.LayerNorm(hidden_size)
        # Small output weights: the first loss is close to log V (as for the scratch models)
        # instead of paying for random logits of unit variance after the final norm.
        nn.init.normal_(self.output.weight, std=0.02)
        nn.init.zeros_(self.output.bias)

    def core(self, x, state: State, xi=None):
        if xi is not None:
            raise ValueError("randomized truncation scales each step's dh_t/dh_(t-1); "
                             f"{type(self).__name__} runs its windows as one scan")
        return self.run_blocks(self.encoder(x), state)

    def run_blocks(self, u: torch.Tensor, state: State,
                   coefficients: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, State]:
        """The residual blocks on the encoded input u (T, B, d): the final norm's output and
        the next state. With a list for `coefficients`, each layer's a_t (T, B, N) is appended
        to it (recurrence_coefficients)."""
        finals = []
        for k, block in enumerate(self.blocks):
            v = block.norm1(u)
            if coefficients is not None:
                a, b = block.recurrence.coefficients(v)
                coefficients.append(torch.broadcast_to(a, b.shape))
            y, final = block.recurrence(v, tuple(s[k] for s in state), self.backward)
            u = u + self.between(y)
            u = u + self.between(block.mlp(block.norm2(u)))
            finals.append(final)
        return self.norm(u), tuple(torch.stack(parts) for parts in zip(*finals))

    def hidden(self, state: State) -> State:
        """Every state tensor is part of h: (h,) for minGRU and minLSTM, (Re h, Im h) for the
        LRU, so a gradient's norm over them is that of the whole (complex) state."""
        return state

    @torch.no_grad()
    def recurrence_coefficients(self, tokens: torch.Tensor,
                                state: State) -> list[torch.Tensor]:
        """Each layer's a_t (T, B, N) over the window: the LRU's lambda at every step, minGRU's
        and minLSTM's 1 - z_t (f'_t), which the layer's input decides."""
        coefficients: list[torch.Tensor] = []
        self.run_blocks(self.encoder(self.encode(tokens)), state, coefficients)
        return coefficients

    def step_logits(self, token: torch.Tensor, state: State) -> torch.Tensor:
        """The logits of the step whose input was token (B,) and whose state after it is
        `state`, read from that state, with no dropout: each layer's output is a function of its
        own h_t and its input, so no recurrence runs here."""
        u = self.encoder(token[None] if self.embedding is None else self.embedding(token[None]))
        for k, block in enumerate(self.blocks):
            rec = block.recurrence
            h = rec.to_state(tuple(s[k] for s in state))[None]  # (1, B, n)
            u = u + rec.readout(h, block.norm1(u))
            u = u + block.mlp(block.norm2(u))
        return self.output(self.norm(u))[0]

    def eigenvalues(self, layer: int) -> dict[str, torch.Tensor]:
        """The exact diagonal of the layer's W_hh (module docstring; minGRU and minLSTM at zero
        input): one block."""
        return {"": self.blocks[layer].recurrence.eigenvalues()}

    def recurrent_weight(self, layer: int) -> torch.Tensor:
        """W_hh: the diagonal matrix of `eigenvalues` (complex for the LRU)."""
        return torch.diag(self.blocks[layer].recurrence.eigenvalues())


class LRU(LinearRecurrentLM):
    recurrence_class = LRURecurrence
    state_size = 2  # (Re h, Im h): LRURecurrence.to_state, from_state


class MinGRU(LinearRecurrentLM):
    recurrence_class = MinGRURecurrence


class MinLSTM(LinearRecurrentLM):
    recurrence_class = MinLSTMRecurrence
