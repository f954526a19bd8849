"""Checkpoints of data-parallel runs: written by rank 0 only, resumed with another world
size, recovered by torchrun after a lost worker (train.auto_resume), stopped by Ctrl-C.

Each test starts torchrun once; the reference is one uninterrupted single-process run, which
the 2-process run reproduces to ~1e-5 (tests/training/test_distributed.py)."""

import json
import os
import signal
import subprocess
import sys

import pytest

import sample
from rnnlm.checkpoint import load_checkpoint, resume_config
from rnnlm.config import load_config
from rnnlm.training.interrupts import TrainingInterrupted
from rnnlm.training.run import train
from tests.conftest import ROOT
from tests.training.test_distributed import TORCHRUN, single_process_env
from tests.training.test_resume import StopAfter

EPOCHS = 4
SETTINGS = ["train.threads=1", "train.predict_every=0", "data.max_tokens=800",
            "train.checkpoint_every=1", "train.auto_resume=true", f"train.epochs={EPOCHS}"]
PROBE = str(ROOT / "tests" / "training" / "torchrun_probe.py")
# every torchrun test in one xdist group, run by one worker (tests/conftest.py); the reference
# fixture is then made once too
pytestmark = pytest.mark.xdist_group("torchrun")


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def settings(data_dir, out_dir):
    return [f"data.data_dir={data_dir}", f"out_dir={out_dir}", *SETTINGS]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, time_machine_path):
    d = tmp_path_factory.mktemp("data")
    (d / "timemachine.txt").write_bytes(time_machine_path.read_bytes())
    return d


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """Per-epoch records and final prediction of one uninterrupted 1-process run."""
    out = tmp_path_factory.mktemp("reference")
    final = train(load_config(ROOT / "configs/tiny.yaml", settings(data_dir, out)), quiet=True)
    return read_metrics(out), final["prediction"]


def assert_same_run(got, want):
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == list(range(1, EPOCHS + 1))
    for a, b in zip(got, want):
        assert (a["step"], a["tokens"]) == (b["step"], b["tokens"])
        for key in ("train_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a["epoch"])


def torchrun(out_dir, *args, env=None, max_restarts=0):
    saves = out_dir.parent / f"{out_dir.name}-saves.log"
    cmd = [*TORCHRUN, "--nproc_per_node=2", f"--max-restarts={max_restarts}", PROBE, *args]
    env = {**single_process_env(), "PYTHONUNBUFFERED": "1",
           "RNNLM_PROBE_SAVES": str(saves), **(env or {})}
    return cmd, env, saves


def saved(log):
    return [line.split() for line in log.read_text().splitlines()]


def test_lost_worker_is_recovered_by_auto_resume(data_dir, reference, tmp_path, monkeypatch,
                                                 capsys):
    """One process stops inside epoch 2; torchrun with 2 processes auto-resumes that
    checkpoint (1 -> 2 processes, lanes re-sharded), loses rank 1 inside epoch 3, restarts
    the workers, which auto-resume epoch 2's last.pt, and ends as the reference did."""
    want, prediction = reference
    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs/tiny.yaml", settings(data_dir, out))
    with pytest.raises(TrainingInterrupted):
        train(cfg, quiet=True, stop=StopAfter(want[0]["step"] + 6))
    partial = load_checkpoint(out / "last.pt")["progress"]
    assert partial["epoch"] == 1 and partial["batch"] > 0
    assert partial["partial"]["state"][0].shape[1] == 4  # every lane of the global batch

    # Rank 1 dies half way through epoch 3, counted in steps of its first process.
    epoch3 = want[2]["step"] - want[1]["step"]
    die_at = (want[1]["step"] - partial["step"]) + epoch3 // 2
    marker = tmp_path / "killed"
    flat = [a for o in settings(data_dir, out) for a in ("--set", o)]
    cmd, env, saves = torchrun(out, "--config", "configs/tiny.yaml", *flat, max_restarts=1,
                               env={"RNNLM_TEST_KILL": f"1:{die_at}:{marker}"})
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.read_text() == f"killed at step {die_at}\n"
    assert f"resumed {out / 'last.pt'} in epoch 2 after batch {partial['batch']} " in proc.stdout, \
        proc.stdout
    assert f"resumed {out / 'last.pt'} at the end of epoch 2" in proc.stdout
    assert_same_run(read_metrics(out), want)

    # Only rank 0 wrote checkpoints: best.pt and last.pt once per epoch, epoch 3 twice
    # (completed only by the restarted workers, after the first attempt had written epoch 2).
    writes = saved(saves)
    assert {w[0] for w in writes} == {"0", "1"} and all(w[0] == "0" for w in writes
                                                          if w[1] != "exit")
    assert [(w[1], int(w[2])) for w in writes if w[1] == "last.pt"] == [
        ("last.pt", e) for e in range(2, EPOCHS + 1)]

    # The final checkpoint samples like any other: greedy text = the run's own prediction.
    lines = proc.stdout.splitlines()
    assert lines[-2] == prediction
    monkeypatch.setattr(sys, "argv", ["sample.py", "--checkpoint", str(out / "last.pt"),
                                      "--greedy", "--num-chars", "10", "--device", "cpu"])
    capsys.readouterr()
    assert sample.main() == 0
    assert capsys.readouterr().out == prediction + "\n"


def test_ctrl_c_under_torchrun_stops_every_rank_and_resumes_on_one(data_dir, reference,
                                                                   tmp_path):
    """SIGINT to torchrun in the middle of epoch 2: both ranks stop after the same batch,
    rank 0 alone writes last.pt (lanes gathered), workers exit 130 without tracebacks, and
    one process resumes it (2 -> 1) to the reference's numbers."""
    want, prediction = reference
    out = tmp_path / "run"
    flat = [a for o in settings(data_dir, out) for a in ("--set", o)]
    pause_at = want[0]["step"] + 5
    cmd, env, saves = torchrun(out, "--config", "configs/tiny.yaml", *flat,
                               env={"RNNLM_PROBE_PAUSE": str(pause_at)})
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    seen = []
    for line in proc.stderr:  # rank 0 waits at step pause_at until the signal reaches it
        seen.append(line)
        if line.startswith("PAUSED"):
            break
    else:
        proc.wait()
        pytest.fail("".join(seen)[-3000:])
    proc.send_signal(signal.SIGINT)
    stdout, rest = proc.communicate(timeout=90)
    stderr = "".join(seen) + rest
    assert "KeyboardInterrupt" not in stderr and "[rank" not in stderr, stderr[-3000:]
    assert "rnnlm/" not in stderr  # torchrun reports the signal itself; no worker traceback
    assert stderr.count("resume with: python train.py --resume") == 1

    writes = saved(saves)
    assert sorted(w for w in writes if w[1] == "exit") == [["0", "exit", "130"],
                                                          ["1", "exit", "130"]]
    stops = [w for w in writes if w[1] == "last.pt" and w[3] != "0"]
    # Rank 0 was paused in step pause_at; the stop is agreed at the next step.
    assert stops == [["0", "last.pt", "1", str(pause_at + 1 - want[0]["step"])]]
    assert all(w[0] == "0" for w in writes if w[1] != "exit")
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["progress"]["partial"]["state"][0].shape[1] == 4  # both ranks' lanes

    path = out / "last.pt"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        assert var not in os.environ
    final = train(resume_config(ckpt, [], path), quiet=True, resume=ckpt, resume_path=path)
    assert_same_run(read_metrics(out), want)
    assert final["prediction"] == prediction
