"""Damaged checkpoints: every flipped byte, cut or appended tail is refused before use, with
what is wrong, through load_checkpoint, `rnnlm sample` and `train.py --resume`."""

import fractions
import io
import os
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

import rnnlm.checkpoint as checkpoint
from rnnlm import cli
from rnnlm.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from rnnlm.config import load_config
from rnnlm.training.run import train
from tests.conftest import ROOT

# One xdist worker runs this module, so its trained fixture is made once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("test_checkpoint_integrity")


@pytest.fixture(scope="module")
def good(tmp_path_factory, time_machine_path):
    """The bytes of a finished 2-epoch tiny run's last.pt (Adam, so it has optimizer state)."""
    tmp = tmp_path_factory.mktemp("integrity")
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [f"data.path={time_machine_path}", f"data.data_dir={tmp / 'data'}",
                       f"out_dir={tmp / 'run'}", "train.optimizer=adam", "train.lr=0.01",
                       "train.threads=1", "data.max_tokens=600", "train.predict_every=0"])
    train(cfg, quiet=True)
    return (tmp / "run" / "last.pt").read_bytes()


def members(data: bytes) -> dict[str, tuple[int, int]]:
    """Each zip member's (offset, size) of its stored bytes in the file."""
    spans = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
            spans[info.filename] = (info.header_offset + 30 + name_len + extra_len,
                                    info.file_size)
    return spans


def central_directory(data: bytes) -> int:
    """The offset of the zip's central directory (from the end record)."""
    end = data.rindex(b"PK\x05\x06")
    return struct.unpack_from("<I", data, end + 16)[0]


def flipped(data: bytes, offset: int) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= 0x20
    return bytes(damaged)


def tensor_member(data: bytes) -> str:
    """The member holding the largest tensor storage (the model's or the optimizer's)."""
    spans = members(data)
    return max((name for name in spans if "/data/" in name), key=lambda name: spans[name][1])


def damaged_files(good: bytes, folder) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the fragment its refusal must hold)."""
    spans = members(good)
    pickle_at, pickle_size = spans["archive/data.pkl"]
    tensor = tensor_member(good)
    tensor_at, tensor_size = spans[tensor]
    directory = central_directory(good)
    cases = {
        # the pickle part: today misreported as "holds pickled Python objects"
        "pickle.pt": (flipped(good, pickle_at + pickle_size // 2),
                      "corrupt: member archive/data.pkl fails its CRC-32 check"),
        "pickle_start.pt": (flipped(good, pickle_at + 3),
                            "corrupt: member archive/data.pkl fails its CRC-32 check"),
        # tensor data: today it loads, and samples other text, with exit 0
        "tensor.pt": (flipped(good, tensor_at + tensor_size // 2),
                      f"corrupt: member {tensor} fails its CRC-32 check"),
        "tensor_end.pt": (flipped(good, tensor_at + tensor_size - 1),
                          f"corrupt: member {tensor} fails its CRC-32 check"),
        # the zip directory: a member's name, and its time stamp (which no CRC covers)
        "directory_name.pt": (flipped(good, directory + 46 + 3), "zip structure is damaged"),
        "directory_time.pt": (flipped(good, directory + 12), "do not match the sha256 sealed"),
        # a member's own header: its time stamp, and the padding torch puts before the data
        "header_time.pt": (flipped(good, 10), "do not match the sha256 sealed"),
        "header_padding.pt": (flipped(good, pickle_at - 1), "do not match the sha256 sealed"),
        # the seal itself
        "seal.pt": (flipped(good, len(good) - 5), "do not match the sha256 sealed"),
        "half.pt": (good[: len(good) // 2], "cut short (truncated)"),
        "no_tail.pt": (good[:-10], "cut short (truncated)"),
        "appended.pt": (good + b"garbage", "7 bytes follow the end of its zip archive"),
        "text.pt": (b"not a checkpoint at all\n", "no file written by torch.save"),
        "empty.pt": (b"", "it is empty"),
    }
    buffer = io.BytesIO()
    torch.save({"format": checkpoint.FORMAT, "x": fractions.Fraction(1, 2)}, buffer)
    cases["pickled.pt"] = (buffer.getvalue(), "holds pickled Python objects")
    for name, (data, _) in cases.items():
        (folder / name).write_bytes(data)
    return cases


def test_the_seal_is_there_and_the_good_file_loads(good, tmp_path):
    assert good[-checkpoint._SEAL_SIZE:].startswith(checkpoint.SEAL_PREFIX)
    (tmp_path / "last.pt").write_bytes(good)
    assert load_checkpoint(tmp_path / "last.pt")["progress"]["epoch"] == 2
    assert torch.load(io.BytesIO(good), weights_only=True)["progress"]["epoch"] == 2  # torch too


def test_every_damage_is_refused_with_its_reason(good, tmp_path):
    for name, (_, fragment) in damaged_files(good, tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / name)
        message = str(info.value)
        assert "\n" not in message and name in message, message
        assert fragment in message, (name, message)
        if name != "pickled.pt":
            assert "pickled Python objects" not in message, message


def test_a_flipped_byte_anywhere_is_refused(good, tmp_path):
    """Every 7th offset of the file, headers, padding, directory and seal included."""
    accepted = []
    for offset in range(0, len(good), 7):
        # a new file each time: rewriting one file in place costs ext4 a flush per write
        # (auto_da_alloc), 4/5 of this test's time
        path = _write(tmp_path / f"flipped-{offset}.pt", flipped(good, offset))
        try:
            load_checkpoint(path)
            accepted.append(offset)
        except CheckpointError:
            pass
        path.unlink()
    assert accepted == []


class RunsCode:
    """A pickle payload that would run `call(*args)` when unpickled."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def test_pickles_that_would_run_code_are_still_refused(good, tmp_path):
    """Intact archives (valid CRCs, sealed or not) whose pickle needs more than plain data:
    refused as pickled objects, and nothing runs."""
    marker = tmp_path / "ran"
    payloads = {"system": RunsCode(os.system, f"touch {marker}"),
                "eval": RunsCode(eval, f"open({str(marker)!r}, 'w')")}
    ckpt = load_checkpoint(_write(tmp_path / "good.pt", good))
    for name, payload in payloads.items():
        for sealed in (True, False):
            path = tmp_path / f"{name}_{sealed}.pt"
            hostile = {**ckpt, "record": payload}
            if sealed:
                checkpoint.atomic_save(hostile, path)
            else:
                torch.save(hostile, path)
            with pytest.raises(CheckpointError, match="holds pickled Python objects"):
                load_checkpoint(path)
    assert not marker.exists()


def test_checkpoints_from_before_the_seal_still_load(good, tmp_path):
    """A file written by torch.save itself (as every checkpoint was before the seal) is
    checked by its CRCs alone: it loads, and a flipped tensor byte is still refused."""
    ckpt = load_checkpoint(_write(tmp_path / "sealed.pt", good))
    plain = tmp_path / "plain.pt"
    torch.save(ckpt, plain)
    data = plain.read_bytes()
    assert data.endswith(b"\0\0")  # no zip comment: no seal
    assert torch.equal(load_checkpoint(plain)["model"]["output.weight"],
                       ckpt["model"]["output.weight"])
    tensor_at, tensor_size = members(data)[tensor_member(data)]
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        load_checkpoint(_write(tmp_path / "plain_flipped.pt",
                               flipped(data, tensor_at + tensor_size // 2)))


def test_weights_that_do_not_fit_the_config_name_the_parameter(good, tmp_path):
    ckpt = load_checkpoint(_write(tmp_path / "last.pt", good))
    ckpt["config"]["model"]["hidden_size"] = 32  # the weights are 16 wide
    with pytest.raises(CheckpointError) as info:
        model_from_checkpoint(ckpt, torch.device("cpu"), "wide.pt")
    message = str(info.value)
    assert "wide.pt: the saved weights do not fit the model its config describes: " in message
    assert "has shape (28, 16) in the checkpoint, (28, 32) in the model" in message or \
        "has shape (16, 28) in the checkpoint, (32, 28) in the model" in message, message
    ckpt["config"]["model"]["hidden_size"] = 16
    ckpt["model"].pop(next(iter(ckpt["model"])))
    with pytest.raises(CheckpointError, match="the checkpoint has no "):
        model_from_checkpoint(ckpt, torch.device("cpu"), "cut.pt")


def run_in_process(command, capsys) -> tuple[int, str]:
    """A command run as the user runs it, in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as done:
        command()
    return done.value.code, capsys.readouterr().err


def test_refused_through_the_commands(good, tmp_path, capsys):
    """`rnnlm sample --checkpoint` and `train.py --resume`: one line, exit 2, nothing run."""
    train_script = cli.script_main("train")
    for name, (_, fragment) in damaged_files(good, tmp_path).items():
        path = str(tmp_path / name)
        for command in (lambda p=path: cli.main(["sample", "--checkpoint", p]),
                        lambda p=path: cli.run_main(lambda: train_script(["--resume", p]))):
            code, err = run_in_process(command, capsys)
            assert code == 2, (name, err)
            assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
            assert fragment in err, (name, err)
    # And as real processes: exit 2, one line, no traceback, nothing sampled.
    damaged = str(tmp_path / "tensor.pt")
    for cmd in ([sys.executable, "-m", "rnnlm", "sample", "--checkpoint", damaged],
                [sys.executable, "train.py", "--resume", damaged]):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "fails its CRC-32 check" in proc.stderr
        assert proc.stdout == ""


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
