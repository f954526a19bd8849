"""The `rnnlm` command: its subcommands and their help, a run, user errors, and the scripts
that run the same commands."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rnnlm import cli
from rnnlm.commands import COMMANDS, Invocation, command
from tests.conftest import ROOT

CONSOLE_SCRIPT = Path(sys.executable).parent / "rnnlm"  # `pip install -e .` puts it there


def rnnlm(*args, how=("-m",), cwd=ROOT):
    """`python -m rnnlm ARGS` (or the console script with how=()) as a user runs it."""
    cmd = [sys.executable, "-m", "rnnlm"] if how else [str(CONSOLE_SCRIPT)]
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def listed_commands(help_text: str) -> dict[str, str]:
    """The subcommands of `rnnlm --help` with their one-line summaries."""
    section = help_text.split("commands:", 1)[1]
    lines = [line.split(None, 1) for line in section.splitlines() if line.startswith("    ")]
    return {words[0]: words[1] for words in lines if len(words) == 2}


@pytest.mark.parametrize("how", [("-m",), ()], ids=["python -m rnnlm", "console script"])
def test_help_lists_the_six_commands(how):
    if not how and not CONSOLE_SCRIPT.is_file():
        pytest.skip('the rnnlm console script is not installed: pip install -e ".[test]"')
    proc = rnnlm("--help", how=how, cwd=Path(sys.executable).parent)  # not only from the repo
    assert proc.returncode == 0, proc.stderr
    listed = listed_commands(proc.stdout)
    assert list(listed) == list(COMMANDS) == ["train", "sample", "evaluate", "compare",
                                              "diagnose", "bench"]
    for name, summary in listed.items():
        assert summary == command(name).SUMMARY  # one line each
    prog = "python -m rnnlm" if how else "rnnlm"
    assert proc.stdout.startswith(f"usage: {prog} ")


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_its_help_without_torch(name):
    """--help answers before anything heavy is imported, and shows the script's options."""
    code = ("import sys\nfrom rnnlm.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as done:\n    assert done.code == 0, done.code\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    proc = subprocess.run([sys.executable, "-c", code, name, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: rnnlm {name} ")
    assert proc.stdout.rstrip().endswith("no torch")
    script = subprocess.run([sys.executable, f"{name}.py", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and script.stdout.startswith(f"usage: {name}.py ")

    def options(text):
        return text.split("options:", 1)[1]

    assert options(script.stdout) == options(proc.stdout.rsplit("\n", 2)[0] + "\n")


def test_train_runs_and_writes_its_files(tiny_overrides, tmp_path):
    flat = [a for o in [*tiny_overrides, "train.epochs=2", "data.max_tokens=600",
                        "train.threads=1"] for a in ("--set", o)]
    proc = rnnlm("train", "--config", "configs/tiny.yaml", *flat)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("perplexity ")
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert (tmp_path / "run" / "last.pt").is_file()
    # A second start refuses the finished run's folder: a user error, one line, exit 2.
    again = rnnlm("train", "--config", "configs/tiny.yaml", *flat)
    assert again.returncode == 2 and again.stderr.startswith("error: ")
    assert len(again.stderr.strip().splitlines()) == 1 and "already holds" in again.stderr


@pytest.mark.parametrize("args, fragment", [
    (["train", "--config", "configs/nope.yaml"],
     "error: config file configs/nope.yaml not found"),
    (["train", "--config", "configs/tiny.yaml", "--set", "train.epochs=-3"],
     "error: train.epochs must be"),
    (["sample", "--checkpoint", "nope.pt"], "error: checkpoint nope.pt not found"),
])
def test_user_errors_are_one_line_exit_2(args, fragment):
    proc = rnnlm(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(fragment), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_usage_errors_exit_2_with_the_command_usage():
    neither = rnnlm("train")
    assert neither.returncode == 2
    assert "usage: python -m rnnlm train" in neither.stderr
    assert "give --config FILE for a new run or --resume CHECKPOINT" in neither.stderr
    nothing = rnnlm()
    assert nothing.returncode == 2 and "COMMAND" in nothing.stderr
    unknown = rnnlm("fly")
    assert unknown.returncode == 2 and "invalid choice: 'fly'" in unknown.stderr


def test_commands_name_themselves_as_the_user_called_them():
    """The hints a command prints (e.g. `resume with: ...`) use the form the user typed."""
    assert Invocation.script("train").prog == "python train.py"
    assert Invocation.console("rnnlm", "train").prog == "rnnlm train"
    bench = Invocation.script("bench", ["--epochs", "5"])
    assert bench.line == "python bench.py --epochs 5"
    assert Invocation.script("bench").line == "python bench.py"
    parser = cli.build_parser("rnnlm")
    sub = parser.parse_args(["sample", "--checkpoint", "x.pt"])._parser
    assert sub.prog == "rnnlm sample" and "written by rnnlm train" in sub.description
