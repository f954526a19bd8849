import collections
import hashlib
import http.server
import re
import threading

import numpy as np
import pytest

from rnnlm.config import DataConfig
from rnnlm.data.corpus import (
    TIME_MACHINE_SHA1,
    DataError,
    Vocab,
    ensure_time_machine,
    load_corpus,
    tokenize,
)


def d2l_reference_tokens(text: str) -> tuple[list[str], list[str]]:
    """D2L 0.17's read_time_machine / tokenize('char') / Vocab, written plainly."""
    lines = [re.sub("[^A-Za-z]+", " ", line).strip().lower()
             for line in text.splitlines(keepends=True)]
    tokens = [ch for line in lines for ch in line]
    counter = collections.Counter(tokens)
    freqs = sorted(counter.items(), key=lambda x: x[1], reverse=True)
    vocab = ["<unk>"] + [tok for tok, _ in freqs]
    return tokens, vocab


def test_d2l_preprocessing_matches_the_book(data_dir):
    corpus = load_corpus(DataConfig(data_dir=str(data_dir), max_tokens=None))
    assert len(corpus) == 170_580
    assert len(corpus.vocab) == 28 and corpus.vocab.tokens[0] == "<unk>"
    text = (data_dir / "timemachine.txt").read_text()
    tokens, vocab = d2l_reference_tokens(text)
    assert corpus.vocab.tokens == vocab
    expected = np.array([vocab.index(t) for t in tokens])
    assert np.array_equal(corpus.ids.astype(np.int64), expected)
    assert corpus.ids.dtype == np.uint8


def test_d2l_spaced_is_d2l_1_0s_time_machine(data_dir):
    """D2L 1.0's TimeMachine: 173,428 characters, the words at line ends kept apart."""
    corpus = load_corpus(DataConfig(data_dir=str(data_dir), max_tokens=None,
                                    preprocess="d2l_spaced"))
    text = (data_dir / "timemachine.txt").read_text()
    assert len(corpus) == 173_428 and len(corpus.vocab) == 28
    assert corpus.vocab.decode(corpus.ids) == re.sub("[^A-Za-z]+", " ", text).lower()
    d2l = load_corpus(DataConfig(data_dir=str(data_dir), max_tokens=None))
    assert len(corpus) - len(d2l) > 2_000  # one space per joined line break, roughly


def test_max_tokens_keeps_the_full_vocabulary(data_dir):
    corpus = load_corpus(DataConfig(data_dir=str(data_dir), max_tokens=10_000))
    assert len(corpus) == 10_000 and len(corpus.vocab) == 28


def test_raw_keeps_every_character(tmp_path):
    text = "Héllo, World!\nÇa va?\tß — 東京\n"
    path = tmp_path / "mine.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(DataConfig(path=str(path), preprocess="raw", max_tokens=None,
                                    batch_size=1, num_steps=2, data_dir=str(tmp_path)))
    assert corpus.vocab.decode(corpus.ids) == text
    chars = corpus.vocab.tokens[1:]
    assert chars == sorted(chars) and "\n" in chars and "東" in chars and "H" in chars


def test_vocab_encode_unknown():
    vocab = Vocab(["<unk>", "a", "b"])
    assert vocab.encode("abba").tolist() == [1, 2, 2, 1]
    with pytest.raises(KeyError) as info:
        vocab.encode("abc!")
    assert info.value.args[0] == ["!", "c"]
    assert vocab.encode("abc", unknown="replace").tolist() == [1, 2, 0]


def test_tokenize_d2l_newlines_join_without_separator():
    ids, vocab = tokenize("Ab, c\n  D!\n\n!!\nef", "d2l")
    assert vocab.decode(ids) == "ab cdef"


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server():
    servers = []

    def serve(body: bytes) -> str:
        handler = type("H", (_Handler,), {"body": body})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/timemachine.txt"

    yield serve
    for s in servers:
        s.shutdown()


def test_download_verifies_sha1(tmp_path, time_machine_path, local_server):
    url = local_server(time_machine_path.read_bytes())
    target = ensure_time_machine(tmp_path / "dl", url=url)
    assert hashlib.sha1(target.read_bytes()).hexdigest() == TIME_MACHINE_SHA1
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["timemachine.txt"]


def test_download_with_wrong_sha1_leaves_nothing(tmp_path, local_server):
    url = local_server(b"not the time machine")
    with pytest.raises(DataError, match="sha1"):
        ensure_time_machine(tmp_path / "dl", url=url)
    assert list((tmp_path / "dl").iterdir()) == []


def test_download_failure_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="could not download"):
        ensure_time_machine(tmp_path / "dl", url="http://127.0.0.1:9/timemachine.txt",
                            timeout=2)
    assert list((tmp_path / "dl").iterdir()) == []


def test_existing_file_with_wrong_sha1_is_refused_not_deleted(tmp_path):
    (tmp_path / "timemachine.txt").write_text("edited")
    with pytest.raises(DataError, match="delete it"):
        ensure_time_machine(tmp_path)
    assert (tmp_path / "timemachine.txt").read_text() == "edited"


def test_too_short_corpus_says_the_minimum(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abc " * 20)
    with pytest.raises(DataError, match=r"needs at least 331"):
        load_corpus(DataConfig(path=str(path), batch_size=32, num_steps=10,
                               data_dir=str(tmp_path)))
