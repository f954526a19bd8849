"""A fault campaign: the faults of docs/reliability.md tried many times, at random moments and
places, counting how often rnnlm kept its promise (nothing lost, one line, the right exit code).

    python scripts/fault_campaign.py                      # the defaults: a few minutes on 2 cores
    python scripts/fault_campaign.py --kills 40 --flips 5000 --seed 7
    python scripts/fault_campaign.py --only flips,cuts    # some parts only

Every part runs the real commands (`python train.py`, `python -m rnnlm ...`) as separate
processes on a tiny run (configs/tiny.yaml on 600 tokens of a copy of data/timemachine.txt,
a checkpoint every epoch), except the byte flips and cuts, which call the `rnnlm sample`
command's own entry point (rnnlm.cli.main) in this process, thousands of times, with its exit
code and stderr captured; --flip-processes of them run again as real processes, which must
agree.

    kills       SIGKILL at a uniformly random moment of the run (start-up included), then
                `--resume` (or the same command again when no last.pt was written yet): the
                final metrics (timings aside) and the weights of last.pt and best.pt must be
                the uninterrupted run's (scripts/same_runs.py), with no temporary file or
                lock left
    interrupts  the same with SIGINT (Ctrl-C): exit 130 and "resume with:", then the same
    starts      two runs started into one fresh out_dir, the second after a random delay:
                exactly one refused (exit 2, one line naming the other's PID)
    flips       one byte of last.pt changed (XOR with a random non-zero mask) at a random
                offset: refused with exit 2 and one line, nothing sampled
    cuts        last.pt cut short at a random length, or random bytes appended: the same
    divergence  learning rates that make every model kind diverge, and non-finite settings:
                exit 3 (or 2 at load), one line, checkpoints and metrics.jsonl as they were
    fills       a 2 MB tmpfs filled up to several levels, then `--resume` for 3 more epochs:
                exit 0 or one line with exit 2, no temporary file, every checkpoint loads,
                metrics.jsonl strict JSON; with the room back, the same command ends with the
                metrics and weights of an undisturbed run (mounting needs root: skipped
                otherwise)

Prints one line per trial on stderr and a Markdown table on stdout; exit status 1 when any
trial broke the promise. The work folder is a temporary one, removed at the end unless
--keep DIR names one to keep.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import same_runs  # scripts/same_runs.py, beside this file

from rnnlm.files import LOCK_FILE, TEMP_NAME, fcntl  # no torch: the parts that need it load it

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "data" / "timemachine.txt"
PARTS = ("kills", "interrupts", "starts", "flips", "cuts", "divergence", "fills")
KINDS = ("rnn_scratch", "gru_scratch", "lstm_scratch", "rnn", "gru", "lstm")


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def sets(*items) -> list[str]:
    return [a for item in items for a in ("--set", str(item))]


def one_error_line(stderr: str) -> str | None:
    """The error line when stderr is exactly one `error:` line without a traceback."""
    lines = stderr.strip().splitlines()
    if len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr:
        return lines[0]
    return None


def temporaries(folder: Path) -> list[str]:
    try:
        return [p.name for p in folder.iterdir() if TEMP_NAME.match(p.name)]
    except OSError:
        return []


def lock_held(folder: Path) -> bool:
    """Whether a process still holds the run's lock (a lock file left by a killed run is
    harmless: the kernel released its lock, and the next run takes it)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def strict_records(path: Path) -> list[dict] | None:
    """metrics.jsonl as strict JSON (None when a line is not: NaN, Infinity, cut short)."""
    def refuse(name):
        raise ValueError(name)
    try:
        return [json.loads(line, parse_constant=refuse)
                for line in path.read_text().splitlines()]
    except (OSError, ValueError):
        return None


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


class Campaign:
    """The parts of the campaign over one work folder: each adds a row to `rows`."""

    def __init__(self, work: Path, rng: random.Random, epochs: int):
        self.work, self.rng, self.epochs = work, rng, epochs
        self.text = work / "notes.txt"
        self.data_dir = work / "data"
        shutil.copyfile(TEXT, self.text)
        self.rows: list[tuple[str, int, int, str]] = []
        self.reference: Path | None = None
        self.reference_s = 0.0

    # ------------------------------------------------------------------ commands

    def train_args(self, out: Path, *overrides) -> list[str]:
        return [sys.executable, "train.py", "--quiet", "--config", "configs/tiny.yaml",
                *sets(f"data.path={self.text}", f"data.data_dir={self.data_dir}",
                      f"out_dir={out}", "data.max_tokens=600", "train.threads=1",
                      "train.predict_every=0", "train.checkpoint_every=1",
                      f"train.epochs={self.epochs}", *overrides)]

    def run(self, args: list, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def resume_args(self, out: Path, *overrides) -> list:
        return [sys.executable, "train.py", "--quiet", "--resume", out / "last.pt",
                *sets(*overrides)]

    def add(self, fault: str, results: list[bool], details: str) -> None:
        self.rows.append((fault, len(results), sum(results), details))

    def uninterrupted(self) -> Path:
        """The run the killed ones must end up equal to (made once)."""
        if self.reference is None:
            self.reference = self.work / "reference"
            start = time.perf_counter()
            proc = self.run(self.train_args(self.reference))
            self.reference_s = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(f"the reference run failed: {proc.stderr}")
            log(f"reference: {self.epochs} epochs in {self.reference_s:.1f} s")
        return self.reference

    # ------------------------------------------------------------------ kills and interrupts

    def signals(self, n: int, sig: signal.Signals) -> None:
        reference = self.uninterrupted()
        name = sig.name
        results, phases, recoveries = [], Counter(), Counter()
        mid_write = still_left = tracebacks = 0
        same_ones = []
        for i in range(n):
            out = self.work / f"{name.lower()}{i}"
            moment = self.rng.uniform(0, self.reference_s)
            proc = subprocess.Popen([str(a) for a in self.train_args(out)], cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            time.sleep(moment)
            finished = proc.poll() is not None
            if not finished:
                proc.send_signal(sig)
            _, stderr = proc.communicate(timeout=300)
            left = temporaries(out)
            logged = len(strict_records(out / "metrics.jsonl") or []) \
                if (out / "metrics.jsonl").exists() else 0
            if finished:
                phase = "after the process ended"
            elif logged == self.epochs:
                phase = "after the last epoch"  # in its final writes, or exiting
            elif logged or (out / "last.pt").exists():
                phase = "in training"
            else:
                phase = "in start-up"  # before the first checkpoint
            phases[phase] += 1
            mid_write += bool(left)
            # SIGINT: in training, exit 130 with the command that resumes; anywhere, no
            # traceback (SIGKILL prints nothing, being unblockable)
            stopped_well = "Traceback" not in stderr
            if sig == signal.SIGINT and phase == "in training":
                stopped_well &= proc.returncode == 130 and "resume with: " in stderr
            # recovery, as the user would: resume when there is a last.pt (which says so when
            # it is final already: killed after its last write), else start again
            if finished:
                recovered, how = proc, "finished"
            elif (out / "last.pt").exists():
                recovered, how = self.run(self.resume_args(out)), "resumed"
                if recovered.returncode == 2 and "has already completed" in recovered.stderr:
                    recovered, how = subprocess.CompletedProcess([], 0), "already complete"
            else:
                extra = ["--overwrite"] if (out / "best.pt").exists() else []
                recovered, how = self.run(self.train_args(out) + extra), "started again"
            recoveries[how] += 1
            same, _ = same_runs.compare(reference, out) if recovered.returncode == 0 \
                else (False, "")
            same_ones.append(same)
            stale = temporaries(out)
            still_left += bool(stale)
            clean = not stale and not lock_held(out)
            ok = proc.returncode in (0, -sig, 130) and stopped_well and \
                recovered.returncode == 0 and same and clean
            results.append(ok)
            tracebacks += "Traceback" in stderr
            tail = f"a traceback ending {stderr.strip().splitlines()[-1][:80]!r}; " \
                if "Traceback" in stderr else ""
            log(f"{name} {i + 1}/{n} at {moment:.2f} s ({phase}, {logged} epochs logged, "
                f"temporary files {left or 'none'}): exit {proc.returncode}, {tail}{how}"
                f"{f' with exit {recovered.returncode}' if how != 'finished' else ''}, "
                f"{'identical' if same else 'DIFFERENT'}"
                f"{'' if clean else ', LEFT a temporary file or a held lock'}")
            shutil.rmtree(out, ignore_errors=True)
        order = ("in start-up", "in training", "after the last epoch", "after the process ended")
        details = ", ".join(f"{phases[phase]} {phase}" for phase in order if phases[phase])
        then = ", ".join(f"{count} {how}" for how, count in sorted(recoveries.items()))
        what = "killed" if sig == signal.SIGKILL else "stopped"
        startup = f"; {tracebacks} printed a KeyboardInterrupt traceback (stopped while " \
            f"Python was still importing, before rnnlm's handler)" if tracebacks else ""
        self.add(f"{name} at a random moment of a {self.epochs}-epoch run "
                 f"({self.reference_s:.1f} s), then --resume",
                 results, f"{details}; then {then}; {mid_write} {what} in the middle of a "
                 f"write, leaving a temporary file, which {still_left} still had after the "
                 f"recovery{startup}; final metrics and weights identical to the uninterrupted "
                 f"run in {sum(same_ones)}")

    # ------------------------------------------------------------------ concurrent starts

    def starts(self, n: int) -> None:
        results, staggered = [], 0
        for i in range(n):
            out = self.work / f"start{i}"
            delay = self.rng.choice([0.0, self.rng.uniform(0, 2.0)])
            staggered += delay > 0
            args = [self.train_args(out, "train.epochs=100000", f"seed={seed}")
                    for seed in (1, 2)]
            procs = [subprocess.Popen([str(a) for a in args[0]], cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)]
            time.sleep(delay)
            procs.append(subprocess.Popen([str(a) for a in args[1]], cwd=ROOT,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True))
            deadline = time.monotonic() + 120
            while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.01)
            done = [p for p in procs if p.poll() is not None]
            ok = len(done) == 1
            detail = f"{len(done)} of 2 ended"
            if ok:
                loser, winner = done[0], next(p for p in procs if p is not done[0])
                line = one_error_line(loser.communicate()[1])
                ok = loser.returncode == 2 and line is not None and \
                    f"(process {winner.pid})" in line
                detail = f"refused: {line!r}"
                # let the winner log an epoch, then Ctrl-C: its log must be its own
                deadline = time.monotonic() + 60
                while len(strict_records(out / "metrics.jsonl") or []) < 1 and \
                        winner.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                winner.send_signal(signal.SIGINT)
                winner.communicate(timeout=120)
                records = strict_records(out / "metrics.jsonl") or []
                ok &= winner.returncode == 130 and \
                    [r["epoch"] for r in records] == list(range(1, len(records) + 1))
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
            results.append(ok)
            log(f"start {i + 1}/{n}, second {delay:.2f} s later: "
                f"{'ok' if ok else 'BROKEN'}; {detail}")
            shutil.rmtree(out, ignore_errors=True)
        self.add("two runs into one out_dir (the second 0-2 s later)", results,
                 f"{n - staggered} started at once, {staggered} staggered; exactly one refused "
                 f"with exit 2 and one line naming the other's PID in {sum(results)}")

    # ------------------------------------------------------------------ damaged checkpoints

    def damaged(self, n_flips: int, n_cuts: int, processes: int) -> None:
        good = (self.uninterrupted() / "last.pt").read_bytes()
        regions = checkpoint_regions(good)
        folder = self.work / "damaged"
        folder.mkdir(exist_ok=True)
        path = folder / "last.pt"
        from rnnlm import cli  # here: the other parts need no torch in this process

        def sample(data: bytes) -> tuple[int, str, str]:
            path.write_bytes(data)
            err, out = io.StringIO(), io.StringIO()
            code = 0
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    cli.main(["sample", "--checkpoint", str(path), "--num-chars", "5"],
                             prog="rnnlm")
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException as exc:  # a crash: counted, never hidden
                    code, err = 1, io.StringIO(f"Traceback (crash): {exc!r}")
            return code, out.getvalue(), err.getvalue()

        assert sample(good)[0] == 0, "the undamaged checkpoint does not sample"

        def judge(kind: str, trials: list[bytes]) -> list[tuple[bytes, bool, str]]:
            seen = []
            for data in trials:
                code, stdout, stderr = sample(data)
                line = one_error_line(stderr)
                ok = code == 2 and line is not None and stdout == ""
                seen.append((data, ok, message_kind(line or stderr, str(path))))
                if not ok:
                    log(f"{kind}: NOT refused: exit {code}, stderr {stderr.strip()[:200]!r}")
            return seen

        if n_flips:
            trials, where = [], []
            for _ in range(n_flips):
                offset = self.rng.randrange(len(good))
                data = bytearray(good)
                data[offset] ^= self.rng.randrange(1, 256)
                trials.append(bytes(data))
                where.append(region_of(regions, offset))
            seen = judge("flip", trials)
            by_region = Counter()
            refused_in = Counter()
            for region, (_, ok, _) in zip(where, seen):
                by_region[region] += 1
                refused_in[region] += ok
            messages = Counter(kind for _, _, kind in seen)
            agree = self.as_processes(seen[:processes], path)
            log(f"flips: {sum(ok for _, ok, _ in seen)}/{n_flips} refused; messages "
                f"{dict(messages)}; {agree}/{min(processes, n_flips)} agree as processes")
            self.add(f"one byte changed at a random offset of last.pt ({len(good):,} bytes), "
                     f"then `rnnlm sample`", [ok for _, ok, _ in seen],
                     ", ".join(f"{refused_in[r]}/{by_region[r]} in {r}"
                               for r in sorted(by_region, key=lambda r: -by_region[r]))
                     + f"; refused with one line and exit 2, nothing sampled, in "
                       f"{sum(ok for _, ok, _ in seen)}; the first {min(processes, n_flips)} "
                       f"also as separate processes: {agree} the same")
        if n_cuts:
            trials, appended = [], 0
            for _ in range(n_cuts):
                if self.rng.random() < 0.8:
                    trials.append(good[:self.rng.randrange(len(good))])
                else:
                    appended += 1
                    trials.append(good + self.rng.randbytes(self.rng.randrange(1, 4097)))
            seen = judge("cut", trials)
            messages = Counter(kind for _, _, kind in seen)
            self.add("last.pt cut short at a random length, or random bytes appended, then "
                     "`rnnlm sample`", [ok for _, ok, _ in seen],
                     f"{n_cuts - appended} cut, {appended} appended to; refused with one line "
                     f"and exit 2 in {sum(ok for _, ok, _ in seen)}; messages: "
                     + ", ".join(f"{count}x {kind}" for kind, count in messages.most_common()))

    def as_processes(self, seen: list[tuple[bytes, bool, str]], path: Path) -> int:
        """How many of these damaged files a real `python -m rnnlm sample` process judges
        as the in-process command did."""
        agree = 0
        for data, ok, _ in seen:
            path.write_bytes(data)
            proc = self.run([sys.executable, "-m", "rnnlm", "sample", "--checkpoint", path,
                             "--num-chars", "5"])
            refused = proc.returncode == 2 and one_error_line(proc.stderr) is not None \
                and proc.stdout == ""
            agree += refused == ok
        return agree

    # ------------------------------------------------------------------ divergence

    def divergence(self) -> None:
        reference = self.uninterrupted()
        more = f"train.epochs={self.epochs + 2}"
        cases = [("resume, lr 1e38 without clipping", "resume",
                  [more, "train.lr=1e38", "train.clip_norm=null"], 3),
                 ("resume, lr inf", "resume", [more, "train.lr=inf"], 2),
                 ("resume, lr nan", "resume", [more, "train.lr=nan"], 2),
                 ("resume, weight_decay inf", "resume", [more, "train.weight_decay=inf"], 2),
                 ("resume, lr 1e6 without clipping", "resume",
                  [more, "train.lr=1e6", "train.clip_norm=null"], None)]
        cases += [(f"new {kind} run, lr 1e38 without clipping", "new",
                   [f"model.kind={kind}", "train.lr=1e38", "train.clip_norm=null"], 3)
                  for kind in KINDS]
        cases.append(("new rnn_scratch run, Adam, lr 1e38", "new",
                      ["train.optimizer=adam", "train.lr=1e38", "train.clip_norm=null"], 3))
        results, codes, broken = [], Counter(), []
        for label, how, overrides, expected in cases:
            out = self.work / "diverge"
            shutil.rmtree(out, ignore_errors=True)
            if how == "resume":
                shutil.copytree(reference, out)
                before = snapshot(out)
                proc = self.run(self.resume_args(out, *overrides))
            else:
                before = {}
                proc = self.run(self.train_args(out, *overrides))
            codes[proc.returncode] += 1
            line = one_error_line(proc.stderr)
            after = snapshot(out) if out.exists() else {}
            records = strict_records(out / "metrics.jsonl") if out.exists() else []
            kept = all(after.get(name) == before[name]
                       for name in ("last.pt", "best.pt", "metrics.jsonl") if name in before)
            if expected is None:  # huge but finite: either goes on, finite, or stops with 3
                ok = records is not None and (
                    proc.returncode == 0 and not re.search(r"\d{20}", proc.stdout)
                    or proc.returncode == 3 and line is not None and kept)
            else:
                ok = proc.returncode == expected and line is not None and kept and \
                    records is not None
                if how == "new" and expected == 3:
                    ok &= not any(name.endswith(".pt") for name in after)
            results.append(ok)
            if not ok:
                broken.append(f"{label} (exit {proc.returncode}"
                              f"{', a traceback' if 'Traceback' in proc.stderr else ''})")
            log(f"divergence, {label}: exit {proc.returncode}, "
                f"{'ok' if ok else 'BROKEN'}: {(line or proc.stdout.strip())[:160]}")
        shutil.rmtree(self.work / "diverge", ignore_errors=True)
        self.add("divergence: lr 1e38 (all six model kinds, SGD and Adam), lr or "
                 "weight_decay inf or nan, lr 1e6", results,
                 ", ".join(f"exit {code}: {count}" for code, count in sorted(codes.items()))
                 + f"; the expected exit code, one line, checkpoints and metrics.jsonl as they "
                   f"were and strict JSON, in {sum(results)}"
                 + (f"; broken: {'; '.join(broken)}" if broken else ""))

    # ------------------------------------------------------------------ a full disk

    def fills(self, levels: list[int]) -> None:
        mount = self.work / "tmpfs"
        mount.mkdir(exist_ok=True)
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            done = subprocess.CompletedProcess([], 1, "", str(exc))
        if done.returncode != 0:
            log(f"fills: skipped, cannot mount a tmpfs: {done.stderr.strip()}")
            self.rows.append(("a full disk (tmpfs)", 0, 0, "skipped: cannot mount a tmpfs"))
            return
        try:
            self.fill_levels(mount, levels)
        finally:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)

    def fill_levels(self, mount: Path, levels: list[int]) -> None:
        reference = self.uninterrupted()
        more = f"train.epochs={self.epochs + 3}"
        longer = self.work / "reference_longer"  # the same three epochs on a roomy disk
        shutil.copytree(reference, longer)
        if self.run(self.resume_args(longer, more)).returncode != 0:
            raise SystemExit("resuming the reference failed")
        results, failed_at = [], Counter()
        for leave in levels:
            out = mount / "run"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(reference, out)
            filler = fill(mount, leave)
            proc = self.run(self.resume_args(out, more))
            line = one_error_line(proc.stderr)
            which = "exit 0 (it fitted)" if proc.returncode == 0 else \
                f"failed writing {failed_file(line, out)}"
            failed_at[which] += 1
            records = strict_records(out / "metrics.jsonl")
            epochs = [r["epoch"] for r in records or []]
            loads = all(self.loads(p) for p in out.glob("*.pt"))
            intact = (proc.returncode == 0 or proc.returncode == 2 and line is not None) and \
                not temporaries(out) and records is not None and \
                epochs == list(range(1, len(epochs) + 1)) and loads
            filler.unlink()
            again = self.run(self.resume_args(out, more)) if proc.returncode != 0 else proc
            if again.returncode == 2 and "has already completed" in again.stderr:
                again = subprocess.CompletedProcess([], 0)  # only a last plot was missing
            same, _ = same_runs.compare(longer, out) if again.returncode == 0 else (False, "")
            ok = intact and same
            results.append(ok)
            log(f"fill, {leave:,} bytes left: exit {proc.returncode} "
                f"({line or 'no error'}); intact {intact}; with room again: exit "
                f"{again.returncode}, {'identical' if same else 'DIFFERENT'}")
        self.add(f"a full disk: a 2 MB tmpfs filled to {len(levels)} levels "
                 f"({min(levels):,}-{max(levels):,} bytes left), then --resume for 3 epochs",
                 results,
                 ", ".join(f"{which}: {count}" for which, count in failed_at.most_common())
                 + f"; one line, exit 2, no temporary, every checkpoint loading, and with the "
                   f"room back the undisturbed run's metrics and weights, in {sum(results)}")

    @staticmethod
    def loads(path: Path) -> bool:
        from rnnlm.checkpoint import CheckpointError, load_checkpoint

        try:
            load_checkpoint(path)
            return True
        except CheckpointError:
            return False


# ---------------------------------------------------------------------------- helpers


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
        except OSError:
            pass
    return filler


def failed_file(line: str | None, out: Path) -> str:
    """The file a write error names, relative to the run's folder ("?" when none)."""
    found = re.search(r"could not write (?:checkpoint )?(\S+):", line or "")
    return found.group(1).replace(f"{out}/", "") if found else "?"


def checkpoint_regions(data: bytes) -> list[tuple[int, int, str]]:
    """(start, end, name) of the parts of a checkpoint's zip archive."""
    regions = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        start_dir = archive.start_dir
    for info in infos:
        name_len, extra_len = (int.from_bytes(data[info.header_offset + k:][:2], "little")
                               for k in (26, 28))
        body = info.header_offset + 30 + name_len + extra_len
        regions.append((info.header_offset, body, "zip headers"))
        kind = "the pickle" if info.filename.endswith("data.pkl") else \
            "tensor data" if "/data/" in info.filename else "small members"
        regions.append((body, body + info.compress_size, kind))
    end = data.rindex(b"PK\x05\x06")
    regions.append((start_dir, end, "the zip directory"))
    regions.append((end, end + 22, "the end record"))
    regions.append((end + 22, len(data), "the seal"))
    return regions


def region_of(regions, offset: int) -> str:
    for start, end, name in regions:
        if start <= offset < end:
            return name
    return "zip headers"  # the data descriptor (CRC and sizes) after each member


def message_kind(line: str, path: str) -> str:
    """The gist of a refusal, with the file and member names and numbers left out."""
    text = line.replace(path, "FILE")
    text = re.sub(r"member \S+", "member M", text)
    text = re.sub(r"[\d,]+ bytes", "N bytes", text)
    text = re.sub(r"^error: FILE ", "", text)
    return text.split(":")[0].split(" (")[0].strip()


def machine() -> str:
    import torch

    from rnnlm.tools.bench import cpu_name
    return (f"{os.cpu_count()} CPUs ({cpu_name()}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs (default 20)")
    parser.add_argument("--interrupts", type=int, default=10, help="SIGINTs (default 10)")
    parser.add_argument("--starts", type=int, default=10, help="concurrent starts (default 10)")
    parser.add_argument("--flips", type=int, default=2000, help="byte flips (default 2000)")
    parser.add_argument("--cuts", type=int, default=300,
                        help="truncations and appended tails (default 300)")
    parser.add_argument("--flip-processes", type=int, default=20,
                        help="flips also tried as separate processes (default 20)")
    parser.add_argument("--fills", default="0,1024,4096,8192,16384,24576,32768,49152,65536,"
                        "98304", help="free bytes to leave on the tmpfs, comma-separated")
    parser.add_argument("--epochs", type=int, default=150,
                        help="epochs of the tiny run (default 150: about 2 s of training)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"the parts to run, comma-separated: {','.join(PARTS)}")
    parser.add_argument("--seed", type=int, default=0,
                        help="the random moments, offsets and damage (default 0)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    args = parser.parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {', '.join(sorted(unknown))}: choose from {PARTS}")
    if not TEXT.is_file():
        parser.error(f"the campaign trains on {TEXT}: put the Time Machine there first")

    rng = random.Random(args.seed)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rnnlm-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    command = "python scripts/fault_campaign.py " + " ".join(argv if argv is not None
                                                             else sys.argv[1:])
    started = time.perf_counter()
    campaign = Campaign(work, rng, args.epochs)
    try:
        if "kills" in parts and args.kills:
            campaign.signals(args.kills, signal.SIGKILL)
        if "interrupts" in parts and args.interrupts:
            campaign.signals(args.interrupts, signal.SIGINT)
        if "starts" in parts and args.starts:
            campaign.starts(args.starts)
        if "flips" in parts or "cuts" in parts:
            campaign.damaged(args.flips if "flips" in parts else 0,
                             args.cuts if "cuts" in parts else 0, args.flip_processes)
        if "divergence" in parts:
            campaign.divergence()
        if "fills" in parts:
            campaign.fills([int(x) for x in args.fills.split(",") if x])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"`{command.strip()}`, seed {args.seed}, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{time.perf_counter() - started:.0f} s; {machine()}\n")
    print("| fault | trials | promise kept | what happened |")
    print("|---|---:|---:|---|")
    for fault, tried, kept, details in campaign.rows:
        print(f"| {fault} | {tried} | {kept} | {details} |")
    return 0 if all(kept == tried for _, tried, kept, _ in campaign.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
