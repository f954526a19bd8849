"""rnnlm.files on its own: atomic writes and appends that fail as one line and leave the
previous file as it was, folders that cannot be made, and the out_dir lock."""

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from rnnlm import files
from rnnlm.errors import ConfigError
from rnnlm.files import (
    LOCK_FILE,
    WriteError,
    append_text,
    ensure_directory,
    lock_out_dir,
    remove_stale_temporaries,
    write_atomic,
)
from tests.conftest import ROOT

REASONS = {errno.ENOSPC: "No space left on device", errno.EIO: "Input/output error"}


def leftovers(folder):
    """Anything but the files a test made itself: temporaries of ours or of earlier code."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or
                  p.name.endswith((".tmp", ".part")))


def failing_write(code, after=0):
    """An os.write that writes `after` bytes in all, then fails with `code`, as a disk does
    when it fills up in the middle of a file."""
    budget = [after]

    def write(fd, data):
        if budget[0] <= 0:
            raise OSError(code, os.strerror(code))
        done = os.write(fd, bytes(data[: budget[0]]))
        budget[0] -= done
        return done

    return write


# ---------------------------------------------------------------------------- write_atomic


def test_write_atomic_writes_bytes_text_and_callbacks(tmp_path):
    write_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_atomic(tmp_path / "b.txt", "übung\n")
    write_atomic(tmp_path / "c.bin", lambda f: [f.write(b"x" * 700_000) for _ in range(3)])
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "übung\n"
    assert (tmp_path / "c.bin").read_bytes() == b"x" * 2_100_000
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert leftovers(tmp_path) == []


def test_torch_save_through_write_atomic_is_byte_identical(tmp_path):
    obj = {"w": torch.arange(300_000.0), "nested": [1, {"b": torch.ones(3)}]}
    with open(tmp_path / "plain.pt", "xb") as f:
        torch.save(obj, f)
    write_atomic(tmp_path / "ours.pt", lambda f: torch.save(obj, f))
    assert (tmp_path / "ours.pt").read_bytes() == (tmp_path / "plain.pt").read_bytes()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("after", [0, 5000])
def test_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, code, after):
    target = tmp_path / "last.pt"
    target.write_bytes(b"the previous checkpoint")
    monkeypatch.setattr(files, "_write", failing_write(code, after))
    with pytest.raises(WriteError) as info:
        write_atomic(target, b"y" * 20_000, what="checkpoint")
    assert str(info.value) == (f"could not write checkpoint {target}: {REASONS[code]}; "
                               f"the previous file is unchanged")
    assert isinstance(info.value, ConfigError)  # one line, exit 2 in every command
    assert target.read_bytes() == b"the previous checkpoint"
    assert leftovers(tmp_path) == []


def test_torch_save_on_a_full_disk_is_the_disks_error_not_torchs(tmp_path, monkeypatch):
    """torch.save turns a failed write into RuntimeError 'unexpected pos'; the sink keeps
    the OSError underneath, and that is what the user is told."""
    monkeypatch.setattr(files, "_write", failing_write(errno.ENOSPC, 100))
    with pytest.raises(WriteError, match="No space left on device; nothing was written"):
        write_atomic(tmp_path / "x.pt", lambda f: torch.save({"w": torch.zeros(10_000)}, f))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("call", ["_fsync", "_replace"])
def test_failures_after_the_data_are_reported_too(tmp_path, monkeypatch, call):
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")

    def fail(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(files, call, fail)
    with pytest.raises(WriteError, match=f"could not write {target}: Input/output error; the "
                                         f"previous file is unchanged"):
        write_atomic(target, "new\n")
    assert target.read_text() == "old\n" and leftovers(tmp_path) == []


def test_other_errors_of_the_callback_pass_through_and_clean_up(tmp_path):
    def broken(f):
        f.write(b"half")
        raise ValueError("not a disk problem")

    with pytest.raises(ValueError, match="not a disk problem"):
        write_atomic(tmp_path / "a", broken)

    def interrupted(f):
        f.write(b"x" * 3_000_000)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "a", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_take_files_is_one_line(tmp_path):
    with pytest.raises(WriteError, match="could not write .*No such file or directory; "
                                         "nothing was written"):
        write_atomic(tmp_path / "missing" / "a.txt", "x")


# ---------------------------------------------------------------------------- append_text


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failed_append_is_cut_off_again(tmp_path, monkeypatch, code):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 1}\n')
    append_text(log, '{"epoch": 2}\n')
    before = log.read_bytes()
    monkeypatch.setattr(files, "_write", failing_write(code, after=5))  # half a line lands
    with pytest.raises(WriteError, match=f"could not write {log}: {REASONS[code]}; the "
                                         f"previous file is unchanged"):
        append_text(log, '{"epoch": 3, "train_ppl": 9.5}\n')
    assert log.read_bytes() == before


def test_a_failed_append_to_a_new_file_leaves_no_file(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(files, "_fsync", fsync)
    with pytest.raises(WriteError, match="Input/output error; nothing was written"):
        append_text(tmp_path / "new.jsonl", "{}\n")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- folders


def test_ensure_directory(tmp_path):
    assert ensure_directory(tmp_path / "a" / "b") is True
    assert ensure_directory(tmp_path / "a" / "b") is False
    (tmp_path / "f").write_text("mine")
    with pytest.raises(WriteError, match=r"^out_dir .*f is a file, not a folder: pick another$"):
        ensure_directory(tmp_path / "f", "out_dir", "pick another")
    with pytest.raises(WriteError, match=r"cannot create out_dir .*f/sub: .*f is a file, not "
                                         r"a folder"):
        ensure_directory(tmp_path / "f" / "sub", "out_dir")
    assert (tmp_path / "f").read_text() == "mine"


# ---------------------------------------------------------------------------- the lock

needs_flock = pytest.mark.skipif(files.fcntl is None, reason="no fcntl.flock on this platform")

TRY_LOCK = """
import sys
from rnnlm.files import lock_out_dir
from rnnlm.errors import ConfigError
try:
    with lock_out_dir(sys.argv[1]):
        print("GOT IT")
except ConfigError as exc:
    print(f"error: {exc}")
"""


def try_lock(folder) -> str:
    return subprocess.run([sys.executable, "-c", TRY_LOCK, str(folder)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60).stdout.strip()


@needs_flock
def test_the_lock_refuses_another_process_and_names_the_holder(tmp_path):
    out = tmp_path / "run"
    with lock_out_dir(out, hint="pick another out_dir"):
        assert (out / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        answer = try_lock(out)
        assert answer == (f"error: out_dir {out} is in use by another run (process "
                          f"{os.getpid()}): wait for it to finish or stop it")
        with lock_out_dir(out):  # the same process again: the API's auto-resume, then the run
            pass
        assert (out / LOCK_FILE).exists()
        assert try_lock(out).startswith("error:")
    assert try_lock(out) == "GOT IT"
    assert not out.exists()  # made for the run, nothing was written into it: gone again


@needs_flock
def test_the_lock_file_goes_and_the_folder_stays_when_it_holds_files(tmp_path):
    out = tmp_path / "run"
    with lock_out_dir(out):
        (out / "metrics.jsonl").write_text("")
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]


HOLD_AND_DIE = """
import os, signal, sys, time
from rnnlm.files import lock_out_dir
with lock_out_dir(sys.argv[1]):
    child = os.fork() if sys.argv[2] == "fork" else 0
    if child == 0 and sys.argv[2] == "fork":
        quiet = os.open(os.devnull, os.O_RDWR)  # let the test's pipes close
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        time.sleep(120)  # a forked helper that outlives its parent
        os._exit(0)
    print(child, flush=True)
    if sys.argv[2] == "kill":
        time.sleep(120)
    os._exit(0)  # no clean-up: the lock file stays behind, as after SIGKILL
"""


@needs_flock
def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AND_DIE, str(out), "kill"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    assert try_lock(out).startswith(f"error: out_dir {out} is in use by another run "
                                    f"(process {proc.pid})")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (out / LOCK_FILE).exists()  # left behind by the killed run, but not locked
    assert try_lock(out) == "GOT IT"


@needs_flock
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", HOLD_AND_DIE, str(out), "fork"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    child = int(proc.stdout.split()[0])
    try:
        assert try_lock(out) == "GOT IT"  # the parent is gone; its sleeping child holds nothing
    finally:
        os.kill(child, signal.SIGKILL)


def test_stale_temporaries_are_ours_only(tmp_path):
    ours = [".last.pt.4242.0badf00d.tmp", ".best.pt.17.deadbeef.tmp", "metrics.jsonl.tmp",
            ".config.yaml.99.12345678.tmp", ".perplexity.ab_9xyz1.png",
            "diagnostics.json.tmp", "diagnostics.png.tmp"]
    theirs = ["notes.tmp", ".last.pt.tmp", ".hidden", "last.pt", ".perplexity.png",
              ".x.12.nothex!!.tmp"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


@needs_flock
def test_claiming_a_folder_removes_what_killed_writes_left(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.4242.0badf00d.tmp").write_bytes(b"\0" * 30_000)
    (out / "metrics.jsonl.tmp").write_text("")
    (out / "last.pt").write_bytes(b"kept")
    with lock_out_dir(out):
        pass
    assert [p.name for p in out.iterdir()] == ["last.pt"]


def test_without_fcntl_the_run_goes_on_unlocked(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "fcntl", None)
    out = tmp_path / "run"
    (tmp_path / "run").mkdir()
    (out / "metrics.jsonl.tmp").write_text("")
    with lock_out_dir(out):
        with lock_out_dir(out):
            pass
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl.tmp"]  # nothing to clean unlocked


def test_one_sink_write_reports_short_writes_completely(tmp_path, monkeypatch):
    """os.write may write less than asked (a signal, a huge buffer): the rest follows."""
    real = os.write
    monkeypatch.setattr(files, "_write", lambda fd, data: real(fd, bytes(data[:1000])))
    payload = bytes(range(256)) * 20_000
    write_atomic(tmp_path / "big", payload)
    assert (tmp_path / "big").read_bytes() == payload


def test_the_module_imports_nothing_of_rnnlm_but_errors():
    source = (ROOT / "rnnlm" / "files.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))
               and "rnnlm" in line]
    assert imports == ["from rnnlm.errors import ConfigError"], textwrap.shorten(
        str(imports), 200)
