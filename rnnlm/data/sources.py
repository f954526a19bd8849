"""Where the text comes from: one file or a folder of `.txt` files, read in line blocks.

A corpus is the files' bytes in order (a folder's `.txt` files, searched recursively, sorted
by their path relative to the folder). A file that does not end with a line break is read as
if it did, so the last line of one file never runs into the first line of the next.

Reading goes block by block (a few MB, always cut after a line break, so a block holds whole
lines) to keep memory flat on corpora of any size. Each block is checked to be valid UTF-8
before anything else happens to it, so an error can name the file and the byte offset; line
breaks are then normalised as Python's text mode does (`\\r\\n` and `\\r` become `\\n`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from rnnlm.errors import ConfigError

BLOCK_BYTES = 1 << 20  # a block grows past this only to finish an overlong line


class DataError(ConfigError):
    """A user-facing data problem (missing or unreadable file, not UTF-8, corpus too short)."""


class NotUtf8Error(DataError):
    """A file that is not valid UTF-8; `replace_with` says how the user turns on
    replacement where the file was given (a config key, a command-line option)."""

    def __init__(self, path: Path, offset: int,
                 replace_with: str = "set data.encoding_errors: replace"):
        self.path, self.offset = path, offset
        super().__init__(f"{path} is not valid UTF-8 (byte offset {offset}): convert it to "
                         f"UTF-8, or {replace_with} to read bad bytes as U+FFFD")


def list_source_files(path: Path, given_as: str = "data.path") -> list[Path]:
    """The files of a corpus: `path` itself, or the `.txt` files under a folder, sorted.
    `given_as` names the setting that gave the path, for the error messages."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted((p for p in path.rglob("*.txt") if p.is_file()),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise DataError(f"{given_as} {path} is a folder without .txt files: put the "
                              f"corpus in .txt files (UTF-8) or point {given_as} at one file")
        return files
    raise DataError(f"{given_as} {path} does not exist: give a UTF-8 text file or a folder "
                      f"of .txt files")


def content_hash(files: list[Path]) -> str:
    """sha1 over every file's size and bytes, in order: the cache key of the raw text."""
    digest = hashlib.sha1()
    for path in files:
        try:
            with open(path, "rb") as f:
                digest.update(f"{path.stat().st_size}\n".encode())
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror}") from None
    return digest.hexdigest()


def _check_utf8(raw: bytes, path: Path, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotUtf8Error(path, offset + exc.start) from None


def _normalise_newlines(raw):
    """Python text mode's universal newlines, for bytes or str."""
    crlf, cr, lf = ("\r\n", "\r", "\n") if isinstance(raw, str) else (b"\r\n", b"\r", b"\n")
    return raw.replace(crlf, lf).replace(cr, lf)


def _cut_after_last_break(buf: bytes) -> int:
    """Length of the longest prefix of `buf` ending in a whole line break, or 0.
    A final lone `\\r` may be the first half of `\\r\\n`, so it does not count."""
    return max(buf.rfind(b"\n"), buf.rfind(b"\r", 0, len(buf) - 1)) + 1


def iter_line_blocks(files: list[Path], encoding_errors: str = "strict", decode: bool = False,
                     block_bytes: int = BLOCK_BYTES) -> Iterator[bytes | str]:
    """Yield the corpus as blocks of whole lines with `\\n` line breaks.

    decode=False gives bytes (still checked to be UTF-8 when encoding_errors is "strict");
    decode=True gives str, bad bytes becoming U+FFFD when encoding_errors is "replace".
    """
    for path in files:
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror}") from None
        with f:
            offset = 0  # of buf's first byte in the file
            buf = b""
            while True:
                chunk = f.read(block_bytes)
                buf += chunk
                cut = _cut_after_last_break(buf) if chunk else len(buf)
                if cut:
                    piece, buf = buf[:cut], buf[cut:]
                    block = _decode_block(piece, path, offset, encoding_errors, decode)
                    if not chunk and piece[-1:] not in (b"\n", b"\r"):
                        block += "\n" if decode else b"\n"  # the file's last line break
                    yield block
                    offset += cut
                if not chunk:
                    break


def _decode_block(piece: bytes, path: Path, offset: int, encoding_errors: str, decode: bool):
    if decode:
        if encoding_errors == "strict":
            text = _check_utf8(piece, path, offset)
        else:
            text = piece.decode("utf-8", errors="replace")
        return _normalise_newlines(text)
    if encoding_errors == "strict":
        _check_utf8(piece, path, offset)
    return _normalise_newlines(piece)
