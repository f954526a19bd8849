"""One run per out_dir, through the real command: a second run into a folder in use is
refused at once naming the first one's PID, a killed run leaves no stale lock (resume and
auto_resume go on), what its killed writes left behind is removed, and an out_dir that is a
file is one line."""

import json
import signal
import subprocess
import sys
import time

import pytest

from rnnlm import files
from rnnlm.checkpoint import load_checkpoint
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(files.fcntl is None, reason="no fcntl.flock on this platform")

QUICK = ["train.predict_every=0", "train.threads=1", "data.max_tokens=600"]


def command(data_dir, out, *overrides, config="configs/tiny.yaml"):
    cmd = [sys.executable, "train.py", "--quiet", "--config", config]
    for item in [f"data.data_dir={data_dir}", f"out_dir={out}", *QUICK, *overrides]:
        cmd += ["--set", item]
    return cmd


def run(cmd, timeout=120):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def epochs(out):
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def start_long_run(data_dir, out, *overrides):
    """A run that goes on until stopped, once it has logged two epochs and written last.pt."""
    proc = subprocess.Popen(command(data_dir, out, "train.epochs=100000",
                                    "train.checkpoint_every=1", *overrides),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "last.pt").exists() or not (out / "metrics.jsonl").exists() or \
            len(epochs(out)) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the first run did not get going: {proc.communicate()[1]}")
        time.sleep(0.05)
    return proc


def assert_one_line(stderr, *parts):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for part in parts:
        assert part in lines[0], stderr
    return lines[0]


def test_a_killed_run_leaves_no_stale_lock_and_its_temporaries_go(tmp_path, data_dir):
    out = tmp_path / "run"
    first = start_long_run(data_dir, out)
    # --resume of the run's own checkpoint, in place, while it is running: refused too
    resumed = run([sys.executable, "train.py", "--quiet", "--resume", str(out / "last.pt"),
                   "--set", "train.epochs=100001"])
    assert resumed.returncode == 2 and f"(process {first.pid})" in resumed.stderr
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    # What a write killed mid-way leaves: a full-size temporary checkpoint, and the names
    # earlier versions used for metrics and plots.
    stale = [f".last.pt.{first.pid}.0badf00d.tmp", "metrics.jsonl.tmp",
             ".perplexity.k1ll3d_0.png"]
    (out / stale[0]).write_bytes((out / "last.pt").read_bytes())
    for name in stale[1:]:
        (out / name).write_bytes(b"")
    assert (out / files.LOCK_FILE).exists()  # the killed run could not remove it

    done = load_checkpoint(out / "last.pt")["progress"]["epoch"]
    resumed = run([sys.executable, "train.py", "--quiet", "--resume", str(out / "last.pt"),
                   "--set", f"train.epochs={done + 1}"])
    assert resumed.returncode == 0, resumed.stderr
    assert epochs(out) == list(range(1, done + 2))
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt", "config.yaml", "last.pt", "metrics.jsonl", "perplexity.png"]

    # auto_resume after another kill: the restart of a torchrun job takes the folder again
    first = start_long_run(data_dir, out, "train.auto_resume=true")
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    done = load_checkpoint(out / "last.pt")["progress"]["epoch"]
    again = run(command(data_dir, out, "train.auto_resume=true", f"train.epochs={done + 1}",
                        "train.checkpoint_every=1"))
    assert again.returncode == 0, again.stderr
    assert epochs(out) == list(range(1, done + 2))


# "file" itself is tests/test_faults.py's
@pytest.mark.parametrize("where", ["below a file"])
def test_out_dir_that_is_a_file_is_one_line(tmp_path, data_dir, where):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("the user's notes")
    out = blocker if where == "file" else blocker / "run"
    proc = run(command(data_dir, out))
    assert proc.returncode == 2
    assert_one_line(proc.stderr, str(out), f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "the user's notes"
    # ... with auto_resume (which looks for out_dir/last.pt first), and on resume
    proc = run(command(data_dir, out, "train.auto_resume=true"))
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr
    if where != "file":
        return
    good = tmp_path / "good"
    assert run(command(data_dir, good, "train.epochs=1")).returncode == 0
    proc = run([sys.executable, "train.py", "--quiet", "--resume", str(good / "last.pt"),
                "--set", "train.epochs=2", "--set", f"out_dir={out}"])
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "is a file, not a folder")
    assert blocker.read_text() == "the user's notes"


def test_a_refused_run_leaves_no_folder_behind(tmp_path, data_dir):
    out = tmp_path / "new"
    proc = run(command(data_dir, out, f"data.path={tmp_path / 'missing.txt'}"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr  # found after the claim
    assert not out.exists()
