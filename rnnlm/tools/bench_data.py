"""Data-preparation benchmark: python -m rnnlm.tools.bench_data [--size-mb 100] [--preprocess d2l].

Generates a corpus of the given size in a temporary folder (ten .txt files of lines drawn
at random from the Time Machine, or from a built-in word list when it is not at hand, with
some non-ASCII lines), then measures each phase in a fresh Python process, so that one
phase's memory cannot hide in another's peak:

* baseline: the interpreter with NumPy and rnnlm.data.corpus imported (the floor of every phase);
* first run: hashing, tokenising and writing the cache (what `load_corpus` does the first
  time);
* cached start: `load_corpus` again, which hashes the text and maps the cached ids;
* training pass: torch imported, the model built, every batch of one epoch read from the
  memory-mapped ids and a few training steps taken, against its own baseline (the same
  work on a tiny in-memory corpus: torch, the model and the steps without the corpus).

Peak resident memory is the child's high-water mark (VmHWM). The temporary folder is
deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1_000_000
FALLBACK_WORDS = ("the time traveller for so it will be convenient to speak of him was "
                  "expounding a recondite matter to us his grey eyes shone and twinkled and "
                  "his usually pale face was flushed and animated").split()
EXTRA_LINES = ["Ça va? Très bien — merci.", "東京の時間旅行者", "naïve café, 1895 — “quoted”"]


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM belongs to the address space made
    by exec; ru_maxrss would also count the parent's peak, inherited across fork + exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # KiB on Linux


# ---------------------------------------------------------------------------- the corpus


def source_lines(data_dir: str) -> list[str]:
    path = Path(data_dir) / "timemachine.txt"
    if path.is_file():
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        if lines:
            return lines
    rng = random.Random(0)
    return [" ".join(rng.choice(FALLBACK_WORDS) for _ in range(rng.randint(3, 14)))
            for _ in range(4000)]


def generate_corpus(folder: Path, size_mb: float, data_dir: str, files: int = 10) -> int:
    """Write about size_mb MB of text as `files` .txt files; returns the byte count."""
    lines = source_lines(data_dir) + EXTRA_LINES
    rng = random.Random(1)
    per_file = int(size_mb * MB / files)
    total = 0
    for k in range(files):
        parts, size = [], 0
        while size < per_file:
            piece = "\n".join(rng.choices(lines, k=2000)) + "\n"
            parts.append(piece)
            size += len(piece.encode("utf-8"))
        data = "".join(parts).encode("utf-8")[:per_file]
        data = data[: data.rfind(b"\n") + 1]  # whole lines, whole characters
        (folder / f"part{k:02d}.txt").write_bytes(data)
        total += len(data)
    return total


# ---------------------------------------------------------------------------- the phases


def phase(name: str, corpus: str, data_dir: str, preprocess: str, model: str) -> dict:
    """Runs inside a fresh child process; returns the measurements as a dict."""
    from rnnlm.config import DataConfig
    from rnnlm.data.corpus import load_corpus

    cfg = DataConfig(path=corpus, data_dir=data_dir, preprocess=preprocess, max_tokens=None)
    result: dict = {"phase": name}
    if name in ("first", "cached"):
        start = time.perf_counter()
        loaded = load_corpus(cfg)
        result.update(seconds=time.perf_counter() - start, tokens=len(loaded),
                      from_cache=loaded.from_cache, ids_mb=loaded.ids.nbytes / MB,
                      vocab=len(loaded.vocab))
    elif name in ("train", "train_baseline"):
        import torch

        from rnnlm.config import config_from_dict
        from rnnlm.data.iterators import BatchIterator
        from rnnlm.models import build_model
        from rnnlm.training.epoch import train_epoch
        from rnnlm.training.run import make_optimizer

        torch.set_num_threads(1)
        run = config_from_dict({}, [f"model.kind={model}", "model.hidden_size=256",
                                    "train.optimizer=adam", "train.lr=0.002"])
        if name == "train":
            loaded = load_corpus(cfg)
            ids, vocab = loaded.splits.train, len(loaded.vocab)
        else:  # the same work on a tiny in-memory corpus: everything but the corpus
            import numpy as np

            vocab = 28
            ids = np.random.default_rng(0).integers(0, vocab, 100_000).astype(np.uint8)
        net = build_model(run.model, vocab)
        opt = make_optimizer(run, net)
        result["model_mb"] = sum(p.numel() * p.element_size() for p in net.parameters()) / MB
        it = BatchIterator(ids, 32, 35, "sequential", seed=0)
        start = time.perf_counter()
        touched = sum(int(X[0, 0]) for X, _ in it.epoch(0))  # reads every batch once
        result["epoch_read_s"] = time.perf_counter() - start
        result["checksum"] = touched
        steps = (b for _, b in zip(range(5), it.epoch(1)))
        train_epoch(net, steps, opt, 1.0, True, torch.device("cpu"))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_phase(name: str, corpus: Path, data_dir: Path, preprocess: str, model: str) -> dict:
    code = ("import json, sys; from rnnlm.tools.bench_data import phase; "
            "print(json.dumps(phase(*sys.argv[1:])))")
    proc = subprocess.run([sys.executable, "-c", code, name, str(corpus), str(data_dir),
                           preprocess, model], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    if proc.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_rss() -> float:
    code = ("import rnnlm.data.corpus; from rnnlm.tools.bench_data import peak_rss_mb; "
            "print(peak_rss_mb())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[2])
    return float(proc.stdout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--preprocess", choices=["d2l", "d2l_spaced", "raw"], default="d2l")
    parser.add_argument("--model", default="lstm", help="model.kind for the training pass")
    parser.add_argument("--data-dir", default="data", help="where the Time Machine is looked up")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="rnnlm-bench-"))
    try:
        corpus, cache = tmp / "corpus", tmp / "work"
        corpus.mkdir()
        cache.mkdir()
        size = generate_corpus(corpus, args.size_mb, args.data_dir)
        corpus_mb = size / MB
        print(f"corpus: {corpus_mb:.1f} MB in 10 .txt files, preprocess {args.preprocess}, "
              f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
        base = baseline_rss()
        first = run_phase("first", corpus, cache, args.preprocess, args.model)
        cached = run_phase("cached", corpus, cache, args.preprocess, args.model)
        train_base = run_phase("train_baseline", corpus, cache, args.preprocess, args.model)
        train = run_phase("train", corpus, cache, args.preprocess, args.model)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"tokens: {first['tokens']:,} ids of {first['ids_mb']:.1f} MB "
          f"(vocabulary {first['vocab']}), model {train['model_mb']:.1f} MB "
          f"({args.model} 256)")
    print(f"{'phase':<36}{'time':>10}{'peak RSS':>12}")
    print(f"{'baseline: python + numpy + rnnlm':<36}{'':>10}{base:>9.0f} MB")
    print(f"{'first run: hash, tokenise, cache':<36}{first['seconds']:>8.2f} s"
          f"{first['peak_rss_mb']:>9.0f} MB")
    print(f"{'cached start: hash, map':<36}{cached['seconds']:>8.2f} s"
          f"{cached['peak_rss_mb']:>9.0f} MB")
    print(f"{'baseline: training on a tiny corpus':<36}{'':>10}"
          f"{train_base['peak_rss_mb']:>9.0f} MB")
    print(f"{'training: read one epoch + 5 steps':<36}{train['epoch_read_s']:>8.2f} s"
          f"{train['peak_rss_mb']:>9.0f} MB")
    # torch alone is a few hundred MB: the training pass is judged by what it adds to the
    # same process without the corpus; the data phases by their whole peak.
    goal = 2 * corpus_mb + train["model_mb"]
    extra = train["peak_rss_mb"] - train_base["peak_rss_mb"]
    worst = max(first["peak_rss_mb"], cached["peak_rss_mb"], extra)
    print(f"goal: preparation < 15 s: {first['seconds']:.2f} s "
          f"({'met' if first['seconds'] < 15 else 'MISSED'})")
    print(f"goal: peak RSS < 2 x corpus + model = {goal:.0f} MB: first run "
          f"{first['peak_rss_mb']:.0f} MB, cached {cached['peak_rss_mb']:.0f} MB, training "
          f"+{extra:.0f} MB over its baseline ({'met' if worst < goal else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
