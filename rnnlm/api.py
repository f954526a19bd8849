"""The notebook API: train a model, load a checkpoint and generate text, one call each.

    import rnnlm

    run = rnnlm.train("configs/lstm.yaml", epochs=50)   # a Run: model, vocab, metrics, out_dir
    run.metrics[-1]["train_ppl"]                        # the records of out_dir/metrics.jsonl
    rnnlm.generate(run, "time traveller", 100)          # greedy, as D2L's predict_ch8
    rnnlm.generate(run, "time traveller", 100, temperature=0.8, seed=1)
    model = rnnlm.load("runs/lstm/best.pt")             # a TrainedModel; generate takes it too

These are thin layers over what the commands run (rnnlm.config, rnnlm.training.run,
rnnlm.checkpoint, rnnlm.evaluation.sampling), so a notebook trains, saves and samples
exactly as `rnnlm train` and `rnnlm sample` do: `rnnlm.generate(run, p, n)` is the text of
`rnnlm sample --checkpoint OUT_DIR/last.pt --prefix p --num-chars n --greedy`. A mistake
the user can fix (a missing file, a bad key or value, a prefix the model cannot read)
raises rnnlm.ConfigError with a one-line message.

rnnlm/__init__.py exports these names lazily: `import rnnlm` loads this module (and torch)
only when one of them is first used.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from rnnlm.checkpoint import load_checkpoint, model_from_checkpoint
from rnnlm.config import Config, config_from_dict, load_config
from rnnlm.config.checks import resolve_device
from rnnlm.data.corpus import Vocab
from rnnlm.errors import ConfigError
from rnnlm.evaluation.sampling import SamplingOptions, encode_prefix, write_samples
from rnnlm.models import LanguageModel
from rnnlm.training import run as training_run
from rnnlm.training.metrics import read_records

__all__ = ["ConfigError", "Run", "TrainedModel", "generate", "load", "train"]


@dataclass(repr=False)
class TrainedModel:
    """A trained model with what it needs to read and write text: its vocabulary, the
    preprocessing of its training text and the config it was trained with."""

    model: LanguageModel  # in eval mode, on the device it was loaded to
    vocab: Vocab
    preprocess: str  # how text is normalised before encoding (data.preprocess)
    config: Config
    path: Path  # the checkpoint it came from

    def __repr__(self) -> str:
        return f"TrainedModel({self._summary()})"

    def _summary(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        return (f"{self.config.model.kind}, {params:,} parameters, vocabulary {len(self.vocab)}, "
                f"from {self.path}")


@dataclass(repr=False)
class Run(TrainedModel):
    """What `train` returns: the trained model (read back from out_dir/last.pt, so it is
    the model every command would load), the run's metrics and where its files are."""

    out_dir: Path  # config.yaml, metrics.jsonl, last.pt, best.pt, perplexity.png
    metrics: list[dict]  # the records of metrics.jsonl: one per epoch, then a test record
    result: dict  # the last epoch's record with the run's summary (prediction, best_val_ppl)

    def __repr__(self) -> str:
        epochs = [r for r in self.metrics if "epoch" in r and "event" not in r]
        last = f", train ppl {epochs[-1]['train_ppl']:.3f}" if epochs else ""
        return f"Run({self._summary()}, {len(epochs)} epoch records{last})"


def train(config: str | Path | Config, *, epochs: int | None = None,
          out_dir: str | Path | None = None, device: str | None = None,
          seed: int | None = None, overrides: Mapping | Sequence[str] | None = None,
          overwrite: bool = False, quiet: bool = False, progress: bool | None = None,
          init_from: str | Path | None = None) -> Run:
    """Train a model as `rnnlm train --config CONFIG` does and return the Run.

    `config`: a YAML file (e.g. "configs/lstm.yaml") or a Config. `epochs`, `out_dir`,
    `device` and `seed` override the config's train.epochs, out_dir, device and seed;
    `overrides` sets any other key, as {"train.lr": 0.5} or ["train.lr=0.5"] (the syntax of
    `--set`). A new run refuses an out_dir that holds a checkpoint unless `overwrite`
    (which deletes it first). `quiet`: only the final summary is printed. `progress`: a
    progress bar over the epochs (a widget in Jupyter, through tqdm.auto); None: one unless
    `quiet`. `init_from`: a checkpoint whose trained weights (not its averaged EMA copy) the
    new run starts from, with a fresh optimizer and schedule (`rnnlm train --init-from`, for
    fine-tuning on another text or config; the model kind and shapes must fit, and the text
    may use only characters the checkpoint knows).

    Interrupting the kernel stops the run after the current batch: last.pt is written and
    rnnlm.training.interrupts.TrainingInterrupted raised; continue it with
    `rnnlm train --resume OUT_DIR/last.pt`.

    A NaN or infinite loss, gradient norm or weight stops the run at once and raises
    rnnlm.training.divergence.TrainingDiverged, whose message names the epoch, the batch and
    the last finite loss; nothing is saved after it, so out_dir keeps the checkpoints from
    before (`rnnlm train` prints the message and exits with 3).
    """
    sets = _override_items(overrides)
    for key, value in (("train.epochs", epochs), ("out_dir", out_dir), ("device", device),
                       ("seed", seed)):
        if value is not None:
            sets.append(_override(key, str(value) if isinstance(value, Path) else value))
    if isinstance(config, Config):
        cfg = config_from_dict(config.to_dict(), sets, source="config")
    elif isinstance(config, str | Path):
        cfg = load_config(config, sets)
    else:
        raise ConfigError(f"config must be the path of a YAML file or a Config, got "
                          f"{type(config).__name__}")
    # out: the stdout of this moment (a notebook cell's, a redirect_stdout's), not the one
    # that was current when rnnlm.training.run was imported
    start = None if init_from is None else (load_checkpoint(init_from), init_from)
    result = training_run.train_new(cfg, overwrite=overwrite, quiet=quiet, out=sys.stdout,
                                    progress=not quiet if progress is None else progress,
                                    init_from=start)
    out = Path(cfg.out_dir)
    trained = load(out / "last.pt", cfg.device)
    return Run(trained.model, trained.vocab, trained.preprocess, trained.config, trained.path,
               out_dir=out, metrics=read_records(out), result=result or {})


def load(path: str | Path, device: str = "auto") -> TrainedModel:
    """The model saved in a checkpoint (a last.pt or best.pt), with the weights that
    evaluation scored (the averaged ones when the run kept an average), in eval mode on
    `device` ("auto": CUDA, then MPS, then the CPU)."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    model, vocab, preprocess, cfg = model_from_checkpoint(
        ckpt, resolve_device(device), str(path))
    return TrainedModel(model, vocab, preprocess, cfg, path)


def generate(model: TrainedModel, prefix: str | None = None, num_chars: int = 100,
             temperature: float | None = None, *, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None,
             unknown: str = "error") -> str:
    """The prefix and `num_chars` characters generated after it, as one string.

    `model`: what `train` or `load` returned. `prefix` goes through the model's own
    preprocessing (default: the run's train.prefix). With `temperature` 0 or None each
    character is the most likely one (greedy, D2L's predict_ch8); with a temperature > 0
    characters are drawn from softmax(logits / temperature), restricted to the `top_k` most
    likely and/or to the most likely holding `top_p` of the probability; a `seed` gives the
    same text every time (the same as `rnnlm sample --seed`). `unknown="replace"` reads
    prefix characters outside the vocabulary as <unk> instead of refusing them.
    """
    if not isinstance(model, TrainedModel):
        raise ConfigError(f"generate needs what rnnlm.train or rnnlm.load returned, got "
                          f"{type(model).__name__}")
    _require(isinstance(num_chars, int) and not isinstance(num_chars, bool) and num_chars >= 1,
             f"num_chars must be a whole number >= 1, got {num_chars!r}")
    _require(temperature is None or temperature >= 0,
             f"temperature must be >= 0 (0 or None: the most likely character every time), "
             f"got {temperature}")
    greedy = not temperature
    options = SamplingOptions(num_chars=num_chars, temperature=None if greedy else temperature,
                              top_k=top_k, top_p=top_p, greedy=greedy, seed=seed,
                              unknown=unknown)
    options.validate(_keyword)  # the rules of `rnnlm sample`, named as this function's
    text = model.config.train.prefix if prefix is None else prefix
    ids = encode_prefix(text, model.vocab, model.preprocess, unknown, _keyword)
    # write_samples is what `rnnlm sample` prints with: the same text, character for character
    return write_samples(model.model, model.vocab, ids, options, io.StringIO())[0]


def _override_items(overrides: Mapping | Sequence[str] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [_override(str(key), value) for key, value in overrides.items()]
    if isinstance(overrides, str):
        return [overrides]
    return [str(item) for item in overrides]


def _override(key: str, value) -> str:
    """`key=value` with the value written as YAML, so `--set` parsing gives it back
    unchanged (a string stays a string, a list a list)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return f"{key}={text.removesuffix('...').strip()}"  # a scalar's document-end marker


def _keyword(field: str) -> str:
    """A sampling option as generate() spells it, for SamplingOptions.validate's messages."""
    return {"greedy": "greedy decoding (temperature 0 or None)",
            "sample instead": "give a temperature > 0 to sample"}.get(field, field)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
