"""Exact resume (at epoch boundaries and mid-epoch) and graceful stops on SIGINT/SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rnnlm.checkpoint import load_checkpoint, resume_config
from rnnlm.config import load_config
from rnnlm.training.interrupts import StopRequest, TrainingInterrupted
from rnnlm.training.run import train
from tests.conftest import ROOT

TIMING_KEYS = {"tokens_per_s", "epoch_s", "wall_s"}
# Dropout and Adam make the test sensitive to the torch RNG and the optimizer state; the
# two iterators cover a carried hidden state (sequential) and per-epoch shuffles (random).
SETTINGS = ["model.kind=lstm_scratch", "model.num_layers=2", "model.dropout=0.3",
            "train.optimizer=adam", "train.lr=0.01", "train.predict_every=0",
            "train.checkpoint_every=2", "train.threads=1", "data.max_tokens=600"]


def records(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in lines]


def tiny(data_dir, out_dir, *overrides):
    return load_config(ROOT / "configs/tiny.yaml",
                       [f"data.data_dir={data_dir}", f"out_dir={out_dir}", *SETTINGS,
                        *overrides])


def resume(out_dir, *overrides, **kwargs):
    path = out_dir / "last.pt"
    ckpt = load_checkpoint(path)
    cfg = resume_config(ckpt, list(overrides), path)
    return train(cfg, quiet=True, resume=ckpt, resume_path=path, **kwargs)


@pytest.fixture(params=["sequential", "random"])
def uninterrupted(request, data_dir, tmp_path):
    """An uninterrupted 6-epoch run; returns (iterator, its per-epoch records, final text)."""
    out = tmp_path / "whole"
    final = train(tiny(data_dir, out, f"data.iterator={request.param}", "train.epochs=6"),
                  quiet=True)
    return request.param, records(out), final["prediction"]


def test_three_epochs_resumed_to_six_equal_six(uninterrupted, data_dir, tmp_path):
    iterator, whole, prediction = uninterrupted
    out = tmp_path / "split"
    train(tiny(data_dir, out, f"data.iterator={iterator}", "train.epochs=3"), quiet=True)
    final = resume(out, "train.epochs=6")
    assert records(out) == whole  # every epoch, bit for bit (json keeps all float digits)
    assert [r["epoch"] for r in records(out)] == [1, 2, 3, 4, 5, 6]
    assert final["prediction"] == prediction
    assert load_checkpoint(out / "last.pt")["progress"]["epoch"] == 6


class StopAfter(StopRequest):
    """Asks to stop once it has been looked at `n` times (the loop looks before each batch
    and after each epoch), as a SIGINT arriving at that moment would."""

    def __init__(self, n):
        super().__init__()
        self.left = n

    def __bool__(self):
        self.left -= 1
        if self.left < 0 and self.signum is None:
            self.signum = signal.SIGINT
        return super().__bool__()


def test_stopped_mid_epoch_and_resumed_equals_uninterrupted(uninterrupted, data_dir, tmp_path):
    iterator, whole, prediction = uninterrupted
    out = tmp_path / "stopped"
    # About 7 batches into epoch 4 (the loop also looks once or twice between epochs).
    with pytest.raises(TrainingInterrupted) as info:
        train(tiny(data_dir, out, f"data.iterator={iterator}", "train.epochs=6"), quiet=True,
              stop=StopAfter(whole[2]["step"] + 13))
    stop = info.value
    assert stop.exit_code == 130 and stop.epoch == 3 and 0 < stop.batch < 20
    ckpt = load_checkpoint(out / "last.pt")
    progress = ckpt["progress"]
    assert (progress["epoch"], progress["batch"]) == (3, stop.batch)
    assert progress["step"] == whole[2]["step"] + stop.batch
    carried = progress["partial"]["state"]
    assert (carried is not None) == (iterator == "sequential")
    assert len(records(out)) == 3
    final = resume(out)
    assert records(out) == whole
    assert final["prediction"] == prediction


def test_resume_trims_epochs_written_after_the_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny(data_dir, out, "train.epochs=3", "train.checkpoint_every=2"), quiet=True)
    whole = records(out)
    # As if the process had died after writing epoch 3's record but before its last.pt:
    # last.pt goes back to an epoch-2 checkpoint of the same run.
    train(tiny(data_dir, tmp_path / "two", "train.epochs=2"), quiet=True)
    (out / "last.pt").write_bytes((tmp_path / "two" / "last.pt").read_bytes())
    resume(out, "train.epochs=3")
    assert [r["epoch"] for r in records(out)] == [1, 2, 3]
    assert records(out) == whole


def test_resume_with_a_new_learning_rate_uses_it(data_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny(data_dir, out, "train.epochs=1"), quiet=True)
    resume(out, "train.epochs=2", "train.lr=0.002")
    assert [r["lr"] for r in records(out)] == [0.01, 0.002]


class StopAtEpoch(StopRequest):
    """Asks to stop once `epochs` records are in out_dir/metrics.jsonl (an epoch's end)."""

    def __init__(self, out_dir, epochs):
        super().__init__()
        self.metrics, self.epochs = out_dir / "metrics.jsonl", epochs

    def __bool__(self):
        if self.signum is None and self.metrics.exists() and \
                len(self.metrics.read_text().splitlines()) >= self.epochs:
            self.signum = signal.SIGINT
        return super().__bool__()


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_held_out_run_with_schedule_and_average_resumes_exactly(schedule, data_dir, tmp_path):
    """Everything a held-out run carries between epochs comes back: the LR schedule, the
    averaged weights, the early-stopping count and the best weights the test split uses."""
    settings = ["data.max_tokens=1200", "data.split=[0.8,0.1,0.1]",
                f"train.lr_schedule={schedule}", "train.lr_min=0.0001", "train.lr_gamma=0.5",
                "train.plateau_patience=0", "train.ema_decay=0.9",
                "train.early_stop_patience=50"]
    whole_out, split_out = tmp_path / "whole", tmp_path / "split"
    whole = train(tiny(data_dir, whole_out, "train.epochs=6", *settings), quiet=True)
    with pytest.raises(TrainingInterrupted):  # cosine spans train.epochs: keep it at 6
        train(tiny(data_dir, split_out, "train.epochs=6", *settings), quiet=True,
              stop=StopAtEpoch(split_out, 3))
    assert load_checkpoint(split_out / "last.pt")["progress"]["epoch"] == 3
    final = resume(split_out)
    assert records(split_out) == records(whole_out)
    assert len({r["lr"] for r in records(whole_out) if "lr" in r}) > 1  # the schedule moved
    assert final["test_ppl"] == whole["test_ppl"]
    assert final["best_epoch"] == whole["best_epoch"]


def test_sampling_weights_are_the_averaged_ones(data_dir, tmp_path):
    from rnnlm.checkpoint import averaged_weights, model_from_checkpoint

    out = tmp_path / "run"
    train(tiny(data_dir, out, "train.epochs=2", "train.ema_decay=0.9"), quiet=True)
    ckpt = load_checkpoint(out / "last.pt")
    model, *_ = model_from_checkpoint(ckpt, "cpu")
    averaged = averaged_weights(ckpt)
    assert all((model.state_dict()[k] == v).all() for k, v in averaged.items())
    assert any((ckpt["model"][k] != v).any() for k, v in averaged.items())


# ---------------------------------------------------------------------------- real signals


def start_training(tmp_path, data_dir, *overrides):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.yaml",
           "--set", f"data.data_dir={data_dir}", "--set", f"out_dir={out}",
           "--set", "train.checkpoint_every=0", "--set", "train.predict_every=0",
           "--set", "train.threads=1", "--set", "data.max_tokens=600"]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    return proc, out


def wait_for(condition, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"gave up waiting; stderr: {proc.communicate()[1]}")
        time.sleep(0.02)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_last_and_prints_the_resume_command(signum, code, tmp_path, data_dir):
    proc, out = start_training(tmp_path, data_dir, "train.epochs=100000")
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert f"resume with: python train.py --resume {out / 'last.pt'}" in stderr
    assert signal.Signals(signum).name in stderr and "Traceback" not in stderr
    ckpt = load_checkpoint(out / "last.pt")
    done = ckpt["progress"]["epoch"]
    assert done >= 1 and len(records(out)) == done
    assert not list(out.glob(".*.tmp"))
    # ... and that checkpoint resumes, appending to the same metrics.jsonl: for SIGINT
    # through the very command printed, for SIGTERM in-process (faster).
    if signum == signal.SIGINT:
        command = stderr.split("resume with: ")[1].split()
        proc = subprocess.run([sys.executable, *command[1:], "--quiet", "--set",
                               f"train.epochs={done + 2}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    else:
        resume(out, f"train.epochs={done + 2}")
    assert [r["epoch"] for r in records(out)] == list(range(1, done + 3))


# Runs train.py with a checkpoint serializer whose third write (epoch 2's best.pt) receives
# the first Ctrl-C, writes half a file and stalls in short sleeps (so signals are handled):
# a save is in progress for as long as the test needs to press Ctrl-C a second time.
STALLING_WRITER = """
import os, runpy, signal, sys, time
import torch
import rnnlm.checkpoint
writes = []
def stalling_save(obj, f):
    writes.append(obj["progress"]["epoch"])
    if len(writes) == 3:
        os.kill(os.getpid(), signal.SIGINT)
        f.write(b"half a checkpoint")
        f.flush()
        print("WRITING", file=sys.stderr, flush=True)
        for _ in range(1200):
            time.sleep(0.05)
    torch.save(obj, f)
rnnlm.checkpoint._serialize = stalling_save
sys.argv = sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_second_ctrl_c_quits_at_once_mid_write(tmp_path, data_dir):
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", STALLING_WRITER, "train.py", "--quiet",
           "--config", "configs/tiny.yaml", "--set", f"data.data_dir={data_dir}",
           "--set", f"out_dir={out}", "--set", "train.epochs=100000",
           "--set", "train.checkpoint_every=1", "--set", "train.threads=1",
           "--set", "data.max_tokens=600"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: "WRITING" in proc.stderr.readline(), proc)
    # Epoch 1's checkpoints as they are while epoch 2's best.pt is being written.
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")}
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)  # the second Ctrl-C: quit now, in the middle of the write
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert time.monotonic() - sent < 20  # the stalled write alone would take 60 s
    assert "quitting at once" in stderr and "Traceback" not in stderr
    # Nothing corrupted: both files are exactly as before and load; no half file is left.
    for name, content in before.items():
        assert (out / name).read_bytes() == content
        assert load_checkpoint(out / name)["progress"]["epoch"] == 1
    assert not list(out.glob(".*.tmp"))


def test_a_quick_repeat_of_the_same_signal_is_one_ctrl_c():
    """torchrun may deliver one Ctrl-C twice: within the window it is not a second one."""
    from rnnlm.training.interrupts import stop_on_signals

    request = StopRequest()
    with stop_on_signals(request, repeat_window_s=30.0):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a repeat: no SystemExit
        assert request.signum == signal.SIGINT
        with pytest.raises(SystemExit) as info:
            os.kill(os.getpid(), signal.SIGTERM)  # another signal still quits at once
    assert info.value.code == 143
    request = StopRequest()
    with stop_on_signals(request):  # alone (no torchrun): a second Ctrl-C quits
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGINT)
