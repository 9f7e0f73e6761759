"""One run per run directory: the run's main process holds an exclusive ``flock`` on ``RUN_DIR/.dist-train.lock``.

A flock belongs to the open file, so the kernel drops it when the holder dies (kill -9, a lost node, a requeue):
a dead run never leaves a stale lock, and a requeued job's new process takes it over. The holder writes its
host, pid and start time into the file after taking it; a second run into the directory is refused at once,
naming them. A forked child (a loader worker) closes its copy of the descriptor at once, so the lock ends with
the holder itself, not with the last of its children (a worker outliving a killed main must not keep a
requeued run out).
Only `dist-train train` takes the lock; `report`, `eval` and `export` read a run directory without it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from dist_train.config import ConfigError
from dist_train.rundir import RunDir

# file systems mounted without lock support (e.g. Lustre without -o flock) answer with one of these
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}

_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)  # the parent's descriptor, and so its lock, stays
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """The held lock of one run directory; released when closed or when the process ends."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock | None:
        """Create the run directory, take its lock and record the holder; ConfigError naming the holder if held.

        None (with a warning) where the file system cannot lock: the run goes on unprotected.
        """
        dirs = RunDir(run_dir)
        path = dirs.lock
        try:
            dirs.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(
                f"output_dir {dirs.root}: cannot create its lock file {path} ({e.strerror}); pass a writable "
                f"--output_dir"
            ) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"output_dir {dirs.root}: {path} is not a regular file; remove it")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(
                f"output_dir {dirs.root} is in use by another run ({holder}); wait for it to end or stop it, "
                f"or choose another --output_dir"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_LOCKS:
                raise ConfigError(f"output_dir {dirs.root}: cannot lock {path} ({e.strerror})") from None
            print(
                f"dist-train: warning: {path} cannot be locked on this file system ({e.strerror}); a second run "
                f"into {dirs.root} is not prevented",
                file=sys.stderr,
                flush=True,
            )
            return None
        except ConfigError:
            os.close(fd)
            raise
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        _HELD.add(fd)
        return cls(fd, path)

    def release(self) -> None:
        if self.fd in _HELD:  # not in a forked child, which closed its copy already
            _HELD.discard(self.fd)
            with contextlib.suppress(OSError):
                os.close(self.fd)  # closing drops the flock; the file stays, holding the last holder's record
        self.fd = -1

    def __del__(self):
        self.release()


def _holder(fd: int) -> str:
    """The holder as its record says: host, pid, start time (what a refused run names)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0))
        host, pid, started = (" ".join(str(record[k]).split())[:100] for k in ("host", "pid", "started"))
        return f"host {host}, pid {pid}, started {started}"
    except (OSError, ValueError, TypeError, KeyError):
        return "its holder has not recorded itself yet"
