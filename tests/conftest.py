"""Shared fixtures: the local Time Machine copy (tests never touch the network)."""

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
_NATIVE_CACHE = tempfile.TemporaryDirectory(prefix="rnnlm-native-")
os.environ["RNNLM_NATIVE_CACHE"] = _NATIVE_CACHE.name

CANDIDATES = [ROOT / "data" / "timemachine.txt",
              ROOT.parent / "shared" / "data" / "timemachine.txt"]


def time_machine_source() -> Path:
    for path in CANDIDATES:
        if path.is_file():
            return path
    raise RuntimeError("tests need the Time Machine text at data/timemachine.txt "
                       "(.ci/run copies it there)")


@pytest.fixture(scope="session")
def time_machine_path() -> Path:
    return time_machine_source()


@pytest.fixture
def data_dir(tmp_path, time_machine_path) -> Path:
    """A private data directory holding a copy of the Time Machine."""
    d = tmp_path / "data"
    d.mkdir()
    shutil.copy(time_machine_path, d / "timemachine.txt")
    return d


@pytest.fixture
def tiny_overrides(data_dir, tmp_path) -> list[str]:
    """--set overrides that point a config at the private data dir and a fresh out_dir."""
    return [f"data.data_dir={data_dir}", f"out_dir={tmp_path / 'run'}"]
