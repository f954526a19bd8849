"""Corpus loading: the Time Machine (downloaded and verified), preprocessing, vocabulary.

Tokenising is vectorised with NumPy over Unicode code points: a character-level corpus of
any size becomes an integer array without a Python loop over characters.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnlm.config import ConfigError, DataConfig

TIME_MACHINE_URL = "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"
TIME_MACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
TIME_MACHINE_FILE = "timemachine.txt"
UNK = "<unk>"


class DataError(ConfigError):
    """A user-facing data problem (missing file, bad checksum, corpus too short)."""


# ---------------------------------------------------------------------------- the text


def sha1_of(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_time_machine(data_dir: str | Path, url: str = TIME_MACHINE_URL,
                        sha1: str = TIME_MACHINE_SHA1, timeout: float = 30.0) -> Path:
    """Return the path of the verified Time Machine text, downloading it when missing.

    The download goes to a temporary file beside the target and is renamed into place only
    after its sha1 matches, so a failed or corrupt download never leaves a file behind.
    """
    data_dir = Path(data_dir)
    target = data_dir / TIME_MACHINE_FILE
    if target.is_file():
        found = sha1_of(target)
        if found != sha1:
            raise DataError(f"{target} has sha1 {found}, expected {sha1}: delete it to "
                            f"download a fresh copy")
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".timemachine.", suffix=".part", dir=data_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                while block := response.read(1 << 16):
                    out.write(block)
        found = sha1_of(tmp)
        if found != sha1:
            raise DataError(f"downloaded {url} has sha1 {found}, expected {sha1}: the server "
                            f"sent a different file; nothing was kept")
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"could not download the Time Machine from {url} ({exc}); put the "
                        f"file at {target} by hand (sha1 {sha1})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data.path {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8 (byte offset {exc.start}): convert it "
                        f"to UTF-8") from None
    # Universal newlines, as Python's text mode (and so D2L's readlines) gives them.
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ---------------------------------------------------------------------------- preprocessing


def preprocess_d2l(text: str) -> str:
    """D2L's `read_time_machine` + char tokenize, without a loop over lines.

    Per line D2L keeps letters, turns every other run into one space, strips and lowercases,
    then concatenates the lines with no separator. Removing spaces around newlines and then
    the newlines themselves does exactly that in two passes of the regex engine.
    """
    text = re.sub(r"[^A-Za-z\n]+", " ", text)
    text = re.sub(r" *\n *", "", text)
    return text.strip().lower()


PREPROCESSORS = {"d2l": preprocess_d2l, "raw": lambda text: text}


def code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class Vocab:
    """Characters <-> ids. Index 0 is always `<unk>` so unknown input can be mapped to it."""

    def __init__(self, tokens: list[str]):
        if not tokens or tokens[0] != UNK:
            raise ValueError("a vocabulary starts with <unk>")
        self.tokens = list(tokens)
        chars = self.tokens[1:]
        cps = np.array([ord(c) for c in chars], dtype=np.int64)
        order = np.argsort(cps)
        self._sorted_cps = cps[order]
        self._sorted_ids = (order + 1).astype(np.int64)
        self.index = {tok: i for i, tok in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens

    @classmethod
    def build(cls, cps: np.ndarray, order: str) -> Vocab:
        """`order="frequency"`: D2L's (most frequent first, ties by first occurrence);
        `order="sorted"`: by code point."""
        uniq, first, counts = np.unique(cps, return_index=True, return_counts=True)
        if order == "frequency":
            uniq = uniq[np.lexsort((first, -counts))]
        return cls([UNK] + [chr(c) for c in uniq.tolist()])

    def encode(self, text: str, unknown: str = "error") -> np.ndarray:
        """Ids of `text`; characters outside the vocabulary raise, or map to <unk> (0)."""
        cps = code_points(text).astype(np.int64)
        pos = np.searchsorted(self._sorted_cps, cps)
        pos = np.minimum(pos, max(len(self._sorted_cps) - 1, 0))
        known = self._sorted_cps[pos] == cps if len(self._sorted_cps) else np.zeros_like(cps,
                                                                                         bool)
        ids = np.where(known, self._sorted_ids[pos], 0)
        if unknown == "error" and not known.all():
            missing = sorted({chr(c) for c in cps[~known].tolist()})
            raise KeyError(missing)
        return ids

    def decode(self, ids) -> str:
        return "".join(self.tokens[int(i)] for i in ids)


def smallest_uint(vocab_size: int):
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return dtype
    raise DataError(f"vocabulary of {vocab_size} tokens is too large")


@dataclass
class Corpus:
    ids: np.ndarray  # 1-D, unsigned ints (the smallest dtype that fits the vocabulary)
    vocab: Vocab
    preprocess: str
    source: str

    def __len__(self) -> int:
        return len(self.ids)


def tokenize(text: str, preprocess: str) -> tuple[np.ndarray, Vocab]:
    text = PREPROCESSORS[preprocess](text)
    cps = code_points(text)
    vocab = Vocab.build(cps, order="frequency" if preprocess == "d2l" else "sorted")
    ids = vocab.encode(text, unknown="replace").astype(smallest_uint(len(vocab)))
    return ids, vocab


def resolve_source(cfg: DataConfig) -> Path:
    if cfg.path is None:
        return ensure_time_machine(cfg.data_dir)
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"data.path {path} does not exist: give a UTF-8 text file")
    return path


def load_corpus(cfg: DataConfig) -> Corpus:
    """The token ids and vocabulary for a data config (vocabulary from the whole text, as D2L
    builds it, then the first `max_tokens` ids)."""
    source = resolve_source(cfg)
    ids, vocab = tokenize(read_text(source), cfg.preprocess)
    if cfg.max_tokens is not None:
        ids = ids[: cfg.max_tokens]
    check_corpus_length(len(ids), cfg.batch_size, cfg.num_steps, str(source))
    return Corpus(ids=ids, vocab=vocab, preprocess=cfg.preprocess, source=str(source))


def min_corpus_tokens(batch_size: int, num_steps: int) -> int:
    # The worst random offset is num_steps; then each of batch_size lanes needs one full
    # window, plus one token for the shifted targets.
    return (batch_size + 1) * num_steps + 1


def check_corpus_length(n: int, batch_size: int, num_steps: int, where: str) -> None:
    need = min_corpus_tokens(batch_size, num_steps)
    if n < need:
        raise DataError(f"{where} gives {n} tokens, but data.batch_size={batch_size} x "
                        f"data.num_steps={num_steps} needs at least {need}: use a longer text, "
                        f"more data.max_tokens, or a smaller batch_size/num_steps")
