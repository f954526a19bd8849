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
    data                        the fingerprint of the training data: the text's content hash,
                                its source, preprocessing, max_tokens and split, the stream's
                                length (rnnlm.data.corpus.data_fingerprint; absent in
                                checkpoints of older versions), so that a resumed run refuses
                                a text that changed

Files load with `torch.load(..., map_location="cpu", weights_only=True)`, so a checkpoint
written on a GPU loads anywhere, and any file that would need to unpickle more than that is
refused. Writes go to a temporary file in the same directory, are flushed and fsynced, and
then renamed over the target: a crash or a full disk in the middle leaves the previous file
as it was.

Every file is sealed: the zip archive's comment at its very end holds the sha256 of all the
bytes before it (write_sealed). Loading checks each member's CRC-32 and the seal before
torch.load runs (verify_integrity), so a file with a flipped byte anywhere, cut short or
with bytes appended is refused with what is wrong, instead of loading other numbers.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from rnnlm.config import Config, ConfigError, config_from_dict, parse_override
from rnnlm.data.corpus import PREPROCESSORS, Vocab
from rnnlm.files import WriteError, write_atomic
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
STREAM_KEYS = ("seed", "data.path", "data.data_dir", "data.max_tokens", "data.split",
               "data.encoding_errors", "data.iterator", "data.batch_size", "data.num_steps",
               # variable_length draws the window cuts, so these move the batch positions too
               "train.truncation", "train.variable_length_p", "train.variable_length_std",
               "train.variable_length_min",
               # R-Drop carries two states a lane: on or off changes the carried state's lanes
               "train.rdrop")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read, written or used for what was asked."""


# ---------------------------------------------------------------------------- writing

# The seal at the end of every checkpoint: the zip archive's comment (the last bytes of the
# file, which torch.load skips) holds the sha256 of all the bytes before it.
SEAL_PREFIX = b"rnnlm-sha256 "
_SEAL_SIZE = len(SEAL_PREFIX) + 64
_LOCAL_HEADER = b"PK\x03\x04"  # how every zip archive, and so every torch.save file, starts
_END_SIGNATURE = b"PK\x05\x06"  # the end-of-central-directory record, 22 bytes + comment
_END_SIZE = 22


def write_sealed(obj: dict, f) -> None:
    """torch.save `obj` into the open file `f`, sealed: the zip comment, empty in what
    torch.save writes, becomes SEAL_PREFIX and the hex sha256 of every byte before it (the
    comment's length field included), which verify_integrity checks on loading."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    head = data[:-2]  # all but the comment length, which torch.save leaves at 0
    if bytes(data[-_END_SIZE:-_END_SIZE + 4]) != _END_SIGNATURE or bytes(data[-2:]) != b"\0\0":
        f.write(data)  # not the archive layout this seal is made for: write it unsealed
        return
    length = struct.pack("<H", _SEAL_SIZE)
    digest = hashlib.sha256(head)
    digest.update(length)
    f.write(head)
    f.write(length + SEAL_PREFIX + digest.hexdigest().encode("ascii"))


# Indirection so a test can make the serializer fail half way through a write.
_serialize = write_sealed


def atomic_save(obj: dict, path: str | Path) -> None:
    """Write `obj` to `path` so that `path` always holds either the old or the new file
    (rnnlm.files.write_atomic); a failed write is one CheckpointError line naming the file
    and the reason, and leaves no temporary file."""
    try:
        write_atomic(path, lambda f: _serialize(obj, f), what="checkpoint")
    except WriteError as exc:
        raise CheckpointError(str(exc)) from None


# ---------------------------------------------------------------------------- reading


def load_checkpoint(path: str | Path) -> dict:
    """Read and check a checkpoint; every failure is one CheckpointError line.

    The bytes are read once and verified (verify_integrity) before torch.load sees them, and
    torch.load reads those same bytes, so nothing that was not verified is ever used."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found: give the path of a last.pt or "
                              f"best.pt written by rnnlm train (train.py)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file: give the path of a last.pt "
                              f"or best.pt written by rnnlm train (train.py)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    verify_integrity(data, path)
    try:
        with warnings.catch_warnings():  # e.g. pickle-protocol notes on foreign files
            warnings.simplefilter("ignore")
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The bytes are intact (verified above), so this is what the file really holds.
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


def verify_integrity(data: bytes, path: str | Path) -> None:
    """Refuse the bytes of a checkpoint file unless they are a whole, undamaged zip archive.

    torch.save writes a zip archive whose members (the pickle, each tensor's storage) carry
    a CRC-32, and rnnlm seals the archive with the sha256 of all its bytes (write_sealed).
    The CRCs name the member that changed; the seal also covers what they leave out (the zip
    headers and directory), so a flipped byte anywhere in a sealed file is refused. Files
    from before the seal, or torch.save'd by hand, are checked by their CRCs alone."""
    if not data.startswith(_LOCAL_HEADER):
        what = "it is empty" if not data else \
            "it is no file written by torch.save (or its first bytes are damaged)"
        raise CheckpointError(f"{path} is not an rnnlm checkpoint: {what}")
    end = _end_record(data)
    if end is None:
        raise CheckpointError(f"{path} is not an rnnlm checkpoint, or not all of one: it is cut "
                              f"short (truncated) or damaged at its end (its zip archive has no "
                              f"end record)")
    if end[1] < len(data):
        raise CheckpointError(f"{path} is damaged: {len(data) - end[1]:,} bytes follow the end "
                              f"of its zip archive (appended to, or its end record changed)")
    member = None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                member = info.filename
                with archive.open(info) as stream:  # reading to the end checks the CRC
                    while stream.read(1 << 20):
                        pass
    except zipfile.BadZipFile as exc:
        if str(exc).startswith("Bad CRC-32"):
            raise CheckpointError(f"{path} is corrupt: member {member} fails its CRC-32 check "
                                  f"(its bytes changed after it was written)") from None
        raise CheckpointError(f"{path} is corrupt: its zip structure is damaged "
                              f"({_first_line(exc)})") from None
    except Exception as exc:  # zipfile raises several types on damaged headers
        raise CheckpointError(f"{path} is corrupt: its zip structure is damaged "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    comment = data[end[0] + _END_SIZE:]
    if not comment:
        return  # unsealed: written before the seal, or by torch.save directly
    sealed = comment.startswith(SEAL_PREFIX) and len(comment) == _SEAL_SIZE
    if not sealed or comment[len(SEAL_PREFIX):].decode("ascii", "replace") != \
            hashlib.sha256(data[: end[0] + _END_SIZE]).hexdigest():
        raise CheckpointError(f"{path} is corrupt: its bytes do not match the sha256 sealed at "
                              f"its end (damage outside the members' data: the zip headers, "
                              f"directory or seal)")


def _end_record(data: bytes) -> tuple[int, int] | None:
    """(offset, end) of the zip's end-of-central-directory record, `end` being where the
    record and its comment stop; the candidate that reaches exactly to the end of `data` wins.
    None when there is no record at all (a file cut short)."""
    low = max(0, len(data) - _END_SIZE - 0xFFFF)  # the comment is at most 65535 bytes
    found = None
    at = data.rfind(_END_SIGNATURE, low)
    while at >= 0:
        if at + _END_SIZE <= len(data):
            (comment_size,) = struct.unpack_from("<H", data, at + _END_SIZE - 2)
            end = at + _END_SIZE + comment_size
            if end == len(data):
                return at, end
            if end < len(data) and found is None:
                found = (at, end)
        at = data.rfind(_END_SIGNATURE, low, at)
    return found


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
    or hand-edited file, since config and vocabulary are checked first) is one line naming the
    first parameter that does not fit."""
    weights = (averaged and averaged_weights(ckpt)) or ckpt["model"]
    which = "averaged weights" if weights is not ckpt["model"] else "weights"
    problem = weights_mismatch(model.state_dict(), weights)
    if problem is None:
        try:
            model.load_state_dict(weights)
            return
        except (RuntimeError, KeyError, TypeError) as exc:
            problem = _first_line(exc)
    raise CheckpointError(f"{where}: the saved {which} do not fit the model its config "
                          f"describes: {problem}")


def weights_mismatch(expected: dict, saved) -> str | None:
    """The first way the state_dict `saved` does not fit a model whose own state_dict is
    `expected`, in words (a missing or unexpected parameter, or its two shapes); None when
    every parameter is there with its shape."""
    if not isinstance(saved, dict):
        return f"they are a {type(saved).__name__}, not a state_dict"
    for key, tensor in expected.items():
        if key not in saved:
            return f"the checkpoint has no {key} (shape {_shape(tensor)} in the model)"
        value = saved[key]
        if not isinstance(value, torch.Tensor):
            return f"{key} is a {type(value).__name__}, not a tensor"
        if value.shape != tensor.shape:
            return (f"{key} has shape {_shape(value)} in the checkpoint, {_shape(tensor)} "
                    f"in the model")
    extra = [key for key in saved if key not in expected]
    return f"the checkpoint's {extra[0]} is no parameter of the model" if extra else None


def _shape(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(str(size) for size in tensor.shape) + ")"


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
        raise CheckpointError(f"the corpus of this run gives a vocabulary of {len(vocab)} "
                              f"tokens, but {where} was trained on {len(saved_vocab)} "
                              f"({vocab_difference(saved_vocab, vocab)}): resume on the same text")


def vocab_difference(saved: Vocab, now: Vocab) -> str:
    """How the vocabulary `now` differs from `saved`, in words."""
    gained = sorted(set(now.tokens) - set(saved.tokens))
    lost = sorted(set(saved.tokens) - set(now.tokens))
    return "; ".join(part for part in (
        f"new characters {''.join(gained)!r}" if gained else "",
        f"missing characters {''.join(lost)!r}" if lost else "",
        "same characters in another order" if not gained and not lost else "") if part)


def check_same_data(ckpt: dict, fingerprint: dict | None, where: str) -> str | None:
    """Refuse to resume `ckpt` on a text other than the one it was trained on.

    `fingerprint` is the resumed run's (rnnlm.data.corpus.data_fingerprint). The text is
    compared by content hash, whatever data.path says, so an edited file is caught and a
    moved one is not; the settings that cut the stream (max_tokens, split) are config keys
    and follow the rules of check_resume_changes. Returns a one-line note when `ckpt` is from
    a version that kept no fingerprint (nothing can be compared), else None."""
    saved = ckpt.get("data")
    if not isinstance(saved, dict) or not saved.get("text_sha1"):
        return (f"note: {where} was written by an older rnnlm that kept no fingerprint of its "
                f"training text, so a changed text cannot be noticed; resuming on "
                f"{(fingerprint or {}).get('source', 'the text of the config')} as it is now")
    if fingerprint is None:
        return None
    before, now = saved["text_sha1"], fingerprint["text_sha1"]
    if before != now:
        moved = "" if saved.get("source") == fingerprint["source"] else \
            f" (trained on {saved.get('source')})"
        raise CheckpointError(
            f"the training text changed since {where} was written: {fingerprint['source']} "
            f"now has sha1 {now[:12]}, the checkpoint was trained on sha1 {before[:12]}"
            f"{moved}; resume on the text it was trained on, or start a new run from its "
            f"weights with --init-from {where}")
    return None


def load_initial_weights(model: torch.nn.Module, ckpt: dict, cfg: Config, vocab: Vocab,
                         where: str) -> None:
    """--init-from: put the trained weights of `ckpt` (the training weights, not the averaged
    EMA copy) into the freshly built `model` of a new run with config `cfg` and vocabulary
    `vocab`. Only the weights come over (no optimizer state, schedule or position), so they
    must fit: the same model.kind, every parameter with its shape, and a vocabulary whose
    characters the checkpoint knows. Ids are matched by character, so the run's text may use
    fewer characters, or order them otherwise (data.preprocess d2l orders them by frequency,
    which differs from text to text). Anything else is refused with what does not fit."""
    saved = checkpoint_config(ckpt, where)
    if saved.model.kind != cfg.model.kind:
        raise CheckpointError(f"--init-from {where}: it holds a model.kind={saved.model.kind!r} "
                              f"model, but this run builds model.kind={cfg.model.kind!r}; "
                              f"start from a checkpoint of the same kind")
    saved_vocab, preprocess = checkpoint_vocab(ckpt, where)
    unknown = [token for token in vocab.tokens if token not in saved_vocab.index]
    if unknown:
        how = "" if preprocess == cfg.data.preprocess else \
            f"; it was trained with data.preprocess={preprocess!r}, this run uses " \
            f"{cfg.data.preprocess!r}"
        raise CheckpointError(f"--init-from {where}: this run's text has characters its "
                              f"vocabulary of {len(saved_vocab)} tokens lacks, so they have no "
                              f"trained weights: {''.join(unknown)!r}{how}")
    weights = ckpt["model"]
    if saved_vocab != vocab:
        weights = reorder_vocabulary(weights, cfg, saved_vocab, vocab)
    problem = weights_mismatch(model.state_dict(), weights)
    if problem is not None:
        changed = [f"model.{name}={getattr(saved.model, name)!r} there, "
                   f"{getattr(cfg.model, name)!r} here"
                   for name in ("hidden_size", "num_layers", "embedding_dim")
                   if getattr(saved.model, name) != getattr(cfg.model, name)]
        raise CheckpointError(f"--init-from {where}: its weights do not fit this run's model: "
                              f"{problem}" + (f" ({'; '.join(changed)})" if changed else ""))
    load_model_weights(model, {"model": weights}, where)


def reorder_vocabulary(weights: dict, cfg: Config, saved: Vocab, vocab: Vocab) -> dict:
    """`weights` (trained with the vocabulary `saved`) with every vocabulary axis (one-hot
    input columns, embedding rows, output rows) indexed by the ids of `vocab` instead, whose
    characters `saved` all holds. Which axes those are is asked of the model itself: built
    for two vocabulary sizes on the meta device (no memory, no random draws), the axes whose
    length differs are the vocabulary's."""
    with torch.device("meta"):
        one = build_model(cfg.model, len(vocab), cfg.train).state_dict()
        more = build_model(cfg.model, len(vocab) + 1, cfg.train).state_dict()
    index = torch.tensor([saved.index[token] for token in vocab.tokens], dtype=torch.long)
    reordered = dict(weights)
    for name, tensor in one.items():
        value = weights.get(name)
        if name not in more or not isinstance(value, torch.Tensor) or \
                value.dim() != tensor.dim():
            continue  # weights_mismatch names what does not fit
        for axis, (a, b) in enumerate(zip(tensor.shape, more[name].shape, strict=True)):
            if a != b and value.shape[axis] == len(saved):
                value = value.index_select(axis, index)
        reordered[name] = value
    return reordered


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
                    record: dict, run_state: dict | None = None,
                    data: dict | None = None) -> dict:
    """The dict that atomic_save writes (see the module docstring for its keys); `data` is
    the fingerprint of the training data (rnnlm.data.corpus.data_fingerprint)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "torch_version": str(torch.__version__),
        "config": cfg.to_dict(),
        "vocab": {"tokens": list(vocab.tokens), "preprocess": preprocess},
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "progress": progress, "rng": capture_rng(), "best": best, "record": record,
        "run_state": run_state, "data": data,
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
    # Which kernels run the update (fused or foreach) is this run's choice, not the saved
    # run's (the results agree to rounding); load_state_dict would bring the saved one back.
    kernels = [{key: group.get(key) for key in ("fused", "foreach")}
               for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: the saved optimizer state does not fit "
                              f"train.optimizer={cfg.train.optimizer} "
                              f"({_first_line(exc)})") from None
    for group, kept in zip(optimizer.param_groups, kernels):
        group.update(kept)
        for param in group["params"] if kept["fused"] else ():
            state = optimizer.state.get(param, {})
            if "step" in state:  # fused kernels read the step count where the weights are
                state["step"] = state["step"].to(param.device, torch.float32)
    for name in ("lr", "weight_decay"):
        value = getattr(cfg.train, name)
        if value != getattr(saved.train, name):
            for group in optimizer.param_groups:
                group[name] = value
    return progress
