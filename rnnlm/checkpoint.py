"""Self-contained, atomic, safe-to-load checkpoints.

A checkpoint is one `torch.save`d dict of plain data: tensors, numbers, strings, lists and
dicts, never a pickled class. It holds everything that rebuilds and resumes a run on its own:

    format, format_version      what this file is (refused when unknown or newer)
    config                      the resolved config tree (Config.to_dict())
    vocab                       {"tokens": [...], "preprocess": "d2l" | "d2l_spaced" | "raw"}
    model, optimizer            state_dicts
    progress                    completed epochs, global step, wall time, and, when stopped
                                inside an epoch, the batch index, the carried hidden state
                                and the epoch's running sums
    rng                         Python, NumPy, torch CPU (and CUDA / MPS when present) states
    best                        the tracked metric so far: {"metric", "value", "epoch"}
                                (rnnlm.training.best)
    record                      the last completed epoch's metrics.jsonl record
    run_state                   what else the run carries between epochs: the LR schedule,
                                the early-stopping count, the averaged (EMA) weights and the
                                best validation weights kept for the test split (optional:
                                absent in checkpoints of older versions)

Files load with `torch.load(..., map_location="cpu", weights_only=True)`, so a checkpoint
written on a GPU loads anywhere, and any file that would need to unpickle more than that is
refused. Writes go to a temporary file in the same directory, are flushed and fsynced, and
then renamed over the target: a crash or a full disk in the middle leaves the previous file
as it was.
"""

from __future__ import annotations

import os
import pickle
import random
import secrets
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from rnnlm.config import Config, ConfigError, config_from_dict, parse_override
from rnnlm.data.corpus import PREPROCESSORS, Vocab
from rnnlm.models import build_model

FORMAT = "rnnlm-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("config", "vocab", "model", "optimizer", "progress", "rng", "best")

# Overrides that would change the network's shapes, the meaning of its inputs or the kind of
# optimizer state: the saved state would no longer fit, so resume refuses them up front
# instead of failing on shapes (model.dropout or model.backward may change).
FROZEN_ON_RESUME = ("model.kind", "model.hidden_size", "model.num_layers", "model.embedding_dim",
                    "data.preprocess", "train.optimizer")
# Overrides that move the data stream: harmless at an epoch boundary, but a checkpoint taken
# inside an epoch resumes at a batch index and a hidden state that only fit the old stream.
STREAM_KEYS = ("seed", "data.path", "data.data_dir", "data.max_tokens", "data.iterator",
               "data.batch_size", "data.num_steps",
               # variable_length draws the window cuts, so these move the batch positions too
               "train.truncation", "train.variable_length_p", "train.variable_length_std",
               "train.variable_length_min")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read, written or used for what was asked."""


# ---------------------------------------------------------------------------- writing

# Indirection so a test can make the serializer fail half way through a write.
_serialize = torch.save


def atomic_save(obj: dict, path: str | Path) -> None:
    """Write `obj` to `path` so that `path` always holds either the old or the new file."""
    path = Path(path)
    # A name of our own (not mkstemp) so the file gets the usual umask-based permissions.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            _serialize(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(f"could not write checkpoint {path}: "
                              f"{exc.strerror or exc}; the previous file is unchanged") from None
    finally:
        tmp.unlink(missing_ok=True)  # also on KeyboardInterrupt / SystemExit mid-write
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); not possible everywhere, so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- reading


def load_checkpoint(path: str | Path) -> dict:
    """Read and check a checkpoint; every failure is one CheckpointError line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found: give the path of a last.pt or "
                              f"best.pt written by rnnlm train (train.py)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file: give the path of a last.pt "
                              f"or best.pt written by rnnlm train (train.py)")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(f"{path} is not an rnnlm checkpoint: it is no file written by "
                              f"torch.save (or it is cut short)")
    try:
        with warnings.catch_warnings():  # e.g. pickle-protocol notes on foreign files
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise CheckpointError(f"{path} holds pickled Python objects and needs more than "
                                  f"torch.load(weights_only=True); rnnlm refuses to unpickle "
                                  f"it") from None
        raise CheckpointError(f"{path} is not an rnnlm checkpoint (unreadable pickle: "
                              f"{_first_line(exc)})") from None
    except Exception as exc:  # torch raises many types for foreign or damaged files
        raise CheckpointError(f"{path} is not an rnnlm checkpoint or is damaged "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not an rnnlm checkpoint "
                              f"(no format tag {FORMAT!r})")
    version = ckpt.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path} has no format version: it is not a complete rnnlm "
                              f"checkpoint")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}, newer than "
                              f"this rnnlm reads ({FORMAT_VERSION}): upgrade rnnlm")
    if version < 1:
        raise CheckpointError(f"{path} has an unknown checkpoint format version {version}")
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is incomplete: missing {', '.join(missing)}")
    return ckpt


def _first_line(exc: BaseException) -> str:
    """The gist of an exception: its first sentence, so the user sees one short line."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    return line.split(". ")[0].rstrip(".") if len(line) > 100 else line


def checkpoint_config(ckpt: dict, where: str = "checkpoint") -> Config:
    """The checkpoint's config, checked like any config file (defaults fill newer keys)."""
    return config_from_dict(ckpt["config"], source=where)


def checkpoint_vocab(ckpt: dict, where: str = "checkpoint") -> tuple[Vocab, str]:
    vocab = ckpt["vocab"]
    try:
        tokens, preprocess = list(vocab["tokens"]), vocab["preprocess"]
        if preprocess not in PREPROCESSORS:
            raise ValueError(f"unknown preprocessing {preprocess!r}")
        return Vocab(tokens), preprocess
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where} has a damaged vocabulary ({_first_line(exc)})") from None


def averaged_weights(ckpt: dict) -> dict | None:
    """The averaged (EMA) weights a run with train.ema_decay evaluated, or None."""
    average = (ckpt.get("run_state") or {}).get("average")
    return average["weights"] if average else None


def load_model_weights(model: torch.nn.Module, ckpt: dict, where: str = "checkpoint",
                       averaged: bool = False) -> None:
    """load_state_dict of the training weights, or with `averaged` of the weights that
    evaluation scored (the EMA when the run kept one); a mismatch (only possible for a damaged
    or hand-edited file, since config and vocabulary are checked first) is one line."""
    weights = (averaged and averaged_weights(ckpt)) or ckpt["model"]
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: the saved weights do not fit the model its config "
                              f"describes ({_first_line(exc)})") from None


def model_from_checkpoint(ckpt: dict, device: torch.device, where: str = "checkpoint"):
    """Rebuild the trained model from the checkpoint alone: (model, vocab, preprocess, cfg).
    The weights are the ones evaluation scored: the averaged copy when the run kept one."""
    cfg = checkpoint_config(ckpt, where)
    vocab, preprocess = checkpoint_vocab(ckpt, where)
    model = build_model(cfg.model, len(vocab))
    load_model_weights(model, ckpt, where, averaged=True)
    return model.to(device).eval(), vocab, preprocess, cfg


# ---------------------------------------------------------------------------- resuming


def resume_config(ckpt: dict, overrides: list[str] | tuple[str, ...], path: str | Path,
                  ) -> Config:
    """The config to resume with: the checkpoint's own, then `--set` overrides.

    The run continues in the folder that holds the checkpoint (so a moved run folder still
    resumes in place) unless `out_dir` is overridden. Overrides that change the model or
    its vocabulary are refused; see FROZEN_ON_RESUME and STREAM_KEYS.
    """
    path = Path(path)
    saved = checkpoint_config(ckpt, str(path))
    keys = [parse_override(item)[0] for item in overrides]
    cfg = config_from_dict(saved.to_dict(), overrides, source=f"--set (resuming {path})")
    check_resume_changes(ckpt, saved, cfg, keys, path, how="--set ")
    if "out_dir" not in keys:
        cfg.out_dir = str(path.parent)
    return cfg


def check_resume_changes(ckpt: dict, saved: Config, cfg: Config, keys, path: Path,
                         how: str) -> None:
    """Refuse changes (`keys`, dotted) from the checkpoint's config `saved` to `cfg` that a
    resumed run cannot make, and a run that has nothing left to train; `how` says where the
    change came from in the message ("--set " or the config file's name)."""
    progress = ckpt["progress"]
    old, new = saved.to_dict(), cfg.to_dict()
    for key in keys:
        before, after = _dotted(old, key), _dotted(new, key)
        if before == after:
            continue
        if key in FROZEN_ON_RESUME:
            raise CheckpointError(f"{how}{key}={after!r}: {path} was trained with {key}="
                                  f"{before!r}, and resuming cannot change the model, its "
                                  f"vocabulary or the optimizer; start a new run with "
                                  f"--config instead")
        if progress.get("batch", 0) and key in STREAM_KEYS:
            raise CheckpointError(f"{how}{key}={after!r}: {path} stopped inside epoch "
                                  f"{progress['epoch'] + 1}, and its position only fits the old "
                                  f"{key}={before!r}; resume without changing it")
    if cfg.train.epochs <= progress["epoch"]:
        raise CheckpointError(f"{path} has already completed {progress['epoch']} of "
                              f"train.epochs={cfg.train.epochs} epochs: pass --set "
                              f"train.epochs=N with N > {progress['epoch']} to train further")


def _dotted(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_compatible(ckpt: dict, cfg: Config, vocab: Vocab, where: str) -> None:
    """Refuse to put a checkpoint's weights into a run they do not fit, with the reason.

    Called before load_state_dict, so a mismatch is a sentence, not a shape traceback.
    """
    saved = checkpoint_config(ckpt, where)
    for name in ("kind", "hidden_size", "num_layers", "embedding_dim"):
        before, after = getattr(saved.model, name), getattr(cfg.model, name)
        if before != after:
            raise CheckpointError(f"{where} holds a model with model.{name}={before!r}, but "
                                  f"this run asks for model.{name}={after!r}: resume with the "
                                  f"checkpoint's own model or start a new run")
    if saved.train.optimizer != cfg.train.optimizer:
        raise CheckpointError(f"{where} was trained with train.optimizer="
                              f"{saved.train.optimizer!r}, but this run asks for "
                              f"{cfg.train.optimizer!r}: its optimizer state cannot carry over")
    saved_vocab, preprocess = checkpoint_vocab(ckpt, where)
    if preprocess != cfg.data.preprocess:
        raise CheckpointError(f"{where} was trained with data.preprocess={preprocess!r}, but "
                              f"this run uses {cfg.data.preprocess!r}")
    if saved_vocab != vocab:
        gained = sorted(set(vocab.tokens) - set(saved_vocab.tokens))
        lost = sorted(set(saved_vocab.tokens) - set(vocab.tokens))
        detail = "; ".join(part for part in (
            f"new characters {''.join(gained)!r}" if gained else "",
            f"missing characters {''.join(lost)!r}" if lost else "",
            "same characters in another order" if not gained and not lost else "") if part)
        raise CheckpointError(f"the corpus of this run gives a vocabulary of {len(vocab)} "
                              f"tokens, but {where} was trained on {len(saved_vocab)} ({detail}): "
                              f"resume on the same text")


# ---------------------------------------------------------------------------- RNG states


def capture_rng() -> dict:
    """Every random generator the run may draw from, as plain data and tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    """Put the generators back where capture_rng found them. CUDA/MPS states are restored
    when this machine has that device (a GPU checkpoint resumed on a CPU skips them)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"],
                         nps["has_gauss"], nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        for index, cuda_state in enumerate(cuda_states):
            torch.cuda.set_rng_state(cuda_state, index)
    if "mps" in state and getattr(torch.backends, "mps", None) \
            and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


# ---------------------------------------------------------------------------- the run


CHECKPOINT_NAMES = ("last.pt", "best.pt")


def make_checkpoint(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    vocab: Vocab, preprocess: str, progress: dict, best: dict | None,
                    record: dict, run_state: dict | None = None) -> dict:
    """The dict that atomic_save writes (see the module docstring for its keys)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "torch_version": str(torch.__version__),
        "config": cfg.to_dict(),
        "vocab": {"tokens": list(vocab.tokens), "preprocess": preprocess},
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "progress": progress, "rng": capture_rng(), "best": best, "record": record,
        "run_state": run_state,
    }


def claim_out_dir(out_dir: Path, overwrite: bool, delete: bool = True) -> None:
    """Refuse to start a new run over a folder that holds a checkpoint, so a finished run is
    never clobbered by accident; with `overwrite` the old checkpoints are removed first (a
    stale best.pt must not outlive the run it came from) by the one process that `delete`s
    (rank 0 of a DDP job; every rank checks)."""
    existing = [out_dir / name for name in CHECKPOINT_NAMES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise CheckpointError(f"{out_dir} already holds {existing[0].name} from an earlier run: "
                              f"continue it with `rnnlm train --resume {existing[0]}`, "
                              f"pass --overwrite to start over, or pick another out_dir "
                              f"(--set out_dir=...)")
    for path in existing if delete else []:
        path.unlink(missing_ok=True)


def restore_training(ckpt: dict, cfg: Config, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, vocab: Vocab, where: str) -> dict:
    """Load weights and optimizer state into a freshly built run; returns ckpt's progress.

    Hyper-parameters the user changed on resume (train.lr, train.weight_decay) win over the
    values that optimizer.load_state_dict brings back; unchanged ones keep the saved values,
    which is what makes the continuation exact.
    """
    check_compatible(ckpt, cfg, vocab, where)
    progress = ckpt["progress"]
    if cfg.train.epochs <= progress["epoch"]:
        raise CheckpointError(f"{where} has already completed {progress['epoch']} of "
                              f"train.epochs={cfg.train.epochs} epochs: set train.epochs "
                              f"higher to train further")
    load_model_weights(model, ckpt, where)
    saved = checkpoint_config(ckpt, where)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: the saved optimizer state does not fit "
                              f"train.optimizer={cfg.train.optimizer} "
                              f"({_first_line(exc)})") from None
    for name in ("lr", "weight_decay"):
        value = getattr(cfg.train, name)
        if value != getattr(saved.train, name):
            for group in optimizer.param_groups:
                group[name] = value
    return progress
