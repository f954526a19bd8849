"""Streaming tokenisation and the on-disk token cache.

A corpus is tokenised in two passes over its line blocks (see `sources.py`), so memory stays
at a few blocks whatever the corpus size: the first pass counts characters (the vocabulary
needs the whole text), the second maps every block to ids and hands them to a sink (a file
for the cache, or an array). Each block is preprocessed with NumPy, never with a Python loop
over characters: `d2l` works on the UTF-8 bytes directly (every non-ASCII byte is a
non-letter, exactly as its code point would be), and so does `d2l_spaced`; `raw` works on
the block's code points.

The cache keeps the ids as a flat `uint8`/`uint16`/`uint32` file plus a JSON sidecar (the
vocabulary, dtype and length), named by a key over the text's content hash, the
preprocessing and `encoding_errors`; a later run maps the file with `np.memmap` instead of
tokenising again. Files are written to a temporary name and renamed into place (the sidecar
last), so a crash leaves either a complete entry or none.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from rnnlm.data.sources import iter_line_blocks
from rnnlm.files import ensure_directory, write_atomic

CACHE_FORMAT = 1
MAX_CODE_POINT = 0x10FFFF
SPACE, NEWLINE = 32, 10


# ---------------------------------------------------------------------------- one block


def _letter_classes(keep_newline: bool) -> bytes:
    """A bytes.translate table: ASCII letters -> lowercase, all else -> space (newline kept
    when asked)."""
    table = bytearray(b" " * 256)
    for c in range(256):
        if chr(c).isascii() and chr(c).isalpha():
            table[c] = ord(chr(c).lower())
    if keep_newline:
        table[NEWLINE] = NEWLINE
    return bytes(table)


D2L_CLASSES = _letter_classes(keep_newline=True)
SPACED_CLASSES = _letter_classes(keep_newline=False)
DROP = b"\x00"


def _keep(chars: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """chars[keep], through bytes.translate's delete (much faster than a boolean index)."""
    return np.frombuffer((chars * keep).tobytes().translate(None, DROP), dtype=np.uint8)


def d2l_code_points(block: bytes) -> np.ndarray:
    """D2L's per-line preprocessing on a block of whole lines (bytes, `\\n` line breaks).

    D2L replaces every run of non-letters by a space, strips each line, lowercases, and joins
    the lines without a separator. Equivalently: keep the letters (lowercased); between two
    letters, emit one space iff the run of non-letters between them holds no line break.
    Every byte of a multi-byte UTF-8 character is a non-letter, as the character is, so this
    works on the bytes. Returns the code points (all ASCII) as uint8.
    """
    chars = np.frombuffer(block.translate(D2L_CLASSES), dtype=np.uint8)  # a-z, \n, space
    letter = chars > SPACE
    keep = chars != SPACE
    keep[1:] |= letter[:-1]  # of each run of spaces, only the one right after a letter
    chars = _keep(chars, keep)  # letters, line breaks, one candidate space per run
    letter = chars > SPACE
    keep = letter.copy()
    keep[:-1] |= (chars[:-1] == SPACE) & letter[1:]  # a space survives if a letter follows
    return _keep(chars, keep)  # line breaks go: lines join without a separator


def spaced_code_points(block: bytes, ends_in_space: bool) -> np.ndarray:
    """D2L 1.0's preprocessing (`TimeMachine._preprocess`) on a block of whole lines: every
    run of non-letters, line breaks included, becomes one space; letters are lowercased;
    nothing is stripped. `ends_in_space`: the output of the blocks before this one ends with
    a space (False at the start of the text, so a leading run of non-letters gives a space,
    as the regex does), so a run that spans two blocks gives a single space. Returns ASCII
    uint8.
    """
    chars = np.frombuffer(block.translate(SPACED_CLASSES), dtype=np.uint8)  # a-z, space
    letter = chars > SPACE
    keep = letter.copy()
    keep[1:] |= letter[:-1]  # of each run of spaces, the one right after a letter
    if len(keep):
        keep[0] |= not ends_in_space
    return _keep(chars, keep)


def raw_code_points(block: str) -> np.ndarray:
    return np.frombuffer(block.encode("utf-32-le"), dtype=np.uint32)


def block_code_points(files: list[Path], preprocess: str, encoding_errors: str,
                      ) -> Iterator[np.ndarray]:
    """The preprocessed corpus as a stream of code-point arrays, one per line block."""
    if preprocess == "d2l":
        for block in iter_line_blocks(files, encoding_errors, decode=False):
            yield d2l_code_points(block)
    elif preprocess == "d2l_spaced":
        ends_in_space = False
        for block in iter_line_blocks(files, encoding_errors, decode=False):
            cps = spaced_code_points(block, ends_in_space)
            if len(cps):
                ends_in_space = bool(cps[-1] == SPACE)
            yield cps
    elif preprocess == "raw":
        for block in iter_line_blocks(files, encoding_errors, decode=True):
            yield raw_code_points(block)
    else:
        raise ValueError(f"unknown preprocessing {preprocess!r}")


# ---------------------------------------------------------------------------- two passes


class CharCounts:
    """Pass one: how often each code point occurs and where it first occurs."""

    def __init__(self, track_first: bool):
        self.counts = np.zeros(0, dtype=np.int64)
        self.first = np.zeros(0, dtype=np.int64)
        self.track_first = track_first
        self.total = 0

    def add(self, cps: np.ndarray) -> None:
        block = np.bincount(cps, minlength=len(self.counts))
        if len(block) > len(self.counts):
            grown = np.zeros(len(block), dtype=np.int64)
            grown[: len(self.counts)] = self.counts
            self.counts = grown
            first = np.full(len(block), -1, dtype=np.int64)
            first[: len(self.first)] = self.first
            self.first = first
        if self.track_first:
            new = np.flatnonzero((block > 0) & (self.first[: len(block)] < 0))
            if len(new) <= 32:  # the usual case after the first block: one pass per char
                for c in new.tolist():
                    self.first[c] = self.total + int(np.argmax(cps == c))
            else:
                uniq, where = np.unique(cps, return_index=True)
                fresh = self.first[uniq] < 0
                self.first[uniq[fresh]] = self.total + where[fresh]
        self.counts[: len(block)] += block
        self.total += len(cps)


def lookup_table(tokens: list[str], dtype) -> np.ndarray:
    """code point -> id, for every character of the vocabulary (index 0 is <unk>)."""
    cps = np.array([ord(c) for c in tokens[1:]], dtype=np.int64)
    table = np.zeros(int(cps.max()) + 1 if len(cps) else 1, dtype=dtype)
    table[cps] = np.arange(1, len(tokens), dtype=dtype)
    return table


def encode_blocks(blocks: Iterator[np.ndarray], table: np.ndarray, expected: int,
                  sink: Callable[[np.ndarray], None]) -> None:
    """Pass two: map each block's code points to ids and hand them to `sink`."""
    written = 0
    for cps in blocks:
        too_big = len(cps) > 0 and int(cps.max()) >= len(table)
        if too_big or written + len(cps) > expected:
            raise ChangedWhileReading()
        sink(_lookup(table, cps))
        written += len(cps)
    if written != expected:
        raise ChangedWhileReading()


def _lookup(table: np.ndarray, cps: np.ndarray) -> np.ndarray:
    if cps.dtype == np.uint8 and table.dtype == np.uint8:  # d2l: one bytes.translate
        full = np.zeros(256, dtype=np.uint8)
        full[: len(table)] = table
        return np.frombuffer(cps.tobytes().translate(full.tobytes()), dtype=np.uint8)
    return table[cps]


class ChangedWhileReading(RuntimeError):
    """The two passes saw different text: a corpus file changed while it was read."""


# ---------------------------------------------------------------------------- the cache


def cache_key(text_hash: str, preprocess: str, encoding_errors: str) -> str:
    what = json.dumps({"format": CACHE_FORMAT, "text_sha1": text_hash,
                       "preprocess": preprocess, "encoding_errors": encoding_errors},
                      sort_keys=True)
    return hashlib.sha1(what.encode()).hexdigest()[:24]


def read_entry(directory: Path, key: str) -> tuple[np.ndarray, dict] | None:
    """A complete cache entry mapped read-only, or None (missing, partial or foreign)."""
    meta_path, ids_path = directory / f"{key}.json", directory / f"{key}.ids"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        length = int(meta["length"])
        if meta.get("format") != CACHE_FORMAT or ids_path.stat().st_size != length * \
                dtype.itemsize:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if length == 0:
        return np.zeros(0, dtype=dtype), meta
    return np.memmap(ids_path, dtype=dtype, mode="r", shape=(length,)), meta


def write_entry(directory: Path, key: str, meta: dict, fill: Callable) -> None:
    """Write `key.ids` through `fill(file)` and then its sidecar, each atomically; a failure
    is a WriteError (rnnlm.files) and leaves no temporary file."""
    ensure_directory(directory)
    write_atomic(directory / f"{key}.ids", fill)
    write_atomic(directory / f"{key}.json", json.dumps(meta, ensure_ascii=True))

