"""Shared fixtures: the local Time Machine copy (tests never touch the network), and the
set-up of each pytest-xdist worker (README: `python -m pytest -n auto`).

Under xdist, `--dist loadgroup` (pyproject.toml) sends tests one by one to the workers, except
those marked `pytest.mark.xdist_group(name)`, which one worker runs together: a module whose
module-scoped fixture trains something marks itself with its own name (the fixture then runs
once, not once per worker), and every test that starts torchrun is in the group "torchrun",
so no two torchrun jobs (2 processes each, their rendezvous ports) run at once."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Build rnnlm/kernels/cells.c into a folder of this test session, not the user's cache. Set
# here, before any test module is imported (test_native's skip mark builds it then);
# subprocesses inherit the variable; the folder goes when the session's interpreter exits.
# Each xdist worker imports this file and builds its own copy (well under a second).
_NATIVE_CACHE = tempfile.TemporaryDirectory(prefix="rnnlm-native-")
os.environ["RNNLM_NATIVE_CACHE"] = _NATIVE_CACHE.name

CANDIDATES = [ROOT / "data" / "timemachine.txt",
              ROOT.parent / "shared" / "data" / "timemachine.txt"]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pytest_configure(config):
    """In an xdist worker: the worker's share of the cores as torch's intra-op threads (two
    workers on two cores each train on one thread, not two each: the tiny models gain nothing
    from a second thread and lose much to a busy core). Tests that check thread counts set
    their own; subprocesses keep torch's default, as a user's commands do."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        import torch

        torch.set_num_threads(max(1, usable_cores() // workers))


def pytest_unconfigure(config):
    # an xdist worker may leave without running the interpreter's exit hooks
    _NATIVE_CACHE.cleanup()


def time_machine_source() -> Path:
    for path in CANDIDATES:
        if path.is_file():
            return path
    raise RuntimeError("tests need the Time Machine text at data/timemachine.txt "
                       "(.ci/run copies it there)")


@pytest.fixture(scope="session")
def time_machine_path() -> Path:
    return time_machine_source()


def copy_of_time_machine(parent: Path) -> Path:
    """parent/data, a new data directory holding a copy of the Time Machine: what a test's
    runs read and cache their tokens in, apart from every other test's."""
    d = parent / "data"
    d.mkdir()
    shutil.copy(time_machine_source(), d / "timemachine.txt")
    return d


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A private data directory holding a copy of the Time Machine."""
    return copy_of_time_machine(tmp_path)


@pytest.fixture
def tiny_overrides(data_dir, tmp_path) -> list[str]:
    """--set overrides that point a config at the private data dir and a fresh out_dir."""
    return [f"data.data_dir={data_dir}", f"out_dir={tmp_path / 'run'}"]


def spy_on_c_loops(monkeypatch, cells) -> list[str]:
    """Record every call of the C window loops of `cells` ("rnn", "gru", "lstm"; forward and
    backward, by entry-point name) and of the BLAS-backed library the whole-window loops
    load ("window"), each still running; returns the list the names are appended to."""
    from rnnlm.kernels import native

    calls: list[str] = []
    for cell in cells:
        for way in ("forward", "backward"):
            name = f"{cell}_{way}_loop"
            original = getattr(native, name)
            monkeypatch.setattr(native, name,
                                lambda *a, _f=original, _n=name, **k:
                                calls.append(_n) or _f(*a, **k))
    window_library = native.window_library
    monkeypatch.setattr(native, "window_library",
                        lambda: calls.append("window") or window_library())
    return calls
