"""Graceful stops: Ctrl-C (SIGINT) or SIGTERM during training save the run, then exit.

The first signal only raises a flag; the training loop looks at it after every batch, so the
batch in flight finishes, `last.pt` is written at that exact position and the process exits
with 128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second signal quits at once
by raising SystemExit wherever the program is: a checkpoint write in progress is abandoned
and its temporary file removed, and the previous checkpoint stays intact because writes are
atomic (see checkpoint.py).

Under torchrun the launcher forwards the user's Ctrl-C to every worker, and a worker may
receive it twice within a fraction of a second; `repeat_window_s` makes such a repeat of the
same signal count as the first one rather than as a second Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Truthy once a stop was asked for; `signum` says by which signal."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        # No signal here but a stop anyway: another rank of a DDP job was asked to stop.
        return signal.Signals(self.signum).name if self.signum else "stop on another rank"

    @property
    def exit_code(self) -> int:
        # The shell's convention for "killed by signal N"; a rank stopped by its peers
        # reports termination.
        return 128 + (self.signum or signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on request after writing `checkpoint`; the entry point exits with
    `exit_code` after telling the user how to resume."""

    def __init__(self, request: StopRequest, checkpoint, epoch: int, batch: int):
        super().__init__(f"interrupted by {request.signal_name}")
        self.signal_name, self.exit_code = request.signal_name, request.exit_code
        self.checkpoint, self.epoch, self.batch = checkpoint, epoch, batch


def _note(text: str) -> None:
    # os.write, not print: a handler may run while the main code is inside a print.
    try:
        os.write(2, text.encode())
    except OSError:
        pass


@contextmanager
def stop_on_signals(request: StopRequest, repeat_window_s: float = 0.0,
                    ) -> Iterator[StopRequest]:
    """Install SIGINT/SIGTERM handlers that set `request` (first signal) or quit (second);
    the same signal again within `repeat_window_s` seconds of the first is a repeat of it
    and ignored. The previous handlers come back on exit. Outside the main thread Python
    cannot install handlers, so the request then only changes if someone sets it."""
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    first_at = [0.0]

    def handle(signum, frame):
        if request.signum == signum and time.monotonic() - first_at[0] < repeat_window_s:
            return  # the same Ctrl-C delivered twice (torchrun forwarding), not a second one
        if request.signum is None:
            request.signum, first_at[0] = signum, time.monotonic()
            _note(f"\n{signal.Signals(signum).name} received: finishing the current batch, "
                  f"then saving last.pt (Ctrl-C again quits at once)\n")
        else:
            _note(f"\n{signal.Signals(signum).name} again: quitting at once; the last "
                  f"checkpoint on disk is intact\n")
            raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
