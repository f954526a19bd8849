"""Corpus loading: the Time Machine (downloaded and verified), preprocessing, vocabulary.

`load_corpus` turns a data config into token ids: the text (the Time Machine, one file or a
folder of `.txt` files, see `sources.py`) is tokenised without a Python loop over characters
(see `tokens.py`), cached on disk as a memory-mapped id file, cut to `data.max_tokens`, and
split into train / validation / test parts (see `splits.py`). The corpus carries the
fingerprint of what it was made from (`data_fingerprint`: the text's content hash and the
settings that shaped the stream), which checkpoints keep.
"""

from __future__ import annotations

import hashlib
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rnnlm.data.sources import DataError, content_hash, list_source_files
from rnnlm.data.splits import Splits, check_heldout_lengths, split_ids
from rnnlm.data.tokens import (
    CACHE_FORMAT,
    ChangedWhileReading,
    CharCounts,
    block_code_points,
    cache_key,
    d2l_code_points,
    encode_blocks,
    lookup_table,
    raw_code_points,
    read_entry,
    spaced_code_points,
    write_entry,
)
from rnnlm.files import WriteError, ensure_directory, write_atomic

if TYPE_CHECKING:  # the data layer reads a DataConfig but imports nothing above it
    from rnnlm.config import DataConfig

TIME_MACHINE_URL = "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"
TIME_MACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
TIME_MACHINE_FILE = "timemachine.txt"
UNK = "<unk>"


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
    ensure_directory(data_dir, "data.data_dir")

    def failed(exc: BaseException) -> DataError:
        return DataError(f"could not download the Time Machine from {url} ({exc}); put the "
                         f"file at {target} by hand (sha1 {sha1})")

    def download(out) -> None:
        # Network errors are caught around the network calls only: an OSError from `out`
        # is the disk's, and write_atomic reports it as such.
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, OSError) as exc:
            raise failed(exc) from None
        digest = hashlib.sha1()
        with response:
            while True:
                try:
                    block = response.read(1 << 16)
                except OSError as exc:
                    raise failed(exc) from None
                if not block:
                    break
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != sha1:
            raise DataError(f"downloaded {url} has sha1 {digest.hexdigest()}, expected {sha1}: "
                            f"the server sent a different file; nothing was kept")

    return write_atomic(target, download)


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


def preprocess_d2l_spaced(text: str) -> str:
    """D2L 1.0's `TimeMachine._preprocess`: every run of non-letters, line breaks included,
    becomes one space, then lowercase. Unlike `d2l` (D2L 0.17), the words at the two ends of
    a line stay apart instead of being joined into one."""
    return re.sub(r"[^A-Za-z]+", " ", text).lower()


PREPROCESSORS = {"d2l": preprocess_d2l, "d2l_spaced": preprocess_d2l_spaced,
                 "raw": lambda text: text}


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
    def from_counts(cls, counts: CharCounts, order: str) -> Vocab:
        """`order="frequency"`: D2L's (most frequent first, ties by first occurrence);
        `order="sorted"`: by code point."""
        chars = np.flatnonzero(counts.counts)
        if order == "frequency":
            chars = chars[np.lexsort((counts.first[chars], -counts.counts[chars]))]
        return cls([UNK] + [chr(c) for c in chars.tolist()])

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
    ids: np.ndarray  # 1-D unsigned ints (smallest dtype for the vocabulary), often a memmap
    vocab: Vocab
    preprocess: str
    source: str
    splits: Splits
    from_cache: bool = False
    # What the stream was made from (data_fingerprint): checkpoints keep it, so a resumed run
    # can tell that its text changed
    fingerprint: dict | None = None

    def __len__(self) -> int:
        return len(self.ids)


def vocab_order(preprocess: str) -> str:
    return "frequency" if preprocess == "d2l" else "sorted"


def tokenize(text: str, preprocess: str) -> tuple[np.ndarray, Vocab]:
    """In-memory tokenising of one string, by the same code as the corpus pipeline."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if preprocess == "d2l":
        cps = d2l_code_points(text.encode("utf-8"))
    elif preprocess == "d2l_spaced":
        cps = spaced_code_points(text.encode("utf-8"), ends_in_space=False)
    else:
        cps = raw_code_points(text)
    counts = CharCounts(track_first=preprocess == "d2l")
    counts.add(cps)
    vocab = Vocab.from_counts(counts, vocab_order(preprocess))
    return lookup_table(vocab.tokens, smallest_uint(len(vocab)))[cps], vocab


def tokenize_files(files: list[Path], preprocess: str, encoding_errors: str,
                   cache_dir: Path | None, text_hash: str | None = None,
                   ) -> tuple[np.ndarray, Vocab, bool]:
    """Token ids, vocabulary, and whether the cache already held them.

    With a cache directory the ids come back memory-mapped from it (written first when
    missing); without one they are built in memory and nothing is written. `text_hash`: the
    files' content_hash when the caller has it already.
    """
    if cache_dir is None:
        ids, vocab = _tokenize(files, preprocess, encoding_errors, sink=None)
        return ids, vocab, False
    key = cache_key(text_hash or content_hash(files), preprocess, encoding_errors)
    entry = read_entry(cache_dir, key)
    from_cache = entry is not None
    if not from_cache:
        _tokenize(files, preprocess, encoding_errors, sink=(cache_dir, key))
        entry = read_entry(cache_dir, key)
        if entry is None:
            raise DataError(f"the token cache in {cache_dir} could not be read back: delete "
                            f"{cache_dir / key}.* and run again")
    ids, meta = entry
    return ids, Vocab(meta["vocab"]), from_cache


def _tokenize(files: list[Path], preprocess: str, encoding_errors: str,
              sink: tuple[Path, str] | None) -> tuple[np.ndarray | None, Vocab]:
    """The two passes: count (-> vocabulary), then encode into memory (sink None, returns the
    ids) or into the cache entry `sink` = (directory, key) (returns None for the ids)."""
    def blocks():
        return block_code_points(files, preprocess, encoding_errors)

    counts = CharCounts(track_first=preprocess == "d2l")
    for cps in blocks():
        counts.add(cps)
    vocab = Vocab.from_counts(counts, vocab_order(preprocess))
    dtype = smallest_uint(len(vocab))
    table = lookup_table(vocab.tokens, dtype)
    try:
        if sink is None:
            ids = np.empty(counts.total, dtype=dtype)
            filled = 0

            def into_array(part: np.ndarray) -> None:
                nonlocal filled
                ids[filled: filled + len(part)] = part
                filled += len(part)

            encode_blocks(blocks(), table, counts.total, into_array)
            return ids, vocab
        cache_dir, key = sink
        meta = {"format": CACHE_FORMAT, "dtype": np.dtype(dtype).name, "length": counts.total,
                "vocab": vocab.tokens, "preprocess": preprocess,
                "encoding_errors": encoding_errors, "sources": [str(f) for f in files]}
        try:
            write_entry(cache_dir, key, meta,
                        lambda f: encode_blocks(blocks(), table, counts.total, f.write))
        except WriteError as exc:
            raise DataError(f"cannot write the token cache {exc.path} ({exc.reason}): set "
                            f"data.cache: false, or a writable data.data_dir") from None
        return None, vocab
    except ChangedWhileReading:
        raise DataError(f"{files[0] if len(files) == 1 else 'a file of data.path'} changed "
                        f"while it was being read: run again once it is stable") from None


def corpus_files(cfg: DataConfig) -> list[Path]:
    if cfg.path is None:
        return [ensure_time_machine(cfg.data_dir)]
    return list_source_files(Path(cfg.path))


def load_corpus(cfg: DataConfig) -> Corpus:
    """The token ids, vocabulary and splits for a data config.

    The vocabulary comes from the whole text, as D2L builds it; `max_tokens` then keeps the
    first ids of the stream, and the split cuts that (so max_tokens bounds all three parts).
    """
    files = corpus_files(cfg)
    source = str(cfg.path) if cfg.path is not None else str(files[0])
    cache_dir = Path(cfg.data_dir) / "cache" if cfg.cache else None
    text_hash = content_hash(files)  # before tokenising: the text the ids come from
    ids, vocab, from_cache = tokenize_files(files, cfg.preprocess, cfg.encoding_errors,
                                            cache_dir, text_hash)
    if cfg.max_tokens is not None:
        ids = ids[: cfg.max_tokens]
    splits = split_ids(ids, cfg.split)
    where = source if cfg.split is None else f"the training split of {source}"
    check_corpus_length(len(splits.train), cfg.batch_size, cfg.num_steps, where)
    check_heldout_lengths(splits, cfg.eval_lanes, source)
    fingerprint = data_fingerprint(text_hash, files, source, cfg, len(ids), len(splits.train))
    return Corpus(ids=ids, vocab=vocab, preprocess=cfg.preprocess, source=source,
                  splits=splits, from_cache=from_cache, fingerprint=fingerprint)


def data_fingerprint(text_hash: str, files: list[Path], source: str, cfg: DataConfig,
                     tokens: int, train_tokens: int) -> dict:
    """What a run's token stream was made from, as plain data for its checkpoints: the
    text's content hash (the token cache's, over the files' sizes and bytes: renaming or
    moving the text keeps it), where the text was read, and the settings that turn the text
    into the stream (preprocessing, bad-byte handling, max_tokens, split) with the lengths
    they gave."""
    return {"text_sha1": text_hash, "source": source, "files": len(files),
            "preprocess": cfg.preprocess, "encoding_errors": cfg.encoding_errors,
            "max_tokens": cfg.max_tokens, "split": None if cfg.split is None else list(cfg.split),
            "tokens": tokens, "train_tokens": train_tokens}


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
