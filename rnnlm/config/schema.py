"""The run configuration: one tree of dataclasses, every key with its default and its type.

A YAML file and `--set a.b=value` overrides change only what they name (loading.py); the
ranges and combinations are checked by checks.py. Printed at the start of a run and saved
with it (dump_yaml) and in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


@dataclass
class DataConfig:
    # None: the Time Machine (downloaded and verified when missing); else a UTF-8 text file
    # or a folder of .txt files (read in sorted order, see rnnlm/data/sources.py)
    path: str | None = None
    data_dir: str = "data"  # where the Time Machine and the token cache (data_dir/cache) live
    # d2l: D2L 0.17, the book's chapter 8 (each line cleaned, lines joined with no separator);
    # d2l_spaced: D2L 1.0 (line breaks become spaces too); raw: the text as it is
    preprocess: Literal["d2l", "d2l_spaced", "raw"] = "d2l"
    encoding_errors: Literal["strict", "replace"] = "strict"  # invalid UTF-8: error or U+FFFD
    cache: bool = True  # keep token ids in data_dir/cache, memory-mapped by later runs
    max_tokens: int | None = 10000  # D2L's default; None keeps the whole corpus
    # [train, val, test] fractions of the stream (after max_tokens), contiguous, in that
    # order; None trains on everything and evaluates nothing (D2L)
    split: list[float] | None = None
    eval_lanes: int = 1  # contiguous lanes a held-out split is read in (1: one long pass)
    iterator: Literal["sequential", "random"] = "sequential"
    batch_size: int = 32
    num_steps: int = 35


@dataclass
class ModelConfig:
    kind: str = "rnn_scratch"
    hidden_size: int = 512
    num_layers: int = 1
    # between stacked layers, as torch.nn does; lru, mingru, minlstm: on every block's
    # residual branches (rnnlm/models/linear_recurrent.py)
    dropout: float = 0.0
    embedding_dim: int | None = None  # None: one-hot input (D2L); an int: a learned embedding
    # Scratch models: "manual" runs each layer's window with the hand-written BPTT
    # backward (rnnlm/bptt/rnn.py, gated.py; same numbers, far fewer ops), "autograd" step by step.
    # "auto" is manual for the scratch kinds, except under bf16 or train.compile (autograd).
    # lru, mingru, minlstm run each window as a parallel scan (rnnlm/bptt/scan.py): "manual"
    # (auto) with its hand-written backward, "autograd" differentiating the scan (minGRU and
    # minLSTM: the papers' log-space scan).
    # The torch.nn kinds take only "auto": they run the same hand-written backward exactly
    # where they run the C windows, else their layer's own backward (model.cell_kernel).
    backward: Literal["auto", "manual", "autograd"] = "auto"
    activation: Literal["tanh", "identity"] = "tanh"  # identity: D2L 8.7's linear RNN
    # Float32 on a CPU, eager, without bf16 autocast: "c" runs each window's step loop in C,
    # calling PyTorch's MKL for the recurrent matmuls (native.py, built with the system's C
    # compiler on first use); "auto" is c where it can be built and used, else torch; "c"
    # refuses to train where it cannot be used. Scratch models with the hand-written
    # backward: without MKL's symbols "c" runs each GRU/LSTM step's elementwise work in one
    # C call instead; "torch" runs the same windows in tensor ops (TorchScript). torch.nn
    # kinds (rnn, gru, lstm): "c" runs their layers one at a time through the scratch
    # layers' C windows (with their hand-written backward) on the layer's own weights;
    # "torch" always calls PyTorch's layer (oneDNN on a CPU, cuDNN on a GPU); "auto" calls
    # it wherever the C windows cannot run (a GPU, bf16 autocast, train.compile), and both
    # "auto" and "c" call it for one-step windows (generation), where it is faster.
    cell_kernel: Literal["auto", "c", "torch"] = "auto"
    input_dropout: float = 0.0  # on the embeddings (needs embedding_dim)
    output_dropout: float = 0.0  # on the last layer's outputs, before the output layer
    # DropConnect on the hidden-to-hidden weights, per batch (not for the diagonal
    # recurrences of lru, mingru, minlstm)
    weight_dropout: float = 0.0
    # How input_dropout, dropout (between layers) and output_dropout draw their masks:
    # per_step, a fresh mask for every time step; locked, one mask per lane for the whole
    # window (variational dropout, as AWD-LSTM does)
    dropout_masks: Literal["per_step", "locked"] = "per_step"


@dataclass
class TrainConfig:
    epochs: int = 500
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 1.0
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0  # None disables clipping (the norm is still recorded)
    prefix: str = "time traveller"
    predict_every: int = 10  # epochs between greedy predictions; 0 = only at the end
    predict_chars: int = 50
    threads: int | None = None  # torch intra-op threads; None: see training.run.run_threads
    # Split each batch by lanes into this many groups, each run forward and backward on its
    # own CPU thread (training/step.py): faster than splitting each small matmul across cores.
    # "auto": 2 where sharding is possible (training.step.resolve_batch_shards), else 1.
    batch_shards: int | Literal["auto"] = 1
    # On CUDA, replay each batch's forward and backward from captured CUDA graphs.
    cuda_graphs: bool = True
    # fp32, or bf16 autocast of the training forward pass (matmuls in bfloat16, the loss, the
    # carried state, the weights and evaluation in fp32): on a CPU the hand-written windows
    # keep their C loops with bf16 recurrent products (nn.LSTM runs its own fused layer),
    # elsewhere the scratch models use autograd. Fast only where the hardware has bf16
    # matmul units (CPU AVX-512 BF16 or AMX, GPU tensor cores). auto: bf16 on a CPU with
    # them, fp32 elsewhere (the book presets).
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    # torch.compile the model for training (evaluation and sampling stay eager). With it
    # the scratch models use autograd: compile fuses that graph, the hand-written backward
    # is opaque to it. The first batches pay the compilation (tens of seconds).
    compile: bool = False
    checkpoint_every: int = 10  # epochs between writes of out_dir/last.pt; 0 = only at the end
    # Truncated BPTT (rnnlm/bptt/truncation.py, docs/bptt.md): regular = detach at every batch
    # boundary (D2L); randomized = Tallec & Ollivier's xi_t; variable_length = AWD-LSTM windows.
    truncation: Literal["regular", "randomized", "variable_length"] = "regular"
    truncation_pi: float = 0.5  # randomized: P(xi_t = 1/pi); the chain is cut with 1 - pi
    variable_length_p: float = 0.95  # variable_length: P(base length = num_steps), else half
    variable_length_std: float = 5.0  # variable_length: sd of the normal around the base
    variable_length_min: int = 5  # variable_length: shortest window drawn
    diagnostics: bool = False  # gradient-flow measurements into metrics.jsonl + plots
    diagnostics_every: int = 1  # epochs between diagnostic measurements
    # Continue from out_dir/last.pt when it exists (else start fresh): what lets
    # `torchrun --max-restarts=K` recover from a lost worker by itself (auto_resume.py).
    auto_resume: bool = False
    # validation passes (needs data.split): every eval_every epochs and after the last one;
    # 0 = only after the last one. out_dir/perplexity.png is redrawn after each pass
    # (without a validation split: every predict_every epochs) and at the end.
    eval_every: int = 1
    lr_schedule: Literal["none", "step", "cosine", "plateau"] = "none"
    lr_step_size: int = 10  # step: epochs between two decays
    lr_gamma: float = 0.1  # step and plateau: the factor of each decay
    lr_min: float = 0.0  # cosine: the final lr; plateau: the floor
    plateau_patience: int = 2  # plateau: decay after more evaluations than this w/o gain
    early_stop_patience: int | None = None  # stop after this many evaluations w/o improvement
    ema_decay: float | None = None  # evaluate an exponential moving average of the weights
    # Penalties on the top layer's outputs added to the training loss (AWD-LSTM's AR and
    # TAR, training/step.py): ar * mean(h_t^2) over the outputs after output dropout (large
    # activations), tar * mean((h_t - h_(t-1))^2) over those before it (fast changes). The
    # reported training loss stays the cross-entropy. 0 = off.
    ar: float = 0.0
    tar: float = 0.0
    # R-Drop: every lane runs twice, under two dropout masks, and rdrop times the symmetric
    # KL divergence of the two predictions joins the loss (training/step.py). 0 = off.
    rdrop: float = 0.0


@dataclass
class Config:
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    out_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def changed_keys(before: Config, after: Config) -> list[tuple[str, Any, Any]]:
    """The dotted keys whose values differ between two configs, with both values, in the
    tree's order (what a resumed or continued run changes)."""
    def leaves(tree: dict, prefix: str = ""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield prefix + key, value

    old = dict(leaves(before.to_dict()))
    return [(key, old.get(key), value) for key, value in leaves(after.to_dict())
            if old.get(key) != value]


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
