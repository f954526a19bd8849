"""train.py as torchrun's entry point, with two probes for tests/training/test_ddp_resume.py.

RNNLM_PROBE_SAVES=FILE   every checkpoint write appends "RANK NAME EPOCH BATCH" to FILE, and
                         each rank's exit "RANK exit CODE".
RNNLM_PROBE_PAUSE=STEP   rank 0 prints PAUSED to stderr at its STEP-th training step and waits
                         there (at most 60 s) until a SIGINT or SIGTERM has reached it, so a
                         test can press Ctrl-C at a known step.
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import rnnlm.training.epoch as epoch  # noqa: E402
import rnnlm.training.run as trainer  # noqa: E402

RANK = os.environ.get("RANK", "0")


def log_saves(log: str) -> None:
    real_save = trainer.atomic_save

    def logged_save(ckpt, path):
        progress = ckpt["progress"]
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{RANK} {Path(path).name} {progress['epoch']} {progress['batch']}\n")
        real_save(ckpt, path)

    trainer.atomic_save = logged_save


def pause_at(step: int) -> None:
    real_clip = epoch.clip_gradients
    steps = [0]

    def pausing_clip(*args, **kwargs):
        steps[0] += 1
        if steps[0] == step:
            arrived = []
            handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

            def note(signum, frame):
                arrived.append(signum)
                handlers[signum](signum, frame)  # the trainer's own handler

            for sig in handlers:
                signal.signal(sig, note)
            print("PAUSED", file=sys.stderr, flush=True)
            deadline = time.monotonic() + 60
            while not arrived and time.monotonic() < deadline:
                time.sleep(0.01)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return real_clip(*args, **kwargs)

    epoch.clip_gradients = pausing_clip


if os.environ.get("RNNLM_PROBE_SAVES"):
    log_saves(os.environ["RNNLM_PROBE_SAVES"])
if os.environ.get("RNNLM_PROBE_PAUSE") and RANK == "0":
    pause_at(int(os.environ["RNNLM_PROBE_PAUSE"]))


def log_exit(code) -> None:
    if os.environ.get("RNNLM_PROBE_SAVES"):
        with open(os.environ["RNNLM_PROBE_SAVES"], "a", encoding="utf-8") as f:
            f.write(f"{RANK} exit {code}\n")


real_os_exit = os._exit


def logged_os_exit(code):  # how train.py's workers leave (rnnlm.cli.leave)
    log_exit(code)
    real_os_exit(code)


os._exit = logged_os_exit
sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
try:
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
except SystemExit as done:
    log_exit(done.code)
    raise
