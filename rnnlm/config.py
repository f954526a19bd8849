"""The run configuration: one tree of dataclasses, loaded from YAML and checked at load.

Every key has a default here; a YAML file and `--set a.b=value` overrides only change
what they name. Unknown keys, wrong types and out-of-range values raise `ConfigError`
with a one-line message that names the key, so the entry points can print it and exit 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user-facing configuration problem (bad file, key, type or value)."""


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
    dropout: float = 0.0  # between stacked layers, as torch.nn does
    embedding_dim: int | None = None  # None: one-hot input (D2L); an int: a learned embedding
    # Scratch models only: "manual" runs each layer's window with the hand-written BPTT
    # backward (bptt.py, gated.py; same numbers, far fewer ops), "autograd" step by step.
    # "auto" is manual for the scratch kinds; torch.nn kinds always use their own backward.
    backward: Literal["auto", "manual", "autograd"] = "auto"
    activation: Literal["tanh", "identity"] = "tanh"  # identity: D2L 8.7's linear RNN
    # Scratch models with the hand-written backward, float32 on a CPU: "c" runs each window's
    # step loop in C, calling PyTorch's MKL for the recurrent matmuls, or, without those
    # symbols, each GRU/LSTM step's elementwise work in one C call (native.py, built
    # with the system's C compiler on first use); "torch" uses tensor ops (TorchScript);
    # "auto" is c where it can be built and used, else torch; "c" refuses to train where it
    # cannot be used.
    cell_kernel: Literal["auto", "c", "torch"] = "auto"
    input_dropout: float = 0.0  # on the embeddings (needs embedding_dim)
    output_dropout: float = 0.0  # on the last layer's outputs, before the output layer
    weight_dropout: float = 0.0  # DropConnect on the hidden-to-hidden weights, per batch
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
    threads: int | None = None  # torch intra-op threads; None: see trainer.run_threads
    # Split each batch by lanes into this many groups, each run forward and backward on its
    # own CPU thread (shards.py): faster than splitting each small matmul across cores.
    # "auto": 2 where sharding is possible (shards.resolve_batch_shards), else 1.
    batch_shards: int | Literal["auto"] = 1
    # On CUDA, replay each batch's forward and backward from captured CUDA graphs.
    cuda_graphs: bool = True
    # fp32, or bf16 autocast of the training forward pass (matmuls in bfloat16, the loss, the
    # carried state, the weights and evaluation in fp32). Fast only where the hardware has
    # bf16 matmul units (CPU AMX, GPU tensor cores). The scratch models then use autograd.
    precision: Literal["fp32", "bf16"] = "fp32"
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


# ---------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or start from defaults when path is None) and apply `a.b=v` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found: pass an existing YAML file")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not a "
                              f"{type(raw).__name__}")
    return config_from_dict(raw, overrides, source=str(path) if path else "defaults")


def config_from_dict(raw: dict, overrides=(), source: str = "config") -> Config:
    raw = _deep_copy(raw)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    cfg = _build(Config, raw, prefix="", source=source)
    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r} must look like key=value, e.g. train.epochs=50")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _deep_copy(raw):
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw


def _build(cls, raw: dict, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {prefix}{key}{hint}; "
                              f"valid keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, raw[name], f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(raw[name], hint, f"{prefix}{name}", source)
    return cls(**kwargs)


def _coerce(value, hint, key: str, source: str):
    """Check `value` against a type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as exc:
                errors.append(exc)
        allowed = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
        raise ConfigError(f"{source}: {key} must be {allowed}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(map(str, choices))}; "
                              f"got {value!r}")
        return value
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(hint) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module


def _type_name(t) -> str:
    if typing.get_origin(t) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(t)))
    if typing.get_origin(t) in (list, tuple):
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        t, getattr(t, "__name__", str(t)))


# ---------------------------------------------------------------------------- ranges


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def fixed_shards(t: TrainConfig) -> int:
    """train.batch_shards as given, with "auto" counted as 1: auto never asks for sharding
    where it cannot run (shards.resolve_batch_shards), so only fixed counts are checked."""
    return 1 if t.batch_shards == "auto" else t.batch_shards


def shards_allowed(cfg: Config, shards: int) -> bool:
    """Whether this config would be accepted with train.batch_shards = `shards`: the rules
    that refuse sharding (dropout, compile, too few lanes) live in `validate` only."""
    try:
        validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                    batch_shards=shards)))
    except ConfigError:
        return False
    return True


SCRATCH_KINDS = ("rnn_scratch", "gru_scratch", "lstm_scratch")


def cell_kernel_applies(cfg: Config) -> bool:
    """Whether the training windows of this config can use model.cell_kernel's C kernels:
    a scratch model with the hand-written fp32 eager backward, no randomized truncation
    (the device is checked once known, trainer.check_cell_kernel)."""
    m, t = cfg.model, cfg.train
    return (m.kind in SCRATCH_KINDS and m.backward != "autograd"
            and t.precision == "fp32" and not t.compile and t.truncation != "randomized")


def validate(cfg: Config) -> None:
    """Range checks that do not need the corpus (those that do live in data.py)."""
    from rnnlm.models import MODEL_KINDS  # late import: models import torch, config must not

    d, m, t = cfg.data, cfg.model, cfg.train
    _require(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    _require(d.num_steps >= 1, f"data.num_steps must be >= 1, got {d.num_steps}")
    _require(d.max_tokens is None or d.max_tokens >= 2,
             f"data.max_tokens must be >= 2 or null (whole corpus), got {d.max_tokens}")
    _require(m.kind in MODEL_KINDS,
             f"model.kind must be one of {', '.join(MODEL_KINDS)}; got {m.kind!r}")
    model_class = MODEL_KINDS[m.kind]
    _require(m.activation in model_class.activations,
             f"model.activation: {m.activation} is only offered for rnn_scratch (D2L 8.7's "
             f"linear RNN); {m.kind} supports {', '.join(model_class.activations)}: "
             f"set model.activation=tanh")
    _require(m.hidden_size >= 1, f"model.hidden_size must be >= 1, got {m.hidden_size}")
    _require(m.num_layers >= 1, f"model.num_layers must be >= 1, got {m.num_layers}")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    _require(m.backward == "auto" or m.kind.endswith("_scratch"),
             f"model.backward: {m.backward} applies to the scratch kinds only; {m.kind} is a "
             f"torch.nn layer with its own backward (leave model.backward: auto)")
    _require(m.backward != "manual" or (t.precision == "fp32" and not t.compile),
             "model.backward: manual is the fp32, eager hand-written backward; with "
             f"train.precision={t.precision} and train.compile={str(t.compile).lower()} use "
             "model.backward=auto (autograd)")
    _require(m.cell_kernel == "auto" or m.kind in SCRATCH_KINDS,
             f"model.cell_kernel: {m.cell_kernel} applies to the scratch kinds only "
             f"({', '.join(SCRATCH_KINDS)}); leave model.cell_kernel: auto for {m.kind}")
    _require(m.cell_kernel != "c" or cell_kernel_applies(cfg),
             "model.cell_kernel: c is a kernel of the hand-written fp32 backward without "
             "randomized truncation; with model.backward=autograd, train.precision=bf16, "
             "train.compile or train.truncation=randomized use model.cell_kernel=auto")
    _require(m.cell_kernel != "c" or cfg.device in ("auto", "cpu"),
             f"model.cell_kernel: c runs on the CPU; with device: {cfg.device} use "
             "model.cell_kernel=auto")
    _require(m.embedding_dim is None or m.embedding_dim >= 1,
             f"model.embedding_dim must be >= 1 or null (one-hot), got {m.embedding_dim}")
    _require(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _require(t.clip_norm is None or t.clip_norm > 0,
             f"train.clip_norm must be > 0 or null (no clipping), got {t.clip_norm}")
    _require(t.predict_every >= 0, f"train.predict_every must be >= 0, got {t.predict_every}")
    _require(t.predict_chars >= 1, f"train.predict_chars must be >= 1, got {t.predict_chars}")
    explicit_shards = fixed_shards(t)
    _require(explicit_shards >= 1, f"train.batch_shards must be >= 1, got {t.batch_shards}")
    _require(explicit_shards <= d.batch_size,
             f"train.batch_shards ({t.batch_shards}) cannot exceed data.batch_size "
             f"({d.batch_size}): each shard needs at least one lane")
    _require(explicit_shards == 1 or m.dropout == 0,
             "train.batch_shards > 1 needs model.dropout 0: dropout draws from one random "
             "stream, which the shard threads would race for (runs would not repeat)")
    _require(explicit_shards == 1 or not t.compile,
             "train.compile with train.batch_shards > 1 is not supported (the shard threads "
             "would share one compiled model): use one of them")
    _require(t.threads is None or t.threads >= 1,
             f"train.threads must be >= 1 or null, got {t.threads}")
    _require(t.checkpoint_every >= 0,
             f"train.checkpoint_every must be >= 0 (0 = only at the end), got "
             f"{t.checkpoint_every}")
    _require(t.diagnostics_every >= 1,
             f"train.diagnostics_every must be >= 1, got {t.diagnostics_every}")
    from rnnlm.bptt.truncation import check_truncation_config  # late import, as above

    check_truncation_config(cfg)
    _validate_heldout(cfg)


def _validate_heldout(cfg: Config) -> None:
    """Splits, evaluation, schedules, early stopping, averaging, extra dropout."""
    d, m, t = cfg.data, cfg.model, cfg.train
    if d.split is not None:
        _require(len(d.split) == 3 and all(math.isfinite(f) and f >= 0 for f in d.split),
                 f"data.split must be three fractions [train, val, test] >= 0, got {d.split}")
        _require(d.split[0] > 0 and abs(sum(d.split) - 1.0) < 1e-6,
                 f"data.split fractions must sum to 1 with train > 0, got {d.split}")
    _require(d.eval_lanes >= 1, f"data.eval_lanes must be >= 1, got {d.eval_lanes}")
    _require(0.0 <= m.input_dropout < 1.0,
             f"model.input_dropout must be in [0, 1), got {m.input_dropout}")
    _require(m.input_dropout == 0.0 or m.embedding_dim is not None,
             "model.input_dropout needs model.embedding_dim (dropout on one-hot input is not "
             "offered): set model.embedding_dim, e.g. 64")
    _require(0.0 <= m.output_dropout < 1.0,
             f"model.output_dropout must be in [0, 1), got {m.output_dropout}")
    _require(0.0 <= m.weight_dropout < 1.0,
             f"model.weight_dropout must be in [0, 1), got {m.weight_dropout}")
    _require(fixed_shards(t) == 1 or
             m.input_dropout == m.output_dropout == m.weight_dropout == 0,
             "train.batch_shards > 1 needs model.input_dropout, output_dropout and "
             "weight_dropout 0: dropout draws from one random stream, which the shard threads "
             "would race for (runs would not repeat)")
    _require(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}")
    _require(t.lr_step_size >= 1, f"train.lr_step_size must be >= 1, got {t.lr_step_size}")
    _require(0.0 < t.lr_gamma < 1.0, f"train.lr_gamma must be in (0, 1), got {t.lr_gamma}")
    _require(t.lr_min >= 0, f"train.lr_min must be >= 0, got {t.lr_min}")
    _require(t.lr_schedule not in ("cosine", "plateau") or t.lr_min < t.lr,
             f"train.lr_min ({t.lr_min}) must be below train.lr ({t.lr}) for the "
             f"{t.lr_schedule} schedule")
    _require(t.plateau_patience >= 0,
             f"train.plateau_patience must be >= 0, got {t.plateau_patience}")
    _require(t.early_stop_patience is None or t.early_stop_patience >= 1,
             f"train.early_stop_patience must be >= 1 or null, got {t.early_stop_patience}")
    _require(t.ema_decay is None or 0.0 < t.ema_decay < 1.0,
             f"train.ema_decay must be in (0, 1) or null, got {t.ema_decay}")
    has_val = d.split is not None and d.split[1] > 0
    hint = "set data.split, e.g. [0.9, 0.05, 0.05]"
    _require(has_val or t.lr_schedule != "plateau",
             f"train.lr_schedule: plateau follows validation perplexity, but there is no "
             f"validation split: {hint}")
    _require(has_val or t.early_stop_patience is None,
             f"train.early_stop_patience watches validation perplexity, but there is no "
             f"validation split: {hint}")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
