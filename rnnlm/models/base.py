"""The one contract every model keeps, whatever its recurrent core.

A model maps token ids (B, T) and a state to logits (T, B, V) and the next state. The state
is always a tuple of (num_layers, B, H) tensors: (h,) for RNN/GRU, minGRU and minLSTM, (h, c)
for LSTM, (Re h, Im h) for the LRU, so the training loop never needs to know which model it
drives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

State = tuple[torch.Tensor, ...]


def keep_mask(shape: tuple[int, ...], p: float, like: torch.Tensor) -> torch.Tensor:
    """A dropout mask of `shape`: 0 with probability p, else 1 / (1 - p), on like's device and
    in its dtype. Drawn as uniform numbers compared with p rather than with bernoulli_ (what
    F.dropout and nn.Dropout draw with): on the CPU bernoulli_ took about three times as
    long for the same mask (8.4 against 2.9 ms for a million, one thread), which was a quarter
    of the held-out LSTM's training step with its four dropouts and DropConnect."""
    return torch.rand(shape, device=like.device).ge_(p).div_(1 - p).to(like.dtype)


def drop(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Dropout of every element (F.dropout's function, keep_mask's masks)."""
    if not training or p == 0:
        return x
    return x * keep_mask(x.shape, p, x)


class Dropout(nn.Module):
    """A fresh mask for every element of every step (Zaremba et al.), as nn.Dropout."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LockedDropout(nn.Module):
    """Variational dropout (Gal & Ghahramani; AWD-LSTM's "locked" dropout): one mask per lane
    and feature, shared by every time step of the window, so a dropped unit stays dropped for
    the whole sequence instead of flickering from step to step. Input (T, B, D)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * keep_mask((1, *x.shape[1:]), self.p, x)  # the small mask is scaled

    def extra_repr(self) -> str:
        return f"p={self.p}"


#: model.dropout_masks -> the dropout layer: a fresh mask for every element of every step
#: (Zaremba et al.), or one mask per lane for the whole window
DROPOUT_MASKS: dict[str, type[nn.Module]] = {"per_step": Dropout, "locked": LockedDropout}


@dataclass(frozen=True)
class Supports:
    """What a model kind can do, declared by its class and asked by the config checks
    (rnnlm.config.checks) and the run, so that nothing decides by the kind's name."""

    #: the core runs step by step in Python: per-step gradient hooks are possible, and so is
    #: randomized truncation (forward(..., xi=...), each step's dh_t/dh_(t-1) scaled by xi_t)
    step_by_step: bool = False
    #: model.backward=manual|autograd can be chosen: manual runs each layer's window with the
    #: hand-written BPTT backward (rnnlm.bptt), autograd steps through time; model.backward=
    #: auto picks manual where the run allows (fp32, eager)
    manual_backward: bool = False
    #: model.cell_kernel (auto | c | torch) applies: the windows can run their loops in C
    #: (rnnlm.kernels) with the hand-written backward. A kind that declares this without
    #: manual_backward (a torch.nn layer) runs those windows on its own weights where the C
    #: loops can run and model.cell_kernel is not torch, and its fused layer elsewhere
    c_windows: bool = False
    #: besides whole windows, one C call per step for the elementwise work, where PyTorch's
    #: BLAS cannot be reached from C; without it the C kernels need the whole-window loops
    c_steps: bool = False
    #: train.precision=bf16 (autocast of the training forward pass)
    bf16: bool = True
    #: under bf16 on a CPU the C windows run, with bf16 recurrent products (where c_windows);
    #: False: a torch.nn kind runs its own layer under autocast instead (nn.LSTM's fused
    #: oneDNN kernel measured faster in bf16 than the windows)
    c_windows_bf16: bool = True
    #: train.compile (torch.compile of the training model)
    compile: bool = True
    #: train.batch_shards=auto splits batches across cores (one lane group per core); False
    #: where the layer already keeps every core busy and sharding was measured to lose
    auto_shards: bool = True
    #: where auto_shards is False: auto splits all the same when the run's windows will use
    #: the C kernels (c_windows), whose single-threaded loops shard as the scratch kinds' do
    auto_shards_on_c_windows: bool = False
    #: model.weight_dropout (DropConnect on a dense W_hh); False where the recurrence is
    #: diagonal and there is no such matrix
    weight_dropout: bool = True
    #: train.ar / train.tar: forward(..., activations=True) also returns the top layer's
    #: outputs before and after output dropout, the recurrent state's own values
    activation_penalties: bool = True

    @property
    def randomized_truncation(self) -> bool:
        return self.step_by_step


class LanguageModel(nn.Module):
    """Input encoding -> recurrent core (subclass) -> linear output layer."""

    #: number of tensors in the state: 1 for RNN/GRU, 2 for LSTM (and the LRU's complex h)
    state_size: int = 1
    #: what this kind can do (rnnlm.config.checks asks it)
    supports: Supports = Supports()
    #: the fewest layers at which model.dropout acts: 2 where it sits between stacked
    #: layers (a one-layer model has none), 1 where every layer has it (train.rdrop asks)
    dropout_from_layers: int = 2
    #: model.activation values this kind offers
    activations: tuple[str, ...] = ("tanh",)
    #: the kind that computes the same function step by step from the same state_dict (a
    #: torch.nn layer's from-scratch twin), offered where this kind lacks a capability
    twin: str | None = None
    #: names of the gate blocks stacked in the rows of W_hh (empty: one block, a plain RNN)
    gate_names: tuple[str, ...] = ()

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, embedding_dim: int | None = None,
                 activation: str = "tanh", input_dropout: float = 0.0,
                 output_dropout: float = 0.0, weight_dropout: float = 0.0,
                 dropout_masks: str = "per_step"):
        super().__init__()
        if activation not in self.activations:
            raise ValueError(f"{type(self).__name__} offers activation {self.activations}, "
                             f"got {activation!r}")
        self.activation = activation
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_layers, self.dropout = num_layers, dropout
        self.embedding_dim = embedding_dim
        self.embedding = nn.Embedding(vocab_size, embedding_dim) if embedding_dim else None
        if input_dropout and self.embedding is None:
            raise ValueError("input dropout needs an embedding (one-hot input is not dropped)")
        self.input_size = embedding_dim or vocab_size
        if dropout_masks not in DROPOUT_MASKS:
            raise ValueError(f"dropout_masks must be one of {tuple(DROPOUT_MASKS)}, "
                             f"got {dropout_masks!r}")
        self.dropout_masks = dropout_masks
        # Dropout on the input embeddings and on the top layer's outputs (Zaremba et al.);
        # `dropout` only acts between stacked layers, so a one-layer model had none.
        self.input_dropout = self.make_dropout(input_dropout)
        self.output_dropout = self.make_dropout(output_dropout)
        # DropConnect on the hidden-to-hidden weights (AWD-LSTM's weight drop), applied by the
        # recurrent core: one mask per forward call, shared by every time step.
        self.weight_dropout = weight_dropout
        self.output = nn.Linear(hidden_size, vocab_size)

    def make_dropout(self, p: float) -> nn.Module:
        """A dropout layer for (T, B, D) activations with this model's kind of masks."""
        return DROPOUT_MASKS[self.dropout_masks](p)

    def begin_state(self, batch_size: int) -> State:
        """Fresh zero state on the model's device and dtype."""
        w = self.output.weight
        return tuple(w.new_zeros(self.num_layers, batch_size, self.hidden_size)
                     for _ in range(self.state_size))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> time-major input: ids (T, B) for one-hot cores that gather weight
        columns instead of multiplying by one-hot vectors, or embeddings (T, B, E)."""
        x = tokens.t()
        return self.input_dropout(self.embedding(x)) if self.embedding is not None else x

    def one_hot(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x, self.vocab_size).to(self.output.weight.dtype)

    def core(self, x: torch.Tensor, state: State,
             xi: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """(T, B, ...) input and state -> top-layer outputs (T, B, H) and the next state.

        xi (T,), randomized truncation: step t's dh_t/dh_{t-1} is scaled by xi[t] in the
        backward pass (every layer's, so a gradient path crossing step t is cut or scaled
        once). Only step-by-step cores accept it."""
        raise NotImplementedError

    def recurrent_weight(self, layer: int) -> torch.Tensor:
        """W_hh of one layer, (len(gate_names) or 1) * H rows by H columns, torch.nn layout."""
        raise NotImplementedError

    def eigenvalues(self, layer: int) -> dict[str, torch.Tensor]:
        """The eigenvalues of one layer's recurrence, complex128 on the CPU, per block of W_hh:
        {gate name: eigenvalues of its H x H block}, or {"": ...} for one block. Here those of
        recurrent_weight's blocks; a diagonal recurrence gives its diagonal exactly."""
        W = self.recurrent_weight(layer).detach().to("cpu", torch.float64)
        names = self.gate_names or ("",)
        return {name: torch.linalg.eigvals(block)
                for name, block in zip(names, W.chunk(len(names), dim=0))}

    def hidden(self, state: State) -> State:
        """The tensors of `state` that together are the hidden state h_t whose gradient the
        diagnostics measure: (h,) here, so the LSTM's memory cell c is not counted; a kind
        whose h is held in several tensors (the LRU's Re h and Im h) returns all of them."""
        return state[:1]

    def recurrence_coefficients(self, tokens: torch.Tensor,
                                state: State) -> list[torch.Tensor] | None:
        """Each layer's coefficients a_t of a diagonal recurrence h_t = a_t * h_{t-1} + b_t over
        the window `tokens` (B, T) started from `state`: one (T, B, N) tensor per layer, complex
        where the recurrence is, without gradients (the caller chooses the mode: the
        diagnostics measure in eval mode, without dropout). Where a_t depends
        on the input (minGRU's 1 - z_t) they are the eigenvalues of that step's diagonal W_hh;
        where it does not (the LRU) every step repeats `eigenvalues`. None, this default: W_hh
        is a dense matrix, and `eigenvalues` is all there is to draw."""
        return None

    def step_logits(self, token: torch.Tensor, state: State) -> torch.Tensor:
        """Logits (B, V) of the step whose input was token (B,) and whose state after it is
        `state`, computed from that state (the diagnostics differentiate through it, so that
        dL/dh_t takes in the output's path as well as the recurrence's), with no dropout (they
        run in eval mode). Here the top layer's h is the core's output."""
        return self.output(state[0][-1])

    def no_weight_decay(self) -> set[str]:
        """Names (as named_parameters gives them) of the parameters train.weight_decay leaves
        alone: those its submodules list in a NO_WEIGHT_DECAY class attribute (e.g. the LRU's
        eigenvalue parameters); none for the classic kinds, which decay every weight."""
        return {f"{prefix}.{name}" if prefix else name
                for prefix, module in self.named_modules()
                for name in getattr(module, "NO_WEIGHT_DECAY", ())}

    def forward(self, tokens: torch.Tensor, state: State, xi: torch.Tensor | None = None,
                activations: bool = False):
        """(logits (T, B, V), state); with `activations` also (hidden, dropped): the top
        layer's outputs (T, B, H) before and after output dropout, for train.ar/tar."""
        hidden, state = self.core(self.encode(tokens), state, xi)
        dropped = self.output_dropout(hidden)
        logits = self.output(dropped)
        return (logits, state, (hidden, dropped)) if activations else (logits, state)

    def decoder(self) -> Decoder:
        """Generation's one-step decoder: feed(ids) and step(token_id) -> logits (1, V),
        carrying the state (batch of one); building it puts the model in eval mode.

        Each kind hands out the fastest decoder that runs its own functions, so generation
        cannot drift from training; this default runs the model on a window of one token."""
        return Decoder(self)


class Decoder:
    """step(token_id) -> logits (1, V), advancing an internal state (batch of one).

    The model itself on a window of one token. Building a decoder puts the model in eval
    mode (decoding is inference: no dropout); the caller restores the mode it wants.
    """

    def __init__(self, model: LanguageModel):
        model.eval()
        self.model = model
        self.state: State = model.begin_state(1)
        self.device = model.output.weight.device

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Run a whole prefix (1-D ids) as one window; logits of its last position (1, V)."""
        logits, self.state = self.model(ids.view(1, -1).to(self.device), self.state)
        return logits[-1]

    @torch.no_grad()
    def step(self, token_id: int) -> torch.Tensor:
        token = torch.tensor([[token_id]], device=self.device)
        logits, self.state = self.model(token, self.state)
        return logits[-1]


def detach_state(state: State) -> State:
    """Cut the graph at a batch boundary (regular truncated BPTT)."""
    return tuple(s.detach() for s in state)
