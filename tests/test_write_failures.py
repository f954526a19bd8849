"""Every file rnnlm writes, failing as a full or broken disk fails: one line naming the file
and the reason, exit 2, the previous file byte for byte as it was, no temporary file left.

The failures are injected into the real commands: each runs in a child process
(`python -c INJECTOR ...`) that makes rnnlm.files' own system calls (write, fsync, rename)
fail with ENOSPC or EIO for one file, and then runs `rnnlm.cli.main` as the `rnnlm` command
does. A real full disk (a 2 MB tmpfs) is tests/test_faults.py's.
"""

import errno
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rnnlm import files
from rnnlm.checkpoint import load_checkpoint
from rnnlm.data.corpus import ensure_time_machine
from rnnlm.files import WriteError
from tests.conftest import ROOT, copy_of_time_machine

pytestmark = [pytest.mark.skipif(not Path("/proc/self/fd").is_dir(),
                                 reason="the injector finds a file's name through /proc"),
              # one xdist worker runs this module: its trained fixture is made once
              # (tests/conftest.py)
              pytest.mark.xdist_group("test_write_failures")]

REASONS = {"ENOSPC": "No space left on device", "EIO": "Input/output error"}

# argv: PATTERN STAGE ERRNO COMMAND... -- the system call STAGE (write, fsync, replace) fails
# with ERRNO for files whose name matches PATTERN (fnmatch), a write after half its bytes.
INJECTOR = r"""
import errno, fnmatch, os, re, sys
pattern, stage, code = sys.argv[1:4]
err = getattr(errno, code)
TEMP = re.compile(r"^\.(.+)\.\d+\.[0-9a-f]{8}\.tmp$")  # write_atomic's temporary names


def hit(name):
    match = TEMP.match(name)
    return fnmatch.fnmatch(match.group(1) if match else name, pattern)


def hit_fd(fd):
    try:
        return hit(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
    except OSError:
        return False


def fail():
    raise OSError(err, os.strerror(err))


try:
    import rnnlm.files as files
except ImportError:  # code from before rnnlm.files: nothing to inject into
    files = None
if files is not None:
    real_write, real_fsync, real_replace = files._write, files._fsync, files._replace

    def write(fd, data):
        if stage == "write" and hit_fd(fd):
            if len(data) > 1:
                real_write(fd, bytes(data[: len(data) // 2]))  # half of it reaches the disk
            fail()
        return real_write(fd, data)

    def fsync(fd):
        if stage == "fsync" and hit_fd(fd):
            fail()
        return real_fsync(fd)

    def replace(src, dst):
        if stage == "replace" and hit(os.path.basename(dst)):
            fail()
        return real_replace(src, dst)

    files._write, files._fsync, files._replace = write, fsync, replace
from rnnlm.cli import main
main(sys.argv[4:], prog="rnnlm")
"""

BASE = ["train.epochs=2", "train.checkpoint_every=1", "train.diagnostics=true",
        "train.threads=1", "data.max_tokens=600"]


def rnnlm(*args, fail=None, timeout=180):
    """`rnnlm ARGS` in a child process; `fail` = (pattern, stage, errno name) to inject."""
    pattern, stage, code = fail or ("-", "none", "EIO")
    return subprocess.run([sys.executable, "-c", INJECTOR, pattern, stage, code, *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def sets(*items):
    return [a for item in items for a in ("--set", item)]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    """What a write may leave behind: hidden names (ours, the lock file) and .tmp/.part."""
    return [str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.name.startswith(".") or p.name.endswith((".tmp", ".part"))]


def one_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-epoch run with checkpoints, metrics, plots and diagnostics."""
    root = tmp_path_factory.mktemp("trained")
    copy_of_time_machine(root)
    proc = rnnlm("train", "--quiet", "--config", "configs/tiny.yaml",
                 *sets(f"data.data_dir={root / 'data'}", f"out_dir={root / 'run'}", *BASE))
    assert proc.returncode == 0, proc.stderr
    return root / "run"


@pytest.fixture
def run_copy(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# ---------------------------------------------------------------------------- training


# Every writer of a run once, each stage and error at least once (tests/test_files.py tries
# every stage x error on the writing functions themselves).
@pytest.mark.parametrize("name, stage, code", [
    ("last.pt", "write", "ENOSPC"),
    ("best.pt", "replace", "EIO"),
    ("metrics.jsonl", "fsync", "EIO"),
    ("config.yaml", "write", "ENOSPC"),
    ("perplexity.png", "write", "ENOSPC"),
    ("diagnostics.png", "fsync", "EIO"),
])
def test_a_failed_write_while_training_is_one_line_and_keeps_the_file(run_copy, name, stage,
                                                                        code):
    before = snapshot(run_copy)
    proc = rnnlm("train", "--quiet", "--resume", run_copy / "last.pt", "--set",
                 "train.epochs=4", fail=(name, stage, code))
    what = "checkpoint " if name.endswith(".pt") else ""
    assert one_line(proc) == (f"error: could not write {what}{run_copy / name}: "
                              f"{REASONS[code]}; the previous file is unchanged")
    assert (run_copy / name).read_bytes() == before[Path(name)]
    assert temporaries(run_copy) == []
    for checkpoint in ("last.pt", "best.pt"):
        load_checkpoint(run_copy / checkpoint)
    if name == "metrics.jsonl":  # the next run, on a disk with room again, goes on cleanly
        again = rnnlm("train", "--quiet", "--resume", run_copy / "last.pt", "--set",
                      "train.epochs=4")
        assert again.returncode == 0, again.stderr
        records = [json.loads(x) for x in (run_copy / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1, 2, 3, 4]


def test_a_failed_rewrite_of_the_metrics_log_on_resume_keeps_it(run_copy):
    """A run killed after logging epoch 3 but before saving it: the resumed run rewrites the
    log without that record, and that rewrite fails (the issue's full disk on resume)."""
    log = run_copy / "metrics.jsonl"
    last = json.loads(log.read_text().splitlines()[-1])
    with open(log, "a") as f:
        f.write(json.dumps({**last, "epoch": 3}) + "\n")
    before = log.read_bytes()
    proc = rnnlm("train", "--quiet", "--resume", run_copy / "last.pt", "--set",
                 "train.epochs=4", fail=("metrics.jsonl", "write", "ENOSPC"))
    assert one_line(proc) == (f"error: could not write {log}: No space left on device; the "
                              f"previous file is unchanged")
    assert log.read_bytes() == before
    assert temporaries(run_copy) == []  # no 0-byte metrics.jsonl.tmp


def test_a_failed_write_of_a_new_run_leaves_nothing_half_written(tmp_path, data_dir):
    out = tmp_path / "run"
    proc = rnnlm("train", "--quiet", "--config", "configs/tiny.yaml",
                 *sets(f"data.data_dir={data_dir}", f"out_dir={out}", *BASE),
                 fail=("best.pt", "write", "ENOSPC"))
    assert one_line(proc) == (f"error: could not write checkpoint {out / 'best.pt'}: No space "
                              f"left on device; nothing was written")
    assert not (out / "best.pt").exists() and temporaries(out) == []


def test_diagnose_keeps_its_previous_files(run_copy):
    out = run_copy / "diagnose-last"
    assert rnnlm("diagnose", "--checkpoint", run_copy / "last.pt").returncode == 0
    before = snapshot(out)
    proc = rnnlm("diagnose", "--checkpoint", run_copy / "last.pt",
                 fail=("diagnostics.json", "write", "EIO"))
    assert one_line(proc) == (f"error: could not write {out / 'diagnostics.json'}: "
                              f"Input/output error; the previous file is unchanged")
    assert snapshot(out) == before and temporaries(out) == []


# ---------------------------------------------------------------------------- data


@pytest.mark.parametrize("pattern, stage", [("*.ids", "write"), ("*.json", "fsync")])
def test_a_failed_token_cache_write_is_one_line(tmp_path, data_dir, pattern, stage):
    proc = rnnlm("train", "--quiet", "--config", "configs/tiny.yaml",
                 *sets(f"data.data_dir={data_dir}", f"out_dir={tmp_path / 'run'}", *BASE),
                 fail=(pattern, stage, "ENOSPC"))
    line = one_line(proc)
    assert line.startswith(f"error: cannot write the token cache {data_dir / 'cache'}/")
    assert line.endswith("(No space left on device): set data.cache: false, or a writable "
                         "data.data_dir")
    assert temporaries(data_dir) == []
    assert not list((data_dir / "cache").glob("*.json"))  # no entry that looks complete
    assert not (tmp_path / "run").exists()  # the run had written nothing yet


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failed_download_write_is_the_disks_error(tmp_path, time_machine_path, monkeypatch,
                                                    code):
    handler = type("H", (_Handler,), {"body": time_machine_path.read_bytes()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    real = files._write

    def write(fd, data):
        real(fd, bytes(data[:100]))
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files, "_write", write)
    target = tmp_path / "dl" / "timemachine.txt"
    try:
        with pytest.raises(WriteError) as info:
            ensure_time_machine(tmp_path / "dl", url=f"http://127.0.0.1:"
                                f"{server.server_address[1]}/timemachine.txt")
    finally:
        server.shutdown()
    assert str(info.value) == f"could not write {target}: {os.strerror(code)}; nothing was " \
                              f"written"
    assert list((tmp_path / "dl").iterdir()) == []


# ---------------------------------------------------------------------------- the tools


def test_compare_that_cannot_write_its_table_is_one_line(tmp_path, data_dir):
    out = tmp_path / "cmp"
    proc = rnnlm("compare", "--config", "configs/tiny.yaml", "--vary",
                 "data.iterator=sequential",
                 *sets(f"data.data_dir={data_dir}", f"out_dir={out}", "train.epochs=1",
                       "data.max_tokens=600", "train.threads=1"),
                 fail=("comparison.png", "write", "ENOSPC"))
    assert one_line(proc) == (f"error: could not write {out / 'comparison.png'}: No space left "
                              f"on device; nothing was written")
    assert (out / "iterator-sequential" / "seed0" / "last.pt").is_file()  # the runs are kept
    assert temporaries(out) == []


@pytest.mark.parametrize("name", ["comparison.md", "comparison.csv", "comparison.png"])
def test_compare_keeps_its_previous_table(tmp_path, monkeypatch, name):
    import rnnlm.tools.compare as cmp

    out = tmp_path / "cmp"
    variants = cmp.make_variants(["data.iterator=sequential,random"])
    results = [cmp.RunResult(v.name, 0, out / v.name, records=[
        {"epoch": 1, "train_ppl": 9.0 + i}, {"epoch": 2, "train_ppl": 8.0 + i}],
        metrics={"final_train_ppl": 8.0 + i}) for i, v in enumerate(variants)]
    cmp.write_outputs(out, variants, results, "configs/tiny.yaml", "rnnlm compare ...")
    before = snapshot(out)

    def write(fd, data):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    monkeypatch.setattr(files, "_write", write)
    with pytest.raises(WriteError, match=f"could not write {out / name}: No space left on "
                                         f"device; the previous file is unchanged"):
        cmp.write_outputs(out, variants, results[:1], "configs/tiny.yaml", "rnnlm compare 2")
    assert snapshot(out)[Path(name)] == before[Path(name)]
    assert temporaries(out) == []


def test_bench_write_keeps_the_page(tmp_path, monkeypatch):
    from rnnlm.tools.bench import write_section

    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nprose the user wrote\n")
    write_section(page, "cpu", "| a | b |")
    before = page.read_bytes()
    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(files, "_fsync", fsync)
    with pytest.raises(WriteError, match=f"could not write {page}: Input/output error; the "
                                         f"previous file is unchanged"):
        write_section(page, "cpu", "| c | d |")
    assert page.read_bytes() == before and temporaries(tmp_path) == []
