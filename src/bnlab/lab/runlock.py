"""The lock that keeps one process at a time working in a run directory.

Held with ``flock`` on the file ``.lock`` in the folder, so the operating system drops it
when the process dies, even by SIGKILL; the file is removed when the work ends, so a
finished run keeps none.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .fields import ConfigError

__all__ = ["LOCK", "RunDirLock", "holder"]

LOCK = ".lock"


def holder(run_dir: Path) -> str | None:
    """Who works in ``run_dir`` now ("process 123", or "another process"), or None; creates
    nothing. For messages only: the answer may be stale a moment later."""
    try:
        import fcntl

        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        owner = os.pread(fd, 100, 0).decode(errors="replace").strip() or "another process"
        return None if owner == f"process {os.getpid()}" else owner  # this process's own lock
    except OSError:
        return None
    finally:
        os.close(fd)  # releases the shared lock, if it was taken


class RunDirLock:
    """An exclusive lock on a run directory for as long as one process works in it, held on
    the file ``.lock`` (opened without following links). The operating system drops the lock
    when the process dies, even by SIGKILL. The holder removes the file before releasing it;
    a process that locked a file no longer at that name (it opened it just before the
    removal) lets it go and opens the name again, so two processes never both hold one."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def __enter__(self) -> "RunDirLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        for _ in range(100):  # each retry means another process removed the file meanwhile
            self.fd = self._open()
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                self._refuse(exc)
            if self._current():
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, f"process {os.getpid()}".encode(), 0)
                return self
            os.close(self.fd)
        self.fd = None
        raise ConfigError(f"cannot lock {self.path}: other processes keep replacing it; stop "
                          "them and try again")

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(0, "not a plain file")
        except OSError as exc:
            raise ConfigError(f"cannot open the lock file {self.path} ({exc.strerror}); if it "
                              "is a link or not a file, remove it and try again") from None
        return fd

    def _refuse(self, exc: OSError) -> None:
        busy = isinstance(exc, BlockingIOError)
        owner = busy and os.pread(self.fd, 100, 0).decode(errors="replace").strip()
        os.close(self.fd)
        self.fd = None
        if busy:
            raise ConfigError(f"{self.path.parent} is in use by {owner or 'another process'}; "
                              "wait for it to finish or stop it first") from None
        raise ConfigError(f"cannot lock {self.path} ({exc.strerror}); if it is not a plain "
                          "file, remove it and try again") from None

    def _current(self) -> bool:
        """Whether the locked file is still the one at ``self.path``."""
        try:
            now = os.lstat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self.fd)
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                if self._current():
                    self.path.unlink()  # while still held: see the class docstring
            except OSError:  # the folder is gone or read-only: the lock is released anyway
                pass
            os.close(self.fd)  # closing releases the lock
            self.fd = None
