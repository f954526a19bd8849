"""train.auto_resume: a new run that finds out_dir/last.pt continues from it instead.

This is what lets `torchrun --max-restarts=K` recover from a lost worker by itself: torchrun
starts the same command again in every process, each finds the last checkpoint of the run
and the job continues from there (under DDP every rank reads the same file, so out_dir must
be visible to every node). Without last.pt the run starts fresh.

The config of the command (YAML + --set) is the config of the continued run; what it
changes relative to the checkpoint goes through the same checks as `--resume ... --set`
(no other model, vocabulary or optimizer; no data-stream change inside an epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rnnlm.checkpoint import (
    CHECKPOINT_NAMES,
    check_resume_changes,
    checkpoint_config,
    load_checkpoint,
)
from rnnlm.config import Config, ConfigError
from rnnlm.config.schema import changed_keys


@dataclass
class AutoResume:
    """What an auto_resume run does: continue `checkpoint` (loaded from `path`), start
    fresh (`checkpoint` None; `overwrite` when the folder holds only an unfinished earlier
    attempt of this very run), or nothing at all when the run already finished (`done`)."""

    checkpoint: dict | None = None
    path: Path | None = None
    overwrite: bool = False
    done: bool = False


def plan(cfg: Config, overwrite: bool = False) -> AutoResume:
    if overwrite:
        # Under torchrun every restart would start over again and lose the progress.
        raise ConfigError("--overwrite starts the run over, but train.auto_resume: true "
                          "continues it from out_dir/last.pt: drop one of the two")
    out_dir = Path(cfg.out_dir)
    last = out_dir / "last.pt"
    if last.exists():
        ckpt = load_checkpoint(last)
        if ckpt["progress"]["epoch"] >= cfg.train.epochs and not ckpt["progress"].get("batch"):
            return AutoResume(ckpt, last, done=True)
        saved = checkpoint_config(ckpt, str(last))
        changed = [key for key, _, _ in changed_keys(saved, cfg) if key != "out_dir"]
        check_resume_changes(ckpt, saved, cfg, changed, last, how="train.auto_resume: ")
        return AutoResume(ckpt, last)
    # A worker lost before the first last.pt leaves at most best.pt behind. When it holds
    # exactly this config, it is that earlier attempt of this run, and starting over may
    # replace it; anything else stays protected by the usual out_dir rules.
    for name in CHECKPOINT_NAMES:
        path = out_dir / name
        if path.exists() and load_checkpoint(path)["config"] != cfg.to_dict():
            return AutoResume()
    return AutoResume(overwrite=True)
