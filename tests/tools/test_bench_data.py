"""The data benchmark's pieces, on a corpus small enough for a test."""

from rnnlm.tools.bench_data import generate_corpus, phase


def test_generated_corpus_and_phases(tmp_path, time_machine_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    size = generate_corpus(corpus, 0.2, str(time_machine_path.parent))
    files = sorted(corpus.iterdir())
    assert len(files) == 10 and sum(f.stat().st_size for f in files) == size
    assert 150_000 < size <= 200_000
    assert all(f.read_bytes().endswith(b"\n") for f in files)
    first = phase("first", str(corpus), str(tmp_path / "work"), "raw", "lstm")
    cached = phase("cached", str(corpus), str(tmp_path / "work"), "raw", "lstm")
    assert not first["from_cache"] and cached["from_cache"]
    assert first["tokens"] == cached["tokens"] > 0 and first["vocab"] > 28  # non-ASCII kept
    assert first["peak_rss_mb"] > 0 and first["seconds"] > 0
