"""Every check of a run's configuration, in one place, asking the models what they support.

* ``validate(cfg)``: what can be decided from the config alone (ranges, combinations, what
  the model kind supports); run at load, so a bad config fails before anything starts.
* ``check_run(cfg, device, shards)``, ``check_distributed(cfg, world_size)``: what needs
  the place the run lands on (the device, the C kernels' availability there, the torchrun
  processes); run at the start of training.
* ``resolve_device(name)``: the device a config or option names, refused when absent.

Checks that need the corpus itself (a text too short for one batch) belong to the data layer,
which reads it. Whether a kind can do something is never decided from its name: each model
class declares it in ``supports`` (rnnlm.models.base.Supports), and its ``activations`` and
``twin``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import TYPE_CHECKING

import torch

from rnnlm.errors import ConfigError
from rnnlm.kernels import native
from rnnlm.models import MODEL_KINDS, LanguageModel

if TYPE_CHECKING:
    from rnnlm.config.schema import Config, TrainConfig

FLOAT32_MAX = torch.finfo(torch.float32).max


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def model_class(cfg: Config) -> type[LanguageModel]:
    return MODEL_KINDS[cfg.model.kind]


def kinds_that(offer) -> str:
    """The registered kinds for which offer(cls) holds, for messages that say where to go."""
    return ", ".join(kind for kind, cls in MODEL_KINDS.items() if offer(cls))


def fixed_shards(t: TrainConfig) -> int:
    """train.batch_shards as given, with "auto" counted as 1: auto never asks for sharding
    where it cannot run (training.step.resolve_batch_shards), so only fixed counts are
    checked."""
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


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """train.precision as a run on `device` computes: auto is bf16 on a CPU that multiplies
    bf16 natively (AVX-512 BF16 or AMX, native.cpu_multiplies_bf16) for a kind that offers
    bf16 (supports.bf16), else fp32 (on a GPU the fp32 step is captured as CUDA graphs)."""
    precision = cfg.train.precision
    if precision != "auto":
        return precision
    fast = device.type == "cpu" and native.cpu_multiplies_bf16()
    return "bf16" if fast and model_class(cfg).supports.bf16 else "fp32"


def c_kernel_blockers(cfg: Config, device: torch.device | None = None) -> list[str]:
    """The settings that keep a training window off the C kernels (which run the
    hand-written eager backward, without randomized truncation; under bf16 with bf16
    products, for the kinds that declare supports.c_windows_bf16). `device` resolves
    train.precision: auto (without it, auto counts as fp32)."""
    m, t = cfg.model, cfg.train
    precision = resolve_precision(cfg, device) if device is not None else \
        t.precision.replace("auto", "fp32")
    return [setting for setting, blocks in (
        ("model.backward=autograd", m.backward == "autograd"),
        (f"train.precision={t.precision}",
         precision == "bf16" and not model_class(cfg).supports.c_windows_bf16),
        ("train.compile", t.compile),
        ("train.truncation=randomized", t.truncation == "randomized")) if blocks]


def cell_kernel_applies(cfg: Config, device: torch.device | None = None) -> bool:
    """Whether the training windows of this config can use model.cell_kernel's C kernels:
    a kind that declares C windows (supports.c_windows) and none of c_kernel_blockers (the
    device is checked once known, check_run)."""
    return model_class(cfg).supports.c_windows and not c_kernel_blockers(cfg, device)


def c_kernels_unavailable(cfg: Config) -> str | None:
    """Why the C kernels this kind needs cannot be built or used here (None: they can): the
    whole-window loops, unless it also has per-step kernels (supports.c_steps)."""
    return native.unavailable_reason(whole_windows=not model_class(cfg).supports.c_steps)


def uses_c_kernels(cfg: Config, device: torch.device) -> bool:
    """Whether this config's training windows will run the C kernels on `device`."""
    return (cfg.model.cell_kernel != "torch" and cell_kernel_applies(cfg, device)
            and device.type == "cpu" and c_kernels_unavailable(cfg) is None)


# ------------------------------------------------------------------ from the config alone


def validate(cfg: Config) -> None:
    """Every check that does not need the corpus or the device."""
    _check_data(cfg)
    _check_model(cfg)
    _check_train(cfg)
    _check_truncation(cfg)
    _check_heldout(cfg)


def _check_data(cfg: Config) -> None:
    d = cfg.data
    _require(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    _require(d.num_steps >= 1, f"data.num_steps must be >= 1, got {d.num_steps}")
    _require(d.max_tokens is None or d.max_tokens >= 2,
             f"data.max_tokens must be >= 2 or null (whole corpus), got {d.max_tokens}")
    if d.split is not None:
        _require(len(d.split) == 3 and all(math.isfinite(f) and f >= 0 for f in d.split),
                 f"data.split must be three fractions [train, val, test] >= 0, got {d.split}")
        _require(d.split[0] > 0 and abs(sum(d.split) - 1.0) < 1e-6,
                 f"data.split fractions must sum to 1 with train > 0, got {d.split}")
    _require(d.eval_lanes >= 1, f"data.eval_lanes must be >= 1, got {d.eval_lanes}")


def _check_model(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    _require(m.kind in MODEL_KINDS,
             f"model.kind must be one of {', '.join(MODEL_KINDS)}; got {m.kind!r}")
    cls = model_class(cfg)
    supports = cls.supports
    _require(m.activation in cls.activations,
             f"model.activation: {m.activation} is only offered for "
             f"{kinds_that(lambda c: m.activation in c.activations)} (D2L 8.7's linear RNN); "
             f"{m.kind} supports {', '.join(cls.activations)}: set model.activation=tanh")
    _require(m.hidden_size >= 1, f"model.hidden_size must be >= 1, got {m.hidden_size}")
    _require(m.num_layers >= 1, f"model.num_layers must be >= 1, got {m.num_layers}")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    # A kind with C windows but no choice of backward (a torch.nn layer) runs the windows'
    # hand-written backward exactly where it runs the C windows: model.cell_kernel decides.
    own_backward = "runs the hand-written backward only on its C windows, which " \
        "model.cell_kernel chooses" if supports.c_windows else "declares none and trains " \
        "with autograd"
    _require(m.backward == "auto" or supports.manual_backward,
             f"model.backward: {m.backward} is offered for "
             f"{kinds_that(lambda c: c.supports.manual_backward)} only (a hand-written "
             f"backward or autograd); {m.kind} {own_backward} (leave "
             f"model.backward: auto)")
    _require(m.backward != "manual" or not t.compile,
             "model.backward: manual is the eager hand-written backward; with "
             "train.compile=true use model.backward=auto (autograd)")
    _require(m.cell_kernel == "auto" or supports.c_windows,
             f"model.cell_kernel: {m.cell_kernel} is offered for "
             f"{kinds_that(lambda c: c.supports.c_windows)} only (C window loops); leave "
             f"model.cell_kernel: auto for {m.kind}")
    _require(m.cell_kernel != "c" or cell_kernel_applies(cfg),
             "model.cell_kernel: c is a kernel of the hand-written eager backward without "
             f"randomized truncation; with {' and '.join(c_kernel_blockers(cfg))} use "
             "model.cell_kernel=auto")
    _require(m.cell_kernel != "c" or cfg.device in ("auto", "cpu"),
             f"model.cell_kernel: c runs on the CPU; with device: {cfg.device} use "
             "model.cell_kernel=auto")
    _require(m.embedding_dim is None or m.embedding_dim >= 1,
             f"model.embedding_dim must be >= 1 or null (one-hot), got {m.embedding_dim}")
    _require(0.0 <= m.input_dropout < 1.0,
             f"model.input_dropout must be in [0, 1), got {m.input_dropout}")
    _require(m.input_dropout == 0.0 or m.embedding_dim is not None,
             "model.input_dropout needs model.embedding_dim (dropout on one-hot input is not "
             "offered): set model.embedding_dim, e.g. 64")
    _require(0.0 <= m.output_dropout < 1.0,
             f"model.output_dropout must be in [0, 1), got {m.output_dropout}")
    _require(0.0 <= m.weight_dropout < 1.0,
             f"model.weight_dropout must be in [0, 1), got {m.weight_dropout}")
    _require(m.weight_dropout == 0.0 or supports.weight_dropout,
             f"model.weight_dropout (DropConnect on W_hh) is offered for "
             f"{kinds_that(lambda c: c.supports.weight_dropout)} only; {m.kind}'s recurrence is "
             f"diagonal, with no W_hh matrix to drop: set model.weight_dropout=0")
    _require(t.precision != "bf16" or supports.bf16,
             f"train.precision: bf16 is not offered for {m.kind}: use fp32 or auto")
    _require(not t.compile or supports.compile,
             f"train.compile is not offered for {m.kind}: set train.compile=false")


def _check_train(cfg: Config) -> None:
    d, m, t = cfg.data, cfg.model, cfg.train
    _require(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    # The optimizers multiply float32 tensors by these: past float32's range torch fails
    # with a traceback. Adam's first step divides the lr by 1 - beta1 = 0.1 in float32.
    adam = t.optimizer in ("adam", "adamw")
    lr_limit, why = (FLOAT32_MAX * 0.1, f"a tenth of the largest float32, for {t.optimizer}") \
        if adam else (FLOAT32_MAX, "the largest float32")
    _require(t.lr <= lr_limit, f"train.lr must be at most {lr_limit:.3g} ({why}), got {t.lr:g}")
    _require(t.weight_decay <= FLOAT32_MAX, f"train.weight_decay must be at most "
             f"{FLOAT32_MAX:.3g} (the largest float32), got {t.weight_decay:g}")
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
    _require(explicit_shards == 1 or
             m.input_dropout == m.output_dropout == m.weight_dropout == 0,
             "train.batch_shards > 1 needs model.input_dropout, output_dropout and "
             "weight_dropout 0: dropout draws from one random stream, which the shard threads "
             "would race for (runs would not repeat)")
    _require(t.threads is None or t.threads >= 1,
             f"train.threads must be >= 1 or null, got {t.threads}")
    _require(t.checkpoint_every >= 0,
             f"train.checkpoint_every must be >= 0 (0 = only at the end), got "
             f"{t.checkpoint_every}")
    _require(t.diagnostics_every >= 1,
             f"train.diagnostics_every must be >= 1, got {t.diagnostics_every}")
    _require(0 <= t.rdrop <= FLOAT32_MAX,
             f"train.rdrop must be >= 0 and at most {FLOAT32_MAX:.3g} (0 = off), got "
             f"{t.rdrop:g}")
    between = m.dropout and m.num_layers >= model_class(cfg).dropout_from_layers
    _require(t.rdrop == 0 or between or m.input_dropout or m.output_dropout,
             "train.rdrop compares two dropout samples of each lane; with no model.dropout "
             "that acts (between layers: num_layers 2 or more), input_dropout or "
             "output_dropout the two are the same (DropConnect draws one mask per batch, "
             "shared by both): set one of them, or train.rdrop=0")
    for name in ("ar", "tar"):
        value = getattr(t, name)
        _require(0 <= value <= FLOAT32_MAX,
                 f"train.{name} must be >= 0 and at most {FLOAT32_MAX:.3g} (0 = off), got "
                 f"{value:g}")
        _require(value == 0 or model_class(cfg).supports.activation_penalties,
                 f"train.{name} (a penalty on the top layer's recurrent outputs) is offered "
                 f"for {kinds_that(lambda c: c.supports.activation_penalties)} only; "
                 f"{m.kind}'s top output is a LayerNorm's: set train.{name}=0")


def _check_truncation(cfg: Config) -> None:
    """Every model x strategy x iterator either works or is refused here."""
    t, d, kind = cfg.train, cfg.data, cfg.model.kind
    _require(0.0 < t.truncation_pi <= 1.0,
             f"train.truncation_pi must be in (0, 1], got {t.truncation_pi}")
    _require(0.0 <= t.variable_length_p <= 1.0,
             f"train.variable_length_p must be in [0, 1], got {t.variable_length_p}")
    _require(t.variable_length_std >= 0,
             f"train.variable_length_std must be >= 0, got {t.variable_length_std}")
    _require(1 <= t.variable_length_min <= d.num_steps,
             f"train.variable_length_min must be in [1, data.num_steps={d.num_steps}], got "
             f"{t.variable_length_min}")
    cls = model_class(cfg)
    if t.truncation == "randomized" and not cls.supports.randomized_truncation:
        instead = f"model.kind={cls.twin}" if cls.twin else \
            f"one of {kinds_that(lambda c: c.supports.randomized_truncation)}"
        raise ConfigError(f"train.truncation: randomized scales each step's dh_t/dh_(t-1), "
                          f"which needs a step-by-step model, but {kind} does not run its "
                          f"windows step by step: use {instead} or another "
                          f"train.truncation")
    _require(t.truncation != "variable_length" or d.iterator == "sequential",
             "train.truncation: variable_length moves where sequential lanes are cut (the "
             "state is carried across them); with data.iterator=random every window starts "
             "from a fresh state, so there is nothing to vary: use data.iterator=sequential")


def _check_heldout(cfg: Config) -> None:
    """Evaluation, schedules, early stopping, averaging."""
    d, t = cfg.data, cfg.train
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


# ------------------------------------------------------------------ where the run lands


def resolve_device(name: str) -> torch.device:
    """The device named by a config or a --device option: "auto" is CUDA, else MPS, else
    the CPU; a device that is not there is refused."""
    mps = getattr(torch.backends, "mps", None)
    mps_here = bool(mps and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_here else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but CUDA is not available here; "
                          "use device: cpu or auto")
    if name == "mps" and not mps_here:
        raise ConfigError("device: mps was asked for but MPS is not available here; "
                          "use device: cpu or auto")
    return torch.device(name)


def check_batch_size(batch_size: int, world_size: int) -> None:
    """data.batch_size is the global batch: it must split evenly over the processes."""
    if batch_size % world_size:
        raise ConfigError(
            f"data.batch_size={batch_size} is not divisible by the {world_size} "
            f"processes of this run (nodes x --nproc_per_node): data.batch_size is the global "
            f"batch, so choose a multiple of {world_size} or another process count")


def check_distributed(cfg: Config, world_size: int) -> None:
    """What a data-parallel run of `world_size` processes cannot do, found before any
    process waits for another."""
    if world_size == 1:
        return
    check_batch_size(cfg.data.batch_size, world_size)
    if fixed_shards(cfg.train) > 1:
        # Shards compute gradients with torch.autograd.grad, which bypasses DDP's
        # all-reduce hooks; one process per core already gives each core its lanes.
        raise ConfigError(
            f"train.batch_shards={cfg.train.batch_shards} cannot be combined with "
            f"{world_size} torchrun processes: run one single-threaded process per core "
            f"(torchrun --nproc_per_node=CORES) and leave train.batch_shards at 1")


def check_cell_kernel(cfg: Config, device: torch.device) -> None:
    """model.cell_kernel=c must be able to run here; auto falls back to PyTorch's ops (the
    TorchScript loops, or a torch.nn kind's own layer; said once where it would have used the
    C kernels). A kind without per-step C kernels (supports.c_steps) needs the whole-window
    loops."""
    kernel = cfg.model.cell_kernel
    if kernel == "torch" or not cell_kernel_applies(cfg, device):
        if kernel == "c" and model_class(cfg).supports.c_windows:
            raise ConfigError("model.cell_kernel: c is a kernel of the hand-written eager "
                              "backward without randomized truncation; with "
                              f"{' and '.join(c_kernel_blockers(cfg, device))} use "
                              "model.cell_kernel=auto")
        return
    if kernel == "c" and device.type != "cpu":
        raise ConfigError(f"model.cell_kernel: c runs on the CPU, this run is on {device.type}: "
                          "use model.cell_kernel=auto")
    reason = c_kernels_unavailable(cfg) if device.type == "cpu" else None
    if reason and kernel == "c":
        raise ConfigError(f"model.cell_kernel: c cannot be used here: {reason}; use "
                          "model.cell_kernel=auto (tensor ops)")
    if reason:
        print(f"note: C cell kernels unavailable ({reason}); using PyTorch's ops",
              file=sys.stderr)


def check_run(cfg: Config, device: torch.device, shards: int) -> None:
    """The checks that need the device (and the resolved train.batch_shards), at the start of
    a training run."""
    if shards > 1 and device.type != "cpu":
        raise ConfigError(f"train.batch_shards: {shards} splits batches "
                          f"across CPU cores; on {device.type} use 1 or auto")
    if device.type == "cuda" and cfg.train.cuda_graphs and \
            (resolve_precision(cfg, device) != "fp32" or cfg.train.compile):
        raise ConfigError("train.cuda_graphs captures the fp32 eager step; with "
                          f"train.precision={cfg.train.precision} or train.compile=true set "
                          "train.cuda_graphs=false")
    if device.type == "cuda" and cfg.train.cuda_graphs and \
            (cfg.train.ar or cfg.train.tar or cfg.train.rdrop):
        raise ConfigError("train.cuda_graphs captures the plain step; with train.ar, "
                          "train.tar or train.rdrop set train.cuda_graphs=false")
    check_cell_kernel(cfg, device)
