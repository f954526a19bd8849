"""Safe file writing: atomic replacement, appends that undo themselves, and the out_dir lock.

Every file rnnlm writes (checkpoints, metrics.jsonl, config.yaml, plots, diagnostics, the
token cache, compare's tables, bench's report) goes through this module, so all of them fail
the same way: one `WriteError` line that names the file and the operating system's reason
(a ConfigError, so every command prints it and exits with code 2), the previous file left
exactly as it was, and no temporary file left behind.

    write_atomic       replace a file with bytes, text, or what a callback writes: into a
                       temporary file of our own beside it, flushed and fsynced, then renamed
                       over the target
    append_text        append to a file (metrics.jsonl); a failed append is cut back off
    ensure_directory   create a folder, or say in one line why it cannot be one
    lock_out_dir       an exclusive OS lock on a run's folder for the whole run, which also
                       removes what killed writes left there

It sits at the bottom of the package with errors.py and imports nothing else of rnnlm, so
the data layer can use it as well as the training run and the tools.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows has no flock: runs there do not lock their out_dir
    fcntl = None

from rnnlm.errors import ConfigError

# The system calls that write, as module globals so a test can make them fail with ENOSPC
# or EIO exactly where a full or broken disk would.
_write = os.write
_fsync = os.fsync
_replace = os.replace

BUFFER_BYTES = 1 << 20  # small writes (torch.save's records, CSV rows) are gathered up to this
LOCK_FILE = ".rnnlm.lock"  # in out_dir, while a run holds it

# The temporary names of write_atomic: `.NAME.PID.RANDOM.tmp` beside the target, so they are
# hidden, say which process wrote them, and never collide.
TEMP_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")
# The temporary names that earlier versions used in out_dir, removed as stale all the same.
OLD_TEMP_NAMES = re.compile(r"^(metrics\.jsonl\.tmp|diagnostics\.(json|png)\.tmp|"
                            r"\.perplexity\.[a-z0-9_]{8}\.png)$")


class WriteError(ConfigError):
    """A file that could not be written or a folder that could not be made (full disk, I/O
    error, no permission, a file where a folder should be): one line naming it and why."""

    def __init__(self, message: str, path: Path | None = None, reason: str = ""):
        super().__init__(message)
        self.path, self.reason = path, reason


class FolderInUse(ConfigError):
    """out_dir is locked by another run that is still going."""


def os_reason(exc: BaseException) -> str:
    """The operating system's words for an error ("No space left on device")."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _failed(path: Path, exc: BaseException, what: str | None) -> WriteError:
    try:
        kept = "the previous file is unchanged" if path.exists() else "nothing was written"
    except OSError:
        kept = "nothing was written"
    name = f"{what} {path}" if what else str(path)
    reason = os_reason(exc)
    return WriteError(f"could not write {name}: {reason}; {kept}", path, reason)


# ---------------------------------------------------------------------------- writing


class _Sink:
    """The file a writer callback writes into: `write` takes bytes or any buffer (a NumPy
    array) and writes all of it. It remembers the OSError that stopped a write, because a
    serializer may turn it into an error of its own: torch.save reports a full disk as
    RuntimeError "[enforce fail at inline_container.cc] unexpected pos"."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = bytearray()
        self.written = 0
        self.failure: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        if len(self.buffer) + size > BUFFER_BYTES:
            self.flush()
        if size >= BUFFER_BYTES:
            self._put(view)
        else:
            self.buffer += view
        return size

    def flush(self) -> None:
        if self.buffer:
            with memoryview(self.buffer) as view:
                self._put(view)
            self.buffer.clear()

    def tell(self) -> int:
        return self.written + len(self.buffer)

    def writable(self) -> bool:
        return True

    def _put(self, view: memoryview) -> None:
        try:
            while len(view):
                done = _write(self.fd, view)
                if done <= 0:  # never for a regular file; a loop forever would be worse
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[done:]
                self.written += done
        except OSError as exc:
            self.failure = exc
            raise


def temp_path(path: Path) -> Path:
    """A temporary name of our own beside `path` (not mkstemp, so the file gets the usual
    umask-based permissions)."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def write_atomic(path: str | Path, content: bytes | str | Callable, what: str | None = None,
                 ) -> Path:
    """Replace `path` with `content` so that it always holds either the old or the new file.

    `content`: bytes, text (written as UTF-8), or a callback `fill(f)` that writes into a
    binary file object (torch.save, savefig, a stream of NumPy blocks). An OSError escaping
    the callback counts as a failure to write, like one from the disk; any other exception
    from it goes through unchanged. Either way the temporary file is removed, also on
    KeyboardInterrupt or SystemExit. `what` names the file in the error ("checkpoint").
    """
    path = Path(path)
    if callable(content):
        fill = content
    else:
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)

        def fill(f):
            f.write(data)

    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)
    except OSError as exc:
        raise _failed(path, exc, what) from None
    sink = _Sink(fd)
    try:
        try:
            fill(sink)
            sink.flush()
            _fsync(fd)
        finally:
            os.close(fd)
        _replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        # KeyboardInterrupt and SystemExit (a second Ctrl-C) stay what they are
        failure = (sink.failure or (exc if isinstance(exc, OSError) else None)) \
            if isinstance(exc, Exception) else None
        if failure is not None:
            raise _failed(path, failure, what) from None
        raise
    fsync_directory(path.parent)
    return path


def append_text(path: str | Path, text: str, what: str | None = None) -> None:
    """Append `text` to `path` (created when missing) and fsync it; when that fails, what was
    appended is cut off again (and a file this call created is removed), so the file is as
    it was, and the error is one WriteError line."""
    path = Path(path)
    existed = path.exists()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0),
                     0o666)
    except OSError as exc:
        raise _failed(path, exc, what) from None
    size = None
    try:
        size = os.fstat(fd).st_size
        sink = _Sink(fd)
        sink.write(text.encode("utf-8"))
        sink.flush()
        _fsync(fd)
    except BaseException as exc:
        if size is not None:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
        os.close(fd)
        if not existed:
            _remove(path)
        if isinstance(exc, OSError):
            raise _failed(path, exc, what) from None
        raise
    try:
        os.close(fd)
    except OSError as exc:
        raise _failed(path, exc, what) from None


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def fsync_directory(directory: Path) -> None:
    """Make a rename itself durable (POSIX); not possible everywhere, so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_directory(path: str | Path, what: str = "folder", hint: str = "") -> bool:
    """Create the folder `path` (and its parents) unless it exists; returns whether this call
    created it. A file in the way, or a folder that cannot be made, is one WriteError line
    ending in `hint` (what the user can do)."""
    path = Path(path)
    if path.is_dir():
        return False
    tail = f": {hint}" if hint else ""
    try:
        path.mkdir(parents=True)
        return True
    except FileExistsError:
        if path.is_dir():  # made by another process in the meantime
            return False
        raise WriteError(f"{what} {path} is a file, not a folder{tail}", path,
                         "not a folder") from None
    except NotADirectoryError:
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        raise WriteError(f"cannot create {what} {path}: {blocking or 'a part of it'} is a "
                         f"file, not a folder{tail}", path, "not a folder") from None
    except OSError as exc:
        raise WriteError(f"cannot create {what} {path}: {os_reason(exc)}{tail}", path,
                         os_reason(exc)) from None


# ---------------------------------------------------------------------------- out_dir


class _Held:
    def __init__(self, fd: int | None, created: bool, folder: Path):
        self.fd, self.created, self.folder = fd, created, folder
        self.pid, self.depth = os.getpid(), 1


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


def _close_in_child() -> None:
    """A forked child must not keep the lock alive after its parent is gone: flock belongs
    to the open file, which the child shares. Closing the child's copy leaves the parent's."""
    for held in _held.values():
        if held.fd is not None:
            try:
                os.close(held.fd)
            except OSError:
                pass
            held.fd = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


@contextmanager
def lock_out_dir(out_dir: str | Path, hint: str = "") -> Iterator[Path]:
    """Hold an exclusive lock on the run folder `out_dir` (created when missing) for the
    block, so that a second run into it is refused at once, naming the holder's PID.

    The lock is an OS file lock (flock) on `out_dir/.rnnlm.lock`: the kernel drops it when
    the process ends however it ends, so a killed run never leaves a stale lock. Once held,
    the temporary files that killed writes left in out_dir are removed (nothing else may be
    writing there). The lock file is removed again at the end, and so is the folder when
    this call created it and nothing was written into it. The same process may take the
    lock again inside the block (the notebook API's auto-resume, then the run itself).
    `hint`: what the user can do instead, appended to the errors.
    """
    key = os.path.realpath(out_dir)
    with _held_guard:
        held = _held.get(key)
        if held is not None and held.pid == os.getpid():
            held.depth += 1
        else:
            held = None
    if held is not None:
        try:
            yield Path(out_dir)
        finally:
            with _held_guard:
                held.depth -= 1
        return
    folder = Path(out_dir)
    created = ensure_directory(folder, "out_dir", hint)
    try:
        fd = _acquire(folder, hint)
    except BaseException:
        if created:
            _remove_folder(folder)
        raise
    held = _Held(fd, created, folder)
    with _held_guard:
        _held[key] = held
    try:
        if fd is not None:
            remove_stale_temporaries(folder)
        yield folder
    finally:
        with _held_guard:
            held.depth -= 1
            if held.depth == 0:
                _held.pop(key, None)
        if held.depth == 0 and held.pid == os.getpid():  # never in a forked child
            _release(held)


def _acquire(folder: Path, hint: str) -> int | None:
    """The locked file descriptor of folder's lock file; None where locks are unavailable."""
    if fcntl is None:
        return None
    lock = folder / LOCK_FILE
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise WriteError(f"cannot create the lock file {lock}: {os_reason(exc)}", lock,
                             os_reason(exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            tail = f", or {hint}" if hint else ""
            raise FolderInUse(f"out_dir {folder} is in use by another run ({_holder(lock)}): "
                              f"wait for it to finish or stop it{tail}") from None
        except OSError as exc:  # a file system without locks (some network mounts)
            os.close(fd)
            print(f"warning: cannot lock out_dir {folder} ({os_reason(exc)}): nothing stops "
                  f"a second run from writing into it at the same time", file=sys.stderr)
            return None
        # The previous holder removes the file when it ends: if it did so between our open
        # and our flock, we hold a file nobody else sees, so lock the one at the path now.
        try:
            same = os.path.samestat(os.stat(lock), os.fstat(fd))
        except OSError:
            same = False
        if same:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            except OSError:  # a full disk: the lock holds all the same, only unnamed
                pass
            return fd
        os.close(fd)
    raise WriteError(f"cannot lock out_dir {folder}: its lock file {lock} keeps changing",
                     lock, "lock file keeps changing")


def _holder(lock: Path) -> str:
    """Who holds the lock, from what it wrote into the lock file (a moment after taking it:
    wait a little for that)."""
    for _ in range(20):
        try:
            fields = lock.read_text(encoding="utf-8", errors="replace").split()
        except OSError:
            fields = []
        if fields and fields[0].isdigit():
            pid, host = fields[0], fields[1] if len(fields) > 1 else ""
            return f"process {pid}" + (f" on {host}" if host and host != socket.gethostname()
                                       else "")
        time.sleep(0.05)
    return "another process"


def _release(held: _Held) -> None:
    if held.fd is not None:
        _remove(held.folder / LOCK_FILE)  # while still locked: see _acquire
        os.close(held.fd)
        held.fd = None
    if held.created:
        _remove_folder(held.folder)


def _remove_folder(folder: Path) -> None:
    """Remove a folder this run created when it stayed empty (a run refused at its start)."""
    try:
        folder.rmdir()
    except OSError:
        pass


def remove_stale_temporaries(folder: str | Path) -> list[str]:
    """Remove the temporary files of writes that never finished (a killed process) from
    `folder`; only call it while holding the folder's lock. Returns the names removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if (TEMP_NAME.match(entry.name) or OLD_TEMP_NAMES.match(entry.name)) and \
                entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except OSError:
                pass
    return removed
