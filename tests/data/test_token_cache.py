"""The on-disk token cache: reused when nothing changed, rebuilt when anything did."""

import json

import numpy as np
import pytest

import rnnlm.data.corpus
from rnnlm.config import DataConfig
from rnnlm.data.corpus import DataError, load_corpus

TEXT = "The Time Machine, by H. G. Wells\nI\n\nThe Time Traveller (for so it will be\n"


@pytest.fixture
def counted(monkeypatch):
    """Counts how many passes of tokenisation run (each pass preprocesses the text once)."""
    calls = []
    real = rnnlm.data.corpus.block_code_points

    def spy(*args, **kwargs):
        calls.append(args[1:])
        return real(*args, **kwargs)

    monkeypatch.setattr(rnnlm.data.corpus, "block_code_points", spy)
    return calls


def cfg(path, tmp_path, **kw):
    return DataConfig(path=str(path), data_dir=str(tmp_path / "d"), max_tokens=None,
                      batch_size=1, num_steps=2, **kw)


def cache_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "d" / "cache").iterdir())


def test_second_run_maps_the_cache(tmp_path, counted):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    first = load_corpus(cfg(path, tmp_path))
    assert len(counted) == 2 and not first.from_cache  # count pass + encode pass
    second = load_corpus(cfg(path, tmp_path))
    assert len(counted) == 2 and second.from_cache  # no tokenising the second time
    assert isinstance(second.ids, np.memmap) and second.ids.dtype == np.uint8
    assert np.array_equal(first.ids, second.ids) and first.vocab == second.vocab
    names = cache_files(tmp_path)
    assert len(names) == 2 and {n.rsplit(".", 1)[1] for n in names} == {"ids", "json"}
    meta = json.loads((tmp_path / "d" / "cache" / names[1]).read_text())
    assert meta["vocab"] == first.vocab.tokens and meta["length"] == len(first.ids)


def test_changed_file_or_settings_are_tokenised_again(tmp_path, counted):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    base = load_corpus(cfg(path, tmp_path))
    path.write_text(TEXT.replace("Wells", "Welles"))  # same name, new content
    edited = load_corpus(cfg(path, tmp_path))
    assert not edited.from_cache and len(counted) == 4
    assert edited.vocab.decode(edited.ids) != base.vocab.decode(base.ids)
    raw = load_corpus(cfg(path, tmp_path, preprocess="raw"))
    assert not raw.from_cache and raw.vocab.decode(raw.ids) == path.read_text()
    replaced = load_corpus(cfg(path, tmp_path, preprocess="raw", encoding_errors="replace"))
    assert not replaced.from_cache
    assert len(counted) == 8 and len(cache_files(tmp_path)) == 8
    for settings in ({}, {"preprocess": "raw"}, {"preprocess": "raw",
                                                 "encoding_errors": "replace"}):
        assert load_corpus(cfg(path, tmp_path, **settings)).from_cache
    assert len(counted) == 8


def test_max_tokens_and_split_reuse_one_cache_entry(tmp_path, counted):
    path = tmp_path / "t.txt"
    path.write_text(TEXT * 20)
    whole = load_corpus(cfg(path, tmp_path))
    cut = load_corpus(DataConfig(path=str(path), data_dir=str(tmp_path / "d"), max_tokens=500,
                                 batch_size=1, num_steps=2, split=[0.8, 0.1, 0.1]))
    assert cut.from_cache and len(counted) == 2
    assert np.array_equal(cut.ids, whole.ids[:500])


@pytest.mark.parametrize("damage", ["truncate", "no_sidecar", "bad_json"])
def test_incomplete_entries_are_rebuilt(tmp_path, counted, damage):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    good = np.array(load_corpus(cfg(path, tmp_path)).ids)  # a copy: the test edits the file
    cache = tmp_path / "d" / "cache"
    ids_file = next(cache.glob("*.ids"))
    meta_file = ids_file.with_suffix(".json")
    if damage == "truncate":
        ids_file.write_bytes(ids_file.read_bytes()[:-1])
    elif damage == "no_sidecar":
        meta_file.unlink()
    else:
        meta_file.write_text("{not json")
    again = load_corpus(cfg(path, tmp_path))
    assert not again.from_cache and len(counted) == 4
    assert np.array_equal(again.ids, good)
    assert load_corpus(cfg(path, tmp_path)).from_cache


def test_cache_off_writes_nothing(tmp_path, counted):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    corpus = load_corpus(cfg(path, tmp_path, cache=False))
    assert not isinstance(corpus.ids, np.memmap) and not (tmp_path / "d").exists()
    assert corpus.vocab.decode(corpus.ids) == load_corpus(cfg(path, tmp_path)).vocab.decode(
        load_corpus(cfg(path, tmp_path)).ids)


@pytest.mark.parametrize("distinct, dtype", [(254, np.uint8), (255, np.uint16),
                                             (65534, np.uint16), (65535, np.uint32)])
def test_id_dtype_is_the_smallest_that_fits(tmp_path, distinct, dtype):
    # The vocabulary is the characters, the final newline and <unk>: distinct + 2 ids.
    code_points = [c for c in range(0x100, 0x100 + distinct + 2048)
                   if not 0xD800 <= c <= 0xDFFF][:distinct]
    chars = "".join(map(chr, code_points))
    path = tmp_path / "t.txt"
    path.write_text(chars, encoding="utf-8")
    corpus = load_corpus(cfg(path, tmp_path, preprocess="raw"))
    assert len(corpus.vocab) == distinct + 2
    assert corpus.ids.dtype == dtype
    assert corpus.vocab.decode(corpus.ids) == chars + "\n"


def test_unwritable_cache_is_a_clear_error(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "cache").write_text("a file where the cache folder should be")
    with pytest.raises(DataError, match="data.cache: false"):
        load_corpus(cfg(path, tmp_path))


@pytest.mark.parametrize("cache", [True, False])
def test_a_file_changing_between_the_passes_is_refused(tmp_path, monkeypatch, cache):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    real = rnnlm.data.corpus.block_code_points
    passes = []

    def growing(*args):
        passes.append(1)
        yield from real(*args)
        if len(passes) == 2:  # the encode pass sees one more block than the count pass did
            yield from real(*args)

    monkeypatch.setattr(rnnlm.data.corpus, "block_code_points", growing)
    with pytest.raises(DataError, match="changed while it was being read"):
        load_corpus(cfg(path, tmp_path, cache=cache))
    if cache:  # nothing half-written is left behind
        assert list((tmp_path / "d" / "cache").iterdir()) == []
