"""The training data across runs: a resumed run refuses a text that changed since its
checkpoint (the checkpoint's data fingerprint), and --init-from starts a new run from a
checkpoint's weights on another text, or says what does not fit."""

import json
import shutil

import pytest
import torch

import rnnlm
from rnnlm import cli
from rnnlm.checkpoint import load_checkpoint
from rnnlm.data.corpus import tokenize
from rnnlm.training import run as training_run
from tests.conftest import ROOT

TINY = str(ROOT / "configs/tiny.yaml")


def settings(*overrides) -> list[str]:
    return [word for item in ("train.threads=1", "train.predict_every=0", *overrides)
            for word in ("--set", item)]


def train_command(capfd, *argv) -> tuple[int, str, str]:
    """`train.py ARGV` as the user runs it, in this process: (exit code, stdout, stderr)."""
    main = cli.script_main("train")
    with pytest.raises(SystemExit) as done:
        cli.run_main(lambda: main([str(word) for word in argv]))
    out, err = capfd.readouterr()
    return done.value.code, out, err


# One xdist worker runs this module, so its trained fixture is made once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("test_init_from")


@pytest.fixture(scope="module")
def source(tmp_path_factory, time_machine_path):
    """A finished 4-epoch tiny run on a copy of the Time Machine: (its folder, the text)."""
    tmp = tmp_path_factory.mktemp("source")
    text = tmp / "text.txt"
    shutil.copy(time_machine_path, text)
    main = cli.script_main("train")
    with pytest.raises(SystemExit) as done:
        cli.run_main(lambda: main(["--config", TINY, "--quiet", *settings(
            f"data.path={text}", f"data.data_dir={tmp / 'data'}", f"out_dir={tmp / 'run'}",
            "train.epochs=4")]))
    assert done.value.code == 0
    return tmp / "run", text


@pytest.fixture
def run_copy(source, tmp_path):
    """A copy of the source run's folder, and a copy of its text elsewhere."""
    folder, text = source
    shutil.copytree(folder, tmp_path / "run")
    shutil.copy(text, tmp_path / "moved.txt")
    return tmp_path / "run", tmp_path / "moved.txt"


def edited(text: str) -> str:
    """Other words with the same characters, as often each: the vocabulary stays the same."""
    return text.replace("time", "emit").replace("was", "saw")


def test_resume_refuses_an_edited_text(run_copy, tmp_path, capfd):
    folder, text = run_copy
    original = text.read_text()
    text.write_text(edited(original))
    assert tokenize(edited(original), "d2l")[1] == tokenize(original, "d2l")[1]
    data = f"data.data_dir={tmp_path / 'data'}"
    before = (folder / "last.pt").read_bytes()

    code, _, err = train_command(capfd, "--resume", folder / "last.pt",
                                 *settings("train.epochs=5", f"data.path={text}", data))
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: the training text changed since "), err
    assert f"{text} now has sha1 " in err and f"--init-from {folder / 'last.pt'}" in err

    # train.auto_resume continues out_dir/last.pt by itself, and refuses alike.
    code, _, err = train_command(capfd, "--config", TINY, *settings(
        "train.epochs=5", f"data.path={text}", f"out_dir={folder}", "train.auto_resume=true",
        data))
    assert code == 2 and "the training text changed since" in err, err
    assert (folder / "last.pt").read_bytes() == before

    # The same text at another path is the same text: it resumes.
    text.write_text(original)
    code, _, err = train_command(capfd, "--resume", folder / "last.pt", "--quiet",
                                 *settings("train.epochs=5", f"data.path={text}", data))
    assert code == 0, err
    assert load_checkpoint(folder / "last.pt")["progress"]["epoch"] == 5


def test_checkpoint_holds_the_fingerprint_of_its_data(source):
    folder, text = source
    data = load_checkpoint(folder / "last.pt")["data"]
    assert data["source"] == str(text) and data["files"] == 1
    assert len(data["text_sha1"]) == 40
    assert (data["preprocess"], data["encoding_errors"]) == ("d2l", "strict")
    assert data["max_tokens"] == data["tokens"] == data["train_tokens"] == 2000
    assert data["split"] is None


def test_checkpoint_without_a_fingerprint_resumes_with_a_note(run_copy, capfd):
    """A checkpoint of an older version (no `data`, no seal) still resumes, and says that it
    cannot check the text."""
    folder, _ = run_copy
    ckpt = load_checkpoint(folder / "last.pt")
    del ckpt["data"]
    torch.save(ckpt, folder / "last.pt")  # as checkpoints were written before
    code, _, err = train_command(capfd, "--resume", folder / "last.pt", "--quiet",
                                 *settings("train.epochs=5"))
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "kept no fingerprint of its training text" in notes[0]
    assert load_checkpoint(folder / "last.pt")["data"]["text_sha1"]  # written again, with one


def first_epoch_ppl(folder) -> float:
    return json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])["train_ppl"]


def test_init_from_trains_on_another_text_from_the_weights(source, tmp_path, capfd,
                                                            monkeypatch):
    folder, text = source
    other = tmp_path / "other.txt"
    whole = text.read_text()
    other.write_text(whole[len(whole) // 2:])  # other words; d2l orders its letters otherwise
    saved = load_checkpoint(folder / "last.pt")
    saved_tokens = saved["vocab"]["tokens"]
    assert tokenize(other.read_text(), "d2l")[1].tokens != saved_tokens

    starts = []  # the weights each epoch of the new run starts from
    real_epoch = training_run.train_epoch

    def recording(model, *args, **kwargs):
        starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_epoch(model, *args, **kwargs)

    monkeypatch.setattr(training_run, "train_epoch", recording)
    base = (f"data.path={other}", f"data.data_dir={tmp_path / 'data'}")
    code, _, err = train_command(capfd, "--config", TINY, "--init-from", folder / "last.pt",
                                 *settings(*base, f"out_dir={tmp_path / 'tuned'}"))
    assert code == 0, err
    tuned = load_checkpoint(tmp_path / "tuned" / "last.pt")
    # The first epoch started from the checkpoint's weights, ids matched by character.
    vocab = tuned["vocab"]["tokens"]
    assert sorted(vocab) == sorted(saved_tokens) and vocab != saved_tokens
    index = torch.tensor([saved_tokens.index(token) for token in vocab])
    first, weights = starts[0], saved["model"]
    assert torch.equal(first["layers.0.weight_hh"], weights["layers.0.weight_hh"])
    assert torch.equal(first["layers.0.weight_ih"], weights["layers.0.weight_ih"][:, index])
    assert torch.equal(first["output.weight"], weights["output.weight"][index])
    assert torch.equal(first["output.bias"], weights["output.bias"][index])
    # A new run: its own epochs from 1, its own folder; the source is untouched.
    assert tuned["progress"]["epoch"] == 2
    records = [json.loads(line) for line in
               (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert load_checkpoint(folder / "last.pt")["progress"]["epoch"] == 4

    # Its first epoch is far better than a fresh run's on the same text (ln V: ppl 28).
    monkeypatch.setattr(training_run, "train_epoch", real_epoch)
    code, _, err = train_command(capfd, "--config", TINY, "--quiet",
                                 *settings(*base, f"out_dir={tmp_path / 'fresh'}"))
    assert code == 0, err
    assert first_epoch_ppl(tmp_path / "tuned") < 0.75 * first_epoch_ppl(tmp_path / "fresh")


def test_init_from_says_what_does_not_fit(source, tmp_path, capfd):
    folder, text = source
    last = folder / "last.pt"
    base = (f"data.path={text}", f"data.data_dir={tmp_path / 'data'}",
            f"out_dir={tmp_path / 'new'}")
    cases = [
        ("model.hidden_size=32", "its weights do not fit this run's model: output.weight has "
                                 "shape (28, 16) in the checkpoint, (28, 32) in the model "
                                 "(model.hidden_size=16 there, 32 here)"),
        ("model.num_layers=2", "(model.num_layers=1 there, 2 here)"),
        ("model.embedding_dim=8", "the checkpoint has no embedding.weight (shape (28, 8)"),
        ("model.kind=gru", "it holds a model.kind='rnn_scratch' model, but this run builds "
                           "model.kind='gru'"),
        ("data.preprocess=raw", "this run's text has characters its vocabulary of 28 tokens "
                                "lacks"),
    ]
    for override, fragment in cases:
        code, _, err = train_command(capfd, "--config", TINY, "--init-from", last,
                                     *settings(*base, override))
        assert code == 2, (override, err)
        assert err.count("\n") == 1 and f"error: --init-from {last}: " in err, err
        assert fragment in err, (override, err)
    assert not (tmp_path / "new" / "last.pt").exists()


def test_init_from_is_a_new_run_only(source, tmp_path, capfd):
    folder, _ = source
    last = folder / "last.pt"
    code, _, err = train_command(capfd, "--resume", last, "--init-from", last)
    assert code == 2 and "give --init-from with --config" in err, err
    before = last.read_bytes()
    code, _, err = train_command(capfd, "--config", TINY, "--init-from", last, "--overwrite",
                                 *settings(f"out_dir={folder}"))
    assert code == 2 and f"--overwrite would delete {last}" in err, err
    assert last.read_bytes() == before


def test_the_notebook_api_takes_init_from(source, tmp_path, capfd):
    folder, text = source
    run = rnnlm.train(TINY, epochs=1, out_dir=tmp_path / "api", progress=False,
                      init_from=folder / "last.pt",
                      overrides={"data.path": str(text), "data.data_dir": str(tmp_path / "d"),
                                 "train.threads": 1})
    assert f"a new run from the trained weights of {folder / 'last.pt'} (after its epoch 4), " \
           f"with a fresh optimizer and schedule, training to epoch 1" in capfd.readouterr().out
    source_record = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    # One more epoch on the same text from the trained weights: no worse than where it was.
    assert run.metrics[0]["train_ppl"] < 1.1 * source_record["train_ppl"]
