"""Every fault of issue 18, met from the outside as a user meets it: real processes (`python
train.py`, `python -m rnnlm ...`), real signals (SIGKILL, SIGINT, SIGSTOP), real files (a
real 2 MB tmpfs where the test may mount one). One test per fault; each asserts the exit
code, one `error:` line on stderr without a traceback, and that the files the user had
before are byte for byte what they were.

The unit-level tests of each fix live beside its module (tests/test_files.py,
tests/training/test_lock.py, tests/test_write_failures.py, tests/training/test_divergence.py,
tests/test_checkpoint_integrity.py, tests/training/test_init_from.py, ...); this module is
the user's view of all of them together, kept to a few seconds a fault: one shared run of
the tiny config on 600 tokens, which is also the uninterrupted run the SIGKILL test compares
against. scripts/fault_campaign.py repeats these faults many times for the figures in
docs/reliability.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from rnnlm import files
from tests.conftest import ROOT

EPOCHS = 60  # under a second of training after 2 s of start-up: room to kill it mid-run
QUICK = ["train.predict_every=0", "train.threads=1", "data.max_tokens=600",
         "train.checkpoint_every=1"]
SPEAK = "speak of him"  # a phrase in the first 600 tokens, for the changed-text test


def load_same_runs():
    """scripts/same_runs.py, the project's check that two runs computed the same thing."""
    spec = importlib.util.spec_from_file_location("same_runs", ROOT / "scripts" / "same_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- helpers


def sets(*items) -> list[str]:
    return [a for item in items for a in ("--set", str(item))]


def run(*args, timeout=120) -> subprocess.CompletedProcess:
    """A command as typed in a shell at the repository root: `python train.py ...` or
    `python -m rnnlm ...` (args start with the script or "-m")."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def run_together(*commands, timeout=120) -> list[subprocess.CompletedProcess]:
    """Independent commands (each a tuple of run's args) side by side: each process spends
    most of its second importing torch, so two at once save a second of the module's time."""
    procs = [subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for args in commands]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def train_command(text: Path, data_dir: Path, out: Path, *overrides) -> list[str]:
    return [sys.executable, "train.py", "--quiet", "--config", "configs/tiny.yaml",
            *sets(f"data.path={text}", f"data.data_dir={data_dir}", f"out_dir={out}",
                  f"train.epochs={EPOCHS}", *QUICK, *overrides)]


def refused(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one `error:` line of a command that was refused with exit `code`."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if files.TEMP_NAME.match(p.name)]


def epochs(folder: Path) -> list[int]:
    return [json.loads(line)["epoch"]
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def strict_json_lines(path: Path) -> list[dict]:
    """metrics.jsonl read as strict JSON: NaN and Infinity are not JSON."""
    def refuse(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{what}: {proc.communicate()[1]}")
        time.sleep(0.01)


def logged(folder: Path) -> int:
    try:
        return len((folder / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


# ---------------------------------------------------------------------------- the shared run


# One xdist worker runs this module, so its trained fixture is made once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("test_faults")


@pytest.fixture(scope="module")
def base(tmp_path_factory, time_machine_path):
    """A finished run of the tiny config on a text of the user's own (notes.txt: not the
    checksummed Time Machine, so it may be edited), checkpointing every epoch."""
    tmp = tmp_path_factory.mktemp("faults")
    text = tmp / "notes.txt"
    shutil.copyfile(time_machine_path, text)
    assert SPEAK in text.read_text()[:2000]
    out = tmp / "base"
    proc = subprocess.run(train_command(text, tmp / "data", out), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {"text": text, "data_dir": tmp / "data", "out": out}


@pytest.fixture
def earlier(base, tmp_path) -> Path:
    """A copy of the finished run: the user's earlier files, which a fault must not touch."""
    out = tmp_path / "earlier"
    shutil.copytree(base["out"], out)
    return out


# ---------------------------------------------------------------------------- the faults


def test_two_runs_into_one_out_dir_at_once(base, tmp_path):
    """Two shells, one out_dir, seeds 1 and 2: one run is refused at once naming the other's
    PID; a third try while the first is paused (even with --overwrite) changes nothing; the
    first, stopped with Ctrl-C, logged each of its epochs once."""
    out = tmp_path / "shared"
    cmds = [train_command(base["text"], base["data_dir"], out, "train.epochs=100000",
                          f"seed={seed}") for seed in (1, 2)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for cmd in cmds]
    try:
        deadline = time.monotonic() + 60
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.01)
        done = [p for p in procs if p.poll() is not None]
        assert len(done) == 1, "both runs were accepted into one out_dir"
        (loser,), (winner,) = done, [p for p in procs if p is not done[0]]
        _, stderr = loser.communicate()
        line = refused(subprocess.CompletedProcess(loser.args, loser.returncode, "", stderr))
        assert f"out_dir {out} is in use by another run (process {winner.pid})" in line

        wait_for(lambda: (out / "last.pt").exists() and logged(out) >= 2, winner,
                 "the first run did not get going")
        os.kill(winner.pid, signal.SIGSTOP)  # its files hold still while the third try runs
        try:
            before = snapshot(out)
            again = run(*cmds[1][1:], "--overwrite")
            assert f"(process {winner.pid})" in refused(again)
            assert snapshot(out) == before
        finally:
            os.kill(winner.pid, signal.SIGCONT)
        winner.send_signal(signal.SIGINT)
        _, stderr = winner.communicate(timeout=60)
        assert winner.returncode == 130, stderr
        assert "resume with: " in stderr and "Traceback" not in stderr
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    n = epochs(out)
    assert n == list(range(1, len(n) + 1))  # not 1,2,1,2,3,...: one run wrote this log
    assert not (out / files.LOCK_FILE).exists()


def test_divergence_exits_3_and_keeps_the_checkpoints(earlier):
    """An infinite learning rate is refused at load; one too large for the weights (with no
    clipping) diverges: exit 3, the last good checkpoints kept, metrics.jsonl strict JSON."""
    before = snapshot(earlier)
    inf = run("train.py", "--quiet", "--resume", earlier / "last.pt",
              *sets(f"train.epochs={EPOCHS + 2}", "train.lr=inf"))
    assert "train.lr must be a finite number, got inf" in refused(inf)
    assert snapshot(earlier) == before

    huge = run("train.py", "--quiet", "--resume", earlier / "last.pt",
               *sets(f"train.epochs={EPOCHS + 2}", "train.lr=1e38", "train.clip_norm=null"))
    line = refused(huge, code=3)
    assert line.startswith(f"error: training diverged in epoch {EPOCHS + 1} at batch ")
    assert "last finite loss" in line and "try a lower train.lr" in line
    after = snapshot(earlier)
    # config.yaml is rewritten at the start of every run (here: the diverged command's); all
    # the run's results stay as they were
    for name in ("last.pt", "best.pt", "metrics.jsonl", "perplexity.png"):
        assert after[name] == before[name], name
    assert len(strict_json_lines(earlier / "metrics.jsonl")) == EPOCHS
    assert temporaries(earlier) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 2 MB tmpfs (mounting needs root or CAP_SYS_ADMIN: skipped otherwise)."""
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run mount")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def fill(folder: Path, leave: int) -> Path:
    """Fill the file system of `folder` up to `leave` free bytes."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                stat = os.statvfs(folder)
                free = stat.f_bavail * stat.f_frsize
                if free <= leave:
                    break
                f.write(b"\0" * min(free - leave, 1 << 16))
                f.flush()
        except OSError:  # full before `leave`: as full as it gets
            pass
    return filler


def test_full_disk(base, small_tmpfs):
    """Resuming on a disk with room for the small files but not for a checkpoint: one line
    naming the file and the reason, exit 2, the checkpoints intact, no temporary left; with
    room again, the same command goes on."""
    out = small_tmpfs / "run"
    shutil.copytree(base["out"], out)
    before = snapshot(out)
    filler = fill(small_tmpfs, leave=16 * 1024)
    resume = ["train.py", "--quiet", "--resume", out / "last.pt",
              *sets(f"train.epochs={EPOCHS + 2}")]
    line = refused(run(*resume))
    assert re.fullmatch(r"error: could not write (checkpoint )?\S+: No space left on device; "
                        r"the previous file is unchanged", line), line
    after = snapshot(out)
    for name in ("last.pt", "best.pt", "perplexity.png"):
        assert after[name] == before[name], name
    assert strict_json_lines(out / "metrics.jsonl")
    assert temporaries(out) == []

    filler.unlink()
    proc = run(*resume)
    assert proc.returncode == 0, proc.stderr
    assert epochs(out) == list(range(1, EPOCHS + 3))


def test_changed_text_on_resume(base, earlier):
    """The training text edited in place (same characters, other words): --resume refuses it,
    saying what changed and what to do instead."""
    text = base["text"]
    original = text.read_bytes()
    before = snapshot(earlier)
    try:
        text.write_text(original.decode().replace(SPEAK, SPEAK[:-3] + "mih", 1))
        proc = run("train.py", "--quiet", "--resume", earlier / "last.pt",
                   *sets(f"train.epochs={EPOCHS + 1}"))
    finally:
        text.write_bytes(original)
    line = refused(proc)
    assert f"the training text changed since {earlier / 'last.pt'} was written: {text} now " \
           f"has sha1" in line
    assert f"--init-from {earlier / 'last.pt'}" in line
    assert snapshot(earlier) == before


@pytest.mark.parametrize("part", ["tensor", "pickle"])
def test_flipped_byte_in_a_checkpoint(earlier, part):
    """One flipped byte in a tensor's data or in the pickle: `rnnlm sample` refuses the file
    (it used to sample other text from tensor damage), saying which member is corrupt."""
    data = bytearray((earlier / "last.pt").read_bytes())
    with zipfile.ZipFile(earlier / "last.pt") as archive:
        infos = archive.infolist()
    member = next(i for i in infos if i.filename.endswith("data.pkl")) if part == "pickle" \
        else max((i for i in infos if "/data/" in i.filename), key=lambda i: i.file_size)
    # the member's bytes start after its 30-byte local header, file name and extra field
    name_len, extra_len = struct.unpack_from("<HH", data, member.header_offset + 26)
    start = member.header_offset + 30 + name_len + extra_len
    data[start + random.Random(part).randrange(member.file_size)] ^= 0x20
    damaged = earlier / "damaged.pt"
    damaged.write_bytes(data)
    before = snapshot(earlier)

    proc = run("-m", "rnnlm", "sample", "--checkpoint", damaged, "--num-chars", "20")
    assert refused(proc) == (f"error: {damaged} is corrupt: member {member.filename} fails its "
                             f"CRC-32 check (its bytes changed after it was written)")
    assert proc.stdout == ""
    assert snapshot(earlier) == before


def test_out_dir_that_is_a_file(base, tmp_path):
    """out_dir names a file of the user's: one line, and the file is left alone."""
    taken = tmp_path / "notes"
    taken.write_text("the user's notes\n")
    proc = run("train.py", "--quiet", "--config", "configs/tiny.yaml",
               *sets(f"data.path={base['text']}", f"data.data_dir={base['data_dir']}",
                     f"out_dir={taken}", *QUICK))
    assert refused(proc) == (f"error: out_dir {taken} is a file, not a folder: pick another "
                             f"out_dir (--set out_dir=...)")
    assert taken.read_text() == "the user's notes\n"


def test_sigkill_then_resume_gives_the_uninterrupted_run(base, tmp_path):
    """SIGKILL at a moment in the middle of training (perhaps mid-write), then --resume: the
    metrics (timings aside) and the weights of last.pt and best.pt are those of the run that
    was never interrupted, and nothing the killed writes left behind remains."""
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_command(base["text"], base["data_dir"], out), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged(out) >= 10, proc, "the run did not get going")
    time.sleep(random.Random(18).uniform(0, 0.2))
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert logged(out) < EPOCHS

    resumed = run("train.py", "--quiet", "--resume", out / "last.pt")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr == ""
    same, summary = load_same_runs().compare(base["out"], out)
    assert same, summary
    assert temporaries(out) == [] and not (out / files.LOCK_FILE).exists()


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    """A YAML syntax error: where it is, and nothing created."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"seed: 0\nout_dir: {tmp_path / 'run'}\ndata:\n  max_tokens: [1, 2\n"
                   "model: {kind: rnn}\n")
    before = bad.read_bytes()
    line = refused(run("-m", "rnnlm", "train", "--config", bad))
    assert line.startswith(f"error: config file {bad} is not valid YAML at line 5, column ")
    assert bad.read_bytes() == before and not (tmp_path / "run").exists()


def test_bad_set_value_is_blamed_on_set(earlier):
    """A bad value given with --set, even with --overwrite: the message blames --set (not
    the config file), and the run already in out_dir is left as it was."""
    before = snapshot(earlier)
    proc = run("train.py", "--config", "configs/tiny.yaml", "--overwrite",
               *sets(f"out_dir={earlier}", "train.lr=fast"))
    assert refused(proc) == "error: --set: train.lr must be a number, got 'fast'"
    assert snapshot(earlier) == before


def test_compare_rerun_and_bad_vary(base, tmp_path):
    """compare into a folder that holds an earlier comparison: refused with what to pass,
    the earlier tables untouched; a bad --vary value: refused before anything trains."""
    args = ["-m", "rnnlm", "compare", "--config", "configs/tiny.yaml",
            *sets(f"data.path={base['text']}", f"data.data_dir={base['data_dir']}",
                  "train.epochs=1", *QUICK)]
    out = tmp_path / "cmp"
    first = run(*args, "--vary", "seed=0", *sets(f"out_dir={out}"))
    assert first.returncode == 0, first.stderr
    before = snapshot(out)
    assert "comparison.md" in before

    bogus = tmp_path / "bogus"
    again, wrong = run_together((*args, "--vary", "seed=0", *sets(f"out_dir={out}")),
                                (*args, "--vary", "data.iterator=sequential,bogus",
                                 *sets(f"out_dir={bogus}")))
    line = refused(again)
    assert f"{out} holds an earlier comparison" in line
    assert "--resume" in line and "--overwrite" in line
    assert snapshot(out) == before
    assert "data.iterator must be one of sequential, random; got 'bogus'" in refused(wrong)
    assert not bogus.exists()


def test_diagnose_hint_is_a_command_that_works(earlier, tmp_path):
    """`diagnose --figure gradients` on a run without diagnostics: one line with a command to
    run first; after it, the same --figure command draws the figure."""
    figure = ["-m", "rnnlm", "diagnose", "--figure", "gradients", "--runs", earlier,
              "--out", tmp_path / "gradients.png"]
    before = snapshot(earlier)
    line = refused(run(*figure))
    hint = re.search(r"rnnlm diagnose (--checkpoint \S+)", line)
    assert hint, line
    assert snapshot(earlier) == before

    measured = run("-m", "rnnlm", "diagnose", *shlex.split(hint.group(1)))
    assert measured.returncode == 0, measured.stderr
    drawn = run(*figure)
    assert drawn.returncode == 0, drawn.stderr
    assert (tmp_path / "gradients.png").read_bytes()[:4] == b"\x89PNG"
    after = snapshot(earlier)
    assert {k: v for k, v in after.items() if not k.startswith("diagnose-")} == before
