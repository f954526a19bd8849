"""evaluate.py: scoring checkpoints on their held-out splits or on any text, and ensembles."""

import math
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnnlm.config import ConfigError, config_from_dict, load_config
from rnnlm.evaluation.evaluate import evaluate, evaluate_ensemble, lane_bounds
from rnnlm.evaluation.scoring import heldout_ids, load_scored, score, text_ids
from rnnlm.models import build_model
from rnnlm.training.run import train
from tests.conftest import ROOT, copy_of_time_machine
from tests.training.test_heldout import read_records

CPU = torch.device("cpu")


def small_model(kind, seed, vocab_size=12):
    torch.manual_seed(seed)
    cfg = config_from_dict({}, [f"model.kind={kind}", "model.hidden_size=16"])
    return build_model(cfg.model, vocab_size).eval()


def ensemble_loss_by_hand(models, ids, lanes):
    """The definition: every lane in one call per model from a zero state, each token's
    probability the mean of the models' softmax probabilities."""
    starts, sizes = lane_bounds(len(ids), lanes)
    total, count = 0.0, 0
    with torch.no_grad():
        for start, size in zip(starts, sizes):
            lane = torch.as_tensor(ids[start: start + size], dtype=torch.long)
            probs = [F.softmax(m(lane[:-1].view(1, -1), m.begin_state(1))[0][:, 0].double(), -1)
                     for m in models]
            mean = torch.stack(probs).mean(0)
            total -= mean.gather(1, lane[1:, None]).log().sum().item()
            count += size - 1
    return total / count


@pytest.mark.parametrize("lanes, window", [(1, 9), (3, 1000)])
def test_an_ensemble_scores_the_mean_of_the_probabilities(lanes, window):
    models = [small_model("gru", 0), small_model("lstm", 1), small_model("rnn_scratch", 2)]
    ids = np.random.default_rng(0).integers(0, 12, size=150)
    members, result = evaluate_ensemble(models, ids, lanes, CPU, window=window)
    assert result.tokens == 150 - lanes
    assert result.loss == pytest.approx(ensemble_loss_by_hand(models, ids, lanes), rel=1e-6)
    for model, member in zip(models, members, strict=True):  # the same pass scores each
        assert member.loss == pytest.approx(evaluate(model, ids, lanes, CPU).loss, rel=1e-12)


def test_an_ensemble_of_one_model_twice_scores_as_the_model():
    model = small_model("lstm", 0)
    ids = np.random.default_rng(1).integers(0, 12, size=90)
    alone = evaluate(model, ids, 2, CPU)
    _, together = evaluate_ensemble([model, model], ids, 2, CPU)
    assert together.loss == pytest.approx(alone.loss, abs=1e-12)


# One xdist worker runs this module, so its trained fixture is made once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("test_scoring")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs: a d2l one with a validation and test split, and a raw one
    without (another vocabulary)."""
    root = tmp_path_factory.mktemp("scoring")
    data = copy_of_time_machine(root)
    common = [f"data.data_dir={data}", "model.kind=gru", "train.epochs=3",
              "train.predict_every=0", "data.eval_lanes=1"]
    train(load_config(ROOT / "configs/tiny.yaml",
                      [*common, f"out_dir={root / 'split'}", "data.split=[0.8,0.1,0.1]"]),
          quiet=True)
    train(load_config(ROOT / "configs/tiny.yaml",
                      [*common, f"out_dir={root / 'raw'}", "data.preprocess=raw"]), quiet=True)
    return root


def run_evaluate(*args):
    """evaluate.py as a separate process, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def evaluate_here(args, monkeypatch, capsys):
    """evaluate.py run in this process (no second torch import): (exit code, out, err)."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *map(str, args)])
    threads = torch.get_num_threads()  # evaluate.py sets its own
    try:
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_evaluate_rescores_the_splits_as_training_did(runs, monkeypatch, capsys):
    """best.pt on its validation split gives the validation perplexity recorded at its epoch,
    and on the test split the test perplexity the run recorded at its end."""
    run = runs / "split"
    logged = read_records(run)
    best = min((r for r in logged if "val_ppl" in r), key=lambda r: r["val_ppl"])
    test = logged[-1]
    code, out, err = evaluate_here(["--checkpoint", run / "best.pt", "--split", "val"],
                                   monkeypatch, capsys)
    assert code == 0, err
    first, line = out.splitlines()
    assert first.startswith("validation split of") and "199 predicted" in first
    assert float(line.split()[1]) == pytest.approx(best["val_ppl"], abs=5e-4)
    assert f"(epoch {best['epoch']})" in line
    scored = load_scored([str(run / "best.pt")], CPU)
    ids, _ = heldout_ids(scored, "test")
    alone, together = score(scored, ids, 1, CPU)
    assert alone[0].ppl == pytest.approx(test["test_ppl"], rel=1e-9) and together is None


def test_evaluate_scores_a_text_file_and_an_ensemble(runs, tmp_path):
    """The validation split written out as a text file reads back as the same ids (less
    the spaces at its ends, which d2l preprocessing strips); two checkpoints print both and
    their ensemble."""
    run = runs / "split"
    scored = load_scored([str(run / "best.pt"), str(run / "last.pt")], CPU)
    ids, _ = heldout_ids(scored, "val")
    vocab = scored[0].vocab
    text = tmp_path / "val.txt"
    text.write_text(vocab.decode(ids).strip(" "))
    from_text, _ = text_ids(str(text), vocab, "d2l", "error")
    space = vocab.index[" "]
    inner = np.flatnonzero(np.asarray(ids) != space)
    assert np.array_equal(from_text, np.asarray(ids)[inner[0]: inner[-1] + 1])
    proc = run_evaluate("--checkpoint", run / "best.pt", "--checkpoint", run / "last.pt",
                        "--text", text)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 and lines[3].endswith("ensemble of 2 (mean of their probabilities)")
    losses = [float(line.split()[5]) for line in lines[1:]]
    assert losses[2] <= (losses[0] + losses[1]) / 2 + 1e-4


def test_characters_the_model_never_saw(runs, tmp_path):
    text = tmp_path / "odd.txt"
    text.write_text("time travel \u00e9t\u00e9 \u2603\n")
    scored = load_scored([str(runs / "raw" / "best.pt")], CPU)
    with pytest.raises(ConfigError, match="characters the model never saw: '\u00e9' '\u2603'"):
        text_ids(str(text), scored[0].vocab, "raw", "error")
    ids, _ = text_ids(str(text), scored[0].vocab, "raw", "replace")
    assert (ids == 0).sum() == 3  # two é and the snowman read as <unk>
    assert math.isfinite(score(scored, ids, 1, CPU)[0][0].ppl)


@pytest.mark.parametrize("args, fragment", [
    (["--checkpoint", "{split}/best.pt", "--checkpoint", "{raw}/best.pt"],
     "another vocabulary or preprocessing"),
    (["--checkpoint", "{raw}/best.pt", "--split", "test"], "trained without a test split"),
    (["--checkpoint", "{split}/best.pt", "--lanes", "0"], "--lanes must be >= 1"),
    (["--checkpoint", "{split}/nothing.pt"], "not found"),
    (["--checkpoint", "{split}/best.pt", "--text", "{split}/missing.txt"],
     "--text {split}/missing.txt does not exist"),
    (["--checkpoint", "{split}/best.pt", "--text", "{latin1}"],
     "latin1.txt is not valid UTF-8 (byte offset 5): convert it to UTF-8, or pass "
     "--encoding-errors replace"),
])
def test_bad_input_is_one_line_and_exit_2(runs, args, fragment, monkeypatch, capsys, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("time \u00e9t\u00e9".encode("latin-1"))
    paths = {"split": runs / "split", "raw": runs / "raw", "latin1": latin1}
    code, _, err = evaluate_here([a.format(**paths) for a in args], monkeypatch, capsys)
    fragment = fragment.format(**paths)
    assert code == 2
    assert err.startswith("error: ") and fragment in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
