"""Corpora from files and folders: block reading, UTF-8 errors, the byte-level d2l pipeline."""

import functools
import random
import re

import numpy as np
import pytest

import rnnlm.data.tokens
from rnnlm.config import DataConfig
from rnnlm.data.corpus import PREPROCESSORS, DataError, load_corpus, preprocess_d2l, tokenize
from rnnlm.data.sources import iter_line_blocks, list_source_files
from rnnlm.data.tokens import block_code_points, d2l_code_points


def corpus_text(files, preprocess="raw", errors="strict", block_bytes=None):
    if block_bytes is None:
        cps = np.concatenate(list(block_code_points(files, preprocess, errors)))
        return "".join(map(chr, cps.tolist()))
    parts = iter_line_blocks(files, errors, decode=True, block_bytes=block_bytes)
    return "".join(parts)


def load(path, tmp_path, **kw):
    kw = {"max_tokens": None, "batch_size": 1, "num_steps": 2, "data_dir": str(tmp_path), **kw}
    return load_corpus(DataConfig(path=str(path), **kw))


def d2l_by_lines(text: str) -> str:
    """D2L's read_time_machine on text already read in text mode (lines split at \\n)."""
    return "".join(re.sub("[^A-Za-z]+", " ", line).strip().lower()
                   for line in text.split("\n"))


ALPHABET = list("abcXYZ  \n\n\t,.!é東😀") + ["\r\n", "\r", "--"]


@pytest.mark.parametrize("seed", range(5))
def test_d2l_on_bytes_equals_the_line_by_line_definition(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice(ALPHABET) for _ in range(3000))
    normalised = text.replace("\r\n", "\n").replace("\r", "\n")
    expected = d2l_by_lines(normalised)
    assert preprocess_d2l(normalised) == expected
    assert d2l_code_points(normalised.encode("utf-8")).tobytes().decode("ascii") == expected


@pytest.mark.parametrize("block_bytes", [1, 2, 5, 64, 1 << 20])
@pytest.mark.parametrize("seed", range(3))
def test_d2l_spaced_equals_d2l_1_0s_definition(tmp_path, monkeypatch, seed, block_bytes):
    """D2L 1.0: re.sub('[^A-Za-z]+', ' ', text).lower() over the whole text, line breaks
    included, nothing stripped; also when a run of non-letters spans two line blocks."""
    rng = random.Random(seed)
    text = "".join(rng.choice(ALPHABET) for _ in range(3000))
    text = rng.choice(["", "--\n", "é "]) + text  # leading non-letters give a space
    path = tmp_path / "a.txt"
    path.write_bytes(text.encode("utf-8"))
    expected = re.sub("[^A-Za-z]+", " ", text + "\n").lower()  # the reader ends every line
    monkeypatch.setattr(rnnlm.data.tokens, "iter_line_blocks",
                        functools.partial(iter_line_blocks, block_bytes=block_bytes))
    assert corpus_text([path], "d2l_spaced") == expected
    ids, vocab = tokenize(text + "\n", "d2l_spaced")
    assert vocab.decode(ids) == expected == PREPROCESSORS["d2l_spaced"](text + "\n")


@pytest.mark.parametrize("block_bytes", [1, 2, 3, 7, 64, 1 << 20])
def test_blocks_of_any_size_give_the_same_text(tmp_path, block_bytes):
    rng = random.Random(1)
    text = "".join(rng.choice(ALPHABET) for _ in range(2000))
    path = tmp_path / "a.txt"
    path.write_bytes(text.encode("utf-8"))
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    if not expected.endswith("\n"):
        expected += "\n"
    assert corpus_text([path], block_bytes=block_bytes) == expected
    for piece in iter_line_blocks([path], block_bytes=block_bytes):
        assert piece.endswith(b"\n")  # whole lines only


def test_folder_is_read_sorted_recursively_with_line_breaks_between_files(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("second")  # no final newline: one is added
    (root / "a.txt").write_text("first\n")
    (root / "sub" / "c.txt").write_text("third\r")  # a lone CR ends the line already
    (root / "notes.md").write_text("ignored")
    (root / "empty.txt").write_text("")
    files = list_source_files(root)
    assert [f.relative_to(root).as_posix() for f in files] == [
        "a.txt", "b.txt", "empty.txt", "sub/c.txt"]
    corpus = load(root, tmp_path, preprocess="raw")
    assert corpus.vocab.decode(corpus.ids) == "first\nsecond\nthird\n"
    corpus = load(root, tmp_path, preprocess="d2l")
    assert corpus.vocab.decode(corpus.ids) == "firstsecondthird"  # d2l joins lines


def test_folder_without_txt_files_is_an_error(tmp_path):
    (tmp_path / "x.md").write_text("hello")
    with pytest.raises(DataError, match="folder without .txt files"):
        list_source_files(tmp_path)


@pytest.mark.parametrize("preprocess", ["d2l", "d2l_spaced", "raw"])
def test_invalid_utf8_names_file_and_offset(tmp_path, preprocess):
    good = "line one\n" * 1000
    path = tmp_path / "bad.txt"
    path.write_bytes(good.encode() + b"abc\xff\xfedef\n")
    offset = len(good) + 3
    with pytest.raises(DataError, match=rf"bad.txt is not valid UTF-8 \(byte offset {offset}\)"):
        load(path, tmp_path, preprocess=preprocess)
    # Found in a later block, the offset is still counted from the start of the file.
    with pytest.raises(DataError, match=rf"byte offset {offset}\)"):
        list(iter_line_blocks([path], block_bytes=100))


def test_encoding_errors_replace(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ab\xffcd\nAB\xffCD\n")
    corpus = load(path, tmp_path, preprocess="raw", encoding_errors="replace")
    assert corpus.vocab.decode(corpus.ids) == "ab\ufffdcd\nAB\ufffdCD\n"
    corpus = load(path, tmp_path, preprocess="d2l", encoding_errors="replace")
    assert corpus.vocab.decode(corpus.ids) == "ab cdab cd"


def test_truncated_multibyte_at_end_of_file_is_reported(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes("ok 東".encode()[:-1])
    with pytest.raises(DataError, match=r"byte offset 3\)"):
        load(path, tmp_path, preprocess="raw")


def test_too_short_training_split_says_the_minimum(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abcd " * 100)  # 499 tokens after d2l
    with pytest.raises(DataError, match=r"training split .* needs at least 111"):
        load(path, tmp_path, batch_size=10, num_steps=10, split=[0.2, 0.4, 0.4])
