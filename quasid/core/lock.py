"""One owner per run folder: a lock file taken before the first write, released at the end.

`hold(folder, fingerprint, command)` is a context manager; inside it this process is the
folder's only owner. The lock is `folder/.quasid.lock` (`LOCK_FILE`), a JSON record of the
owner (pid, host, start time, config fingerprint, command) kept under an exclusive
`flock` for the owner's lifetime:

- a second owner (another process, or a second `hold` in this one) fails at once with a
  `LockError` naming the holder;
- a stale lock (its process died: SIGKILL, power loss) is taken over: the kernel drops a
  dead process's `flock`, and the record's pid is not alive on this host; the record of
  the dead owner is returned in `Lock.took_over`;
- a record written on another host is never taken over here (its pid means nothing on
  this host): remove the file by hand once that run is gone.

Release (end of the block, also on errors and on KeyboardInterrupt) deletes the file.
No torch, no other project package: `flows` and `simulator` CLIs both use it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from quasid.core.layout import LOCK_FILE

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the pid check alone decides
    fcntl = None


class LockError(RuntimeError):
    """The folder is owned by another live run."""


@dataclass
class Lock:
    """A held lock: its file, this owner's record, the dead owner taken over (if any)."""

    path: Path
    owner: dict
    took_over: dict | None = None
    _fd: int | None = field(default=None, repr=False)

    def release(self) -> None:
        """Delete the lock file and drop the flock (idempotent)."""
        if self._fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                if _same_file(self._fd, self.path):
                    self.path.unlink()
        finally:
            os.close(self._fd)
            self._fd = None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_owner(folder: str | os.PathLike) -> dict | None:
    """The lock record of `folder` (None when unlocked or unreadable)."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text() or "null")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def describe(owner: dict | None) -> str:
    """`pid 123 on host h since 2026-01-01T02:00:00Z (quasid run)`."""
    if not owner:
        return "an unknown owner"
    return (f"pid {owner.get('pid')} on host {owner.get('host')} since {owner.get('started')}"
            f" ({owner.get('command', '?')})")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _try_flock(fd: int) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def acquire(folder: str | os.PathLike, fingerprint: str = "", command: str = "") -> Lock:
    """Take the lock of `folder` (created if missing) or raise `LockError` at once."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    host = socket.gethostname()
    for _ in range(10):  # the file can be replaced between open and flock: try again
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_flock(fd):
            os.close(fd)
            owner = read_owner(folder)
            raise LockError(f"{folder}: already in use by {describe(owner)} "
                            "(expected a folder no other run writes to: wait for it, or use "
                            "another --out)")
        if not _same_file(fd, path):
            os.close(fd)
            continue
        previous = None
        with contextlib.suppress(OSError, json.JSONDecodeError):
            text = os.pread(fd, 1 << 16, 0).decode()
            previous = json.loads(text) if text.strip() else None
        if previous and previous.get("pid") != os.getpid():
            if previous.get("host") != host:
                os.close(fd)
                raise LockError(
                    f"{path}: held by {describe(previous)}, another host (expected a lock of "
                    "this host; remove the file if that run is gone)")
            if fcntl is None and pid_alive(int(previous.get("pid", -1))):
                os.close(fd)
                raise LockError(f"{folder}: already in use by {describe(previous)}")
            # same host, flock free: its owner died (a live owner holds the flock)
        owner = {"pid": os.getpid(), "host": host,
                 "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "fingerprint": fingerprint, "command": command}
        data = (json.dumps(owner, sort_keys=True) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return Lock(path, owner, took_over=previous or None, _fd=fd)
    raise LockError(f"{path}: could not take the lock (the file kept changing)")


@contextlib.contextmanager
def hold(folder: str | os.PathLike, fingerprint: str = "", command: str = "") -> Iterator[Lock]:
    """Own `folder` for the block (see the module docstring); released on any exit."""
    lock = acquire(folder, fingerprint, command)
    try:
        yield lock
    finally:
        lock.release()
