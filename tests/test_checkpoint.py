"""Checkpoint files: contents, safe loading, atomic writes, refusals, out_dir protection."""

import errno
import fractions
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import rnnlm.checkpoint as checkpoint
from rnnlm.checkpoint import (
    CheckpointError,
    atomic_save,
    capture_rng,
    check_compatible,
    load_checkpoint,
    model_from_checkpoint,
    restore_rng,
    resume_config,
)
from rnnlm.config import ConfigError, config_from_dict, load_config
from rnnlm.data.corpus import Vocab
from rnnlm.training.best import improves
from rnnlm.training.metrics import MetricsLog
from rnnlm.training.run import train
from tests.conftest import ROOT


@pytest.fixture
def trained(tiny_overrides, tmp_path):
    """A finished 2-epoch tiny run (Adam, so the optimizer has state to save)."""
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [*tiny_overrides, "train.optimizer=adam", "train.lr=0.01",
                       "train.threads=1", "data.max_tokens=600"])
    train(cfg, quiet=True)
    return tmp_path / "run"


def plain(value) -> bool:
    """Only the types torch.load(weights_only=True) accepts without allow-listing."""
    if type(value) in (dict, OrderedDict):  # state_dicts are OrderedDicts
        return all(type(k) in (str, int) and plain(v) for k, v in value.items())
    if type(value) in (list, tuple):
        return all(plain(v) for v in value)
    return type(value) in (int, float, str, bool, type(None), torch.Tensor)


def test_checkpoint_holds_the_whole_run_as_plain_data(trained):
    ckpt = load_checkpoint(trained / "last.pt")
    assert plain(ckpt)
    assert ckpt["format_version"] == checkpoint.FORMAT_VERSION
    assert ckpt["config"]["model"]["kind"] == "rnn_scratch"
    assert ckpt["vocab"]["preprocess"] == "d2l" and len(ckpt["vocab"]["tokens"]) == 28
    assert ckpt["progress"]["epoch"] == 2 and ckpt["progress"]["batch"] == 0
    assert ckpt["progress"]["step"] == ckpt["record"]["step"] > 0
    assert ckpt["optimizer"]["state"], "Adam moments must be saved"
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"])
    assert ckpt["best"]["metric"] == "train_ppl"
    assert ckpt["best"]["value"] == pytest.approx(ckpt["record"]["train_ppl"])
    # The model rebuilds from the file alone and computes what the saved weights say.
    model, vocab, preprocess, cfg = model_from_checkpoint(ckpt, torch.device("cpu"))
    assert vocab.tokens == ckpt["vocab"]["tokens"] and preprocess == "d2l"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt["model"][name])


def test_best_follows_validation_when_there_is_one():
    assert improves(None, {"train_ppl": 5.0})
    assert improves({"metric": "train_ppl", "value": 5.0}, {"train_ppl": 4.0})
    assert not improves({"metric": "train_ppl", "value": 5.0}, {"train_ppl": 6.0})
    assert not improves(None, {"train_ppl": float("nan")})
    best = {"metric": "val_ppl", "value": 9.0}
    assert improves(best, {"train_ppl": 20.0, "val_ppl": 8.0})
    assert not improves(best, {"train_ppl": 1.0, "val_ppl": 9.5})
    assert not improves(best, {"train_ppl": 1.0})  # no validation this epoch
    assert improves({"metric": "train_ppl", "value": 1.0}, {"train_ppl": 2.0, "val_ppl": 30.0})


def test_interrupted_write_keeps_the_previous_checkpoint(trained, monkeypatch):
    target = trained / "last.pt"
    before = target.read_bytes()

    def half_then_disk_full(obj, f):
        f.write(before[: len(before) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_serialize", half_then_disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous file"):
        atomic_save({"anything": 1}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in trained.iterdir()) == [
        "best.pt", "config.yaml", "last.pt", "metrics.jsonl", "perplexity.png"]

    # A process stopped mid-write (second Ctrl-C raises SystemExit) also leaves it intact.
    def half_then_exit(obj, f):
        f.write(before[: len(before) // 3])
        raise SystemExit(130)

    monkeypatch.setattr(checkpoint, "_serialize", half_then_exit)
    with pytest.raises(SystemExit):
        atomic_save({"anything": 1}, target)
    assert target.read_bytes() == before
    assert not list(trained.glob(".*.tmp"))
    assert load_checkpoint(target)["progress"]["epoch"] == 2


def test_failed_write_during_training_is_one_line_and_keeps_last(tiny_overrides, monkeypatch):
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [*tiny_overrides, "train.epochs=4", "train.checkpoint_every=2",
                       "train.threads=1", "data.max_tokens=600"])

    def disk_full_after_epoch_two(obj, f):
        if obj["progress"]["epoch"] > 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        torch.save(obj, f)

    monkeypatch.setattr(checkpoint, "_serialize", disk_full_after_epoch_two)
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        train(cfg, quiet=True)
    out_dir = Path(cfg.out_dir)
    assert load_checkpoint(out_dir / "last.pt")["progress"]["epoch"] == 2
    assert load_checkpoint(out_dir / "best.pt")["progress"]["epoch"] == 2
    assert not list(out_dir.glob(".*.tmp"))


def test_refuses_files_that_are_not_safe_checkpoints(tmp_path, trained):
    cases = {}
    cases["missing.pt"] = None
    (tmp_path / "text.pt").write_text("not a checkpoint")
    cases["text.pt"] = "no file written by torch.save"
    good = (trained / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    cases["cut.pt"] = "cut short"
    torch.save({"format": checkpoint.FORMAT, "x": fractions.Fraction(1, 2)},
               tmp_path / "pickled.pt")
    cases["pickled.pt"] = "pickled Python objects"
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    cases["foreign.pt"] = "not an rnnlm checkpoint"
    ckpt = load_checkpoint(trained / "last.pt")
    torch.save({**ckpt, "format_version": 99}, tmp_path / "future.pt")
    cases["future.pt"] = "version 99, newer"
    torch.save({k: v for k, v in ckpt.items() if k != "format_version"}, tmp_path / "nover.pt")
    cases["nover.pt"] = "no format version"
    torch.save({k: v for k, v in ckpt.items() if k != "optimizer"}, tmp_path / "part.pt")
    cases["part.pt"] = "missing optimizer"
    for name, fragment in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / name)
        message = str(info.value)
        assert "\n" not in message and name in message
        assert fragment is None or fragment in message, message
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_checkpoint_written_on_a_gpu_loads_on_a_cpu(trained, tmp_path, monkeypatch):
    ckpt = load_checkpoint(trained / "last.pt")
    # Tag every storage as living on cuda:0, as torch.save does on a GPU machine.
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(ckpt, tmp_path / "gpu.pt")
    monkeypatch.undo()
    if not torch.cuda.is_available():  # without map_location this file would not load here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pt", weights_only=True)
    loaded = load_checkpoint(tmp_path / "gpu.pt")
    assert loaded["model"]["output.weight"].device.type == "cpu"
    assert torch.equal(loaded["model"]["output.weight"], ckpt["model"]["output.weight"])


def test_rng_states_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_new_run_refuses_an_out_dir_with_a_checkpoint(trained, tiny_overrides):
    cfg = load_config(ROOT / "configs/tiny.yaml", tiny_overrides)
    last = (trained / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"--resume .*last\.pt.*--overwrite"):
        train(cfg, quiet=True)
    assert (trained / "last.pt").read_bytes() == last  # nothing was touched
    assert len((trained / "metrics.jsonl").read_text().splitlines()) == 2
    train(cfg, quiet=True, overwrite=True)
    assert (trained / "last.pt").read_bytes() != last


def test_resume_refuses_changes_to_the_model(trained):
    path = trained / "last.pt"
    ckpt = load_checkpoint(path)
    for override, fragment in [("model.kind=lstm", "model.kind='lstm'"),
                               ("model.hidden_size=32", "model.hidden_size=32"),
                               ("model.num_layers=2", "model.num_layers=2"),
                               ("data.preprocess=raw", "data.preprocess='raw'"),
                               ("train.optimizer=sgd", "train.optimizer='sgd'")]:
        with pytest.raises(CheckpointError, match="--config") as info:
            resume_config(ckpt, [override, "train.epochs=5"], path)
        assert fragment in str(info.value)
    with pytest.raises(CheckpointError, match="already completed 2 .*train.epochs=N"):
        resume_config(ckpt, [], path)
    # Changing the data stream is fine at an epoch boundary, not inside an epoch.
    assert resume_config(ckpt, ["train.epochs=5", "data.batch_size=2"], path).data.batch_size == 2
    mid_epoch = {**ckpt, "progress": {**ckpt["progress"], "batch": 3}}
    with pytest.raises(CheckpointError, match="stopped inside epoch 3.*data.batch_size=4"):
        resume_config(mid_epoch, ["train.epochs=5", "data.batch_size=2"], path)
    assert resume_config(ckpt, ["train.epochs=5", "model.dropout=0.1"], path).model.dropout == 0.1
    cfg = resume_config(ckpt, ["train.epochs=5", "train.lr=0.5"], path)
    assert (cfg.train.epochs, cfg.train.lr, cfg.out_dir) == (5, 0.5, str(trained))
    with pytest.raises(ConfigError, match="unknown key train.epoks"):
        resume_config(ckpt, ["train.epoks=5"], path)


def test_mismatched_model_or_vocabulary_is_a_sentence_not_a_traceback(trained):
    ckpt = load_checkpoint(trained / "last.pt")
    vocab = Vocab(ckpt["vocab"]["tokens"])
    base = ckpt["config"]
    other = config_from_dict(base, ["model.kind=gru", "model.num_layers=2"])
    with pytest.raises(CheckpointError, match="model.kind='rnn_scratch'.*model.kind='gru'"):
        check_compatible(ckpt, other, vocab, "last.pt")
    same = config_from_dict(base)
    check_compatible(ckpt, same, vocab, "last.pt")  # no complaint
    with pytest.raises(CheckpointError, match=r"vocabulary of 29 .* 28 \(new characters '!'"):
        check_compatible(ckpt, same, Vocab(vocab.tokens + ["!"]), "last.pt")
    swapped = Vocab(vocab.tokens[:1] + vocab.tokens[2:3] + vocab.tokens[1:2] + vocab.tokens[3:])
    with pytest.raises(CheckpointError, match="same characters in another order"):
        check_compatible(ckpt, same, swapped, "last.pt")


def test_resume_on_another_text_is_refused(trained, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("only a few letters here " * 200)
    path = trained / "last.pt"
    ckpt = load_checkpoint(path)
    cfg = resume_config(ckpt, ["train.epochs=4", f"data.path={text}"], path)
    with pytest.raises(CheckpointError, match="vocabulary of 14 tokens.*missing characters .bcdg"):
        train(cfg, quiet=True, resume=ckpt, resume_path=path)


def test_checkpoint_every_is_validated():
    with pytest.raises(ConfigError, match="train.checkpoint_every must be >= 0"):
        config_from_dict({}, ["train.checkpoint_every=-1"])
    assert config_from_dict({}, ["train.checkpoint_every=0"]).train.checkpoint_every == 0


def test_metrics_log_keeps_only_epochs_before_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n{"epoch": 4, "trunc')
    MetricsLog(path, append=True).keep_epochs(2)
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


def test_resume_into_another_folder_and_overwrite_rules(trained, tmp_path):
    path = trained / "last.pt"
    ckpt = load_checkpoint(path)
    with pytest.raises(ConfigError, match="--overwrite would delete the checkpoint"):
        train(resume_config(ckpt, ["train.epochs=3"], path), quiet=True, resume=ckpt,
              resume_path=path, overwrite=True)
    fork = tmp_path / "fork"
    train(resume_config(ckpt, ["train.epochs=3", f"out_dir={fork}"], path), quiet=True,
          resume=ckpt, resume_path=path)
    assert load_checkpoint(fork / "last.pt")["progress"]["epoch"] == 3
    assert load_checkpoint(path)["progress"]["epoch"] == 2  # the original is untouched
    with pytest.raises(CheckpointError, match="already holds last.pt"):
        train(resume_config(ckpt, ["train.epochs=3", f"out_dir={fork}"], path), quiet=True,
              resume=ckpt, resume_path=path)
