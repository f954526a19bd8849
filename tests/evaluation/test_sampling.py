"""sample.py and rnnlm.evaluation.sampling: pickers, seeds, prefixes, streaming, errors, and the
greedy sample matching what training printed."""

import io
import math
import shutil
import subprocess
import sys

import pytest
import torch

from rnnlm.checkpoint import load_checkpoint, model_from_checkpoint
from rnnlm.config import ConfigError, load_config
from rnnlm.data.corpus import Vocab
from rnnlm.evaluation.sampling import (
    SamplingOptions,
    encode_prefix,
    greedy,
    sampler,
    write_samples,
)
from rnnlm.models.base import Decoder
from rnnlm.training.run import train
from tests.conftest import ROOT, copy_of_time_machine

# One xdist worker runs this module, so its trained fixture is made once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("test_sampling")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-epoch tiny run: its directory and what training printed."""
    root = tmp_path_factory.mktemp("sampling")
    data = copy_of_time_machine(root)
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [f"data.data_dir={data}", f"out_dir={root / 'run'}", "train.epochs=3",
                       "train.threads=1", "data.max_tokens=600", "train.predict_chars=30"])
    printed = io.StringIO()
    train(cfg, quiet=True, out=printed)
    shutil.rmtree(data)  # sampling must not need the corpus
    return root / "run", printed.getvalue().splitlines()


@pytest.fixture(scope="module")
def model_and_vocab(trained):
    model, vocab, preprocess, _ = model_from_checkpoint(load_checkpoint(trained[0] / "last.pt"),
                                                        torch.device("cpu"))
    return model, vocab, preprocess


def sample(model_and_vocab, prefix="time traveller", **options):
    model, vocab, preprocess = model_and_vocab
    opts = SamplingOptions(**options)
    opts.validate()
    return write_samples(model, vocab, encode_prefix(prefix, vocab, preprocess), opts,
                         io.StringIO())


def test_greedy_sample_equals_the_continuation_printed_by_training(trained, tmp_path):
    run, printed = trained
    alone = tmp_path / "alone"  # no data folder, no config file: only the checkpoint
    alone.mkdir()
    shutil.copy(run / "last.pt", alone / "model.pt")
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--checkpoint", "model.pt",
                           "--greedy", "--num-chars", "30", "--device", "cpu"],
                          cwd=alone, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert printed[-2].startswith("time traveller") and len(printed[-2]) == 14 + 30
    assert proc.stdout == printed[-2] + "\n"


def test_same_seed_same_text(model_and_vocab):
    first = sample(model_and_vocab, num_chars=100, seed=7, num_samples=2)
    assert first == sample(model_and_vocab, num_chars=100, seed=7, num_samples=2)
    assert first[0] != first[1]  # the samples of one run differ from each other
    assert first != sample(model_and_vocab, num_chars=100, seed=8, num_samples=2)
    # 100 characters after the prefix (a barely trained model may also draw "<unk>").
    assert all(text.startswith("time traveller") and len(text) >= 114 for text in first)


def test_narrow_sampling_is_greedy(model_and_vocab):
    want = sample(model_and_vocab, num_chars=40, greedy=True)
    assert sample(model_and_vocab, num_chars=40, top_k=1, seed=1) == want
    assert sample(model_and_vocab, num_chars=40, top_p=1e-6, seed=2) == want
    assert sample(model_and_vocab, num_chars=40, temperature=1e-6, seed=3) == want


def test_sampler_restricts_and_reshapes_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)

    def draws(n=4000, **kw):  # n rows at once: the picker works row by row
        ids = sampler(generator=gen, **kw)(logits.expand(n, 4))
        return torch.bincount(ids, minlength=4)

    assert set(draws(top_k=2).nonzero().flatten().tolist()) == {0, 1}
    assert set(draws(top_p=0.6).nonzero().flatten().tolist()) == {0, 1}  # 0.5 < 0.6
    assert set(draws(top_p=0.5).nonzero().flatten().tolist()) == {0}
    counts = draws(n=20000, temperature=0.5)
    want = torch.softmax(logits[0] / 0.5, dim=0)
    assert torch.allclose(counts / 20000, want, atol=0.015), (counts, want)
    assert greedy(logits).tolist() == [0]


def test_prefix_goes_through_the_checkpoints_preprocessing(model_and_vocab):
    _, vocab, preprocess = model_and_vocab
    assert preprocess == "d2l"
    assert encode_prefix("Time Traveller!", vocab, preprocess) == \
        encode_prefix("time traveller", vocab, preprocess)
    assert vocab.decode(encode_prefix("Time Traveller!", vocab, preprocess)) == "time traveller"
    with pytest.raises(ConfigError, match="empty after d2l"):
        encode_prefix("1895!", vocab, preprocess)


def test_unknown_prefix_characters_are_named_or_replaced():
    vocab = Vocab(["<unk>", "a", "b", " "])
    with pytest.raises(ConfigError, match=r"never saw: '!' 'c' '€'; .*--unknown replace"):
        encode_prefix("ab c€!", vocab, "raw")
    assert encode_prefix("ab c€", vocab, "raw", unknown="replace") == [1, 2, 3, 0, 0]


def test_text_streams_as_it_is_generated(model_and_vocab):
    model, vocab, preprocess = model_and_vocab
    steps = []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.output = model, model.output

        def begin_state(self, batch_size):
            return model.begin_state(batch_size)

        def forward(self, tokens, state):
            steps.append(1)
            return model(tokens, state)

        def decoder(self):  # the contract's default decoder: this module on one token
            return Decoder(self)

    class Recording(io.StringIO):
        def __init__(self):
            super().__init__()
            self.seen = []  # (model steps so far, text written so far) at each flush

        def flush(self):
            self.seen.append((len(steps), self.getvalue()))

    out = Recording()
    opts = SamplingOptions(num_chars=20, greedy=True)
    write_samples(Counting(), vocab, encode_prefix("time", vocab, preprocess), opts, out)
    written = [len(text) for _, text in out.seen]
    # Each character reaches the stream (and is flushed) before the next model step runs.
    assert written[1:21] == list(range(5, 25))
    assert [n for n, _ in out.seen[1:21]] == list(range(1, 21))
    assert len(steps) == 20  # the prefix in one step, then one step per character but the last


@pytest.mark.parametrize("options, fragment", [
    ({"num_chars": 0}, "--num-chars must be >= 1"),
    ({"temperature": -1.0}, "--temperature must be a number > 0"),
    ({"temperature": 0.0}, "--greedy"),
    ({"temperature": math.inf}, "--temperature"),
    ({"top_k": 0}, "--top-k must be >= 1"),
    ({"top_p": 1.5}, "--top-p must be in (0, 1]"),
    ({"top_p": 0.0}, "--top-p must be in (0, 1]"),
    ({"num_samples": 0}, "--num-samples must be >= 1"),
    ({"greedy": True, "top_k": 3, "seed": 1}, "--top-k, --seed would have no effect"),
])
def test_bad_options_are_refused(options, fragment):
    with pytest.raises(ConfigError) as info:
        SamplingOptions(**options).validate()
    assert fragment in str(info.value)


@pytest.mark.parametrize("args, fragment", [
    (["--top-p", "1.5"], "error: --top-p must be in (0, 1], got 1.5"),
    (["--checkpoint", "corrupt.pt"], "error: corrupt.pt is not an rnnlm checkpoint"),
])
def test_cli_errors_are_one_line_and_exit_2(args, fragment, trained, tmp_path):
    shutil.copy(trained[0] / "last.pt", tmp_path / "last.pt")
    (tmp_path / "corrupt.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:5000])
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--checkpoint", "last.pt",
                           *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == proc.stderr.strip().splitlines()[0]  # one line
    assert proc.stderr.startswith(fragment), proc.stderr
    assert proc.stdout == ""
