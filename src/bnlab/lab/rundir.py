"""Configurations and run directories, shared by ``bnlab compare`` and ``bnlab run``."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

from bnlab._io import write_json

__all__ = ["ConfigError", "RunDirLock", "config_from_dict", "open_run_dir"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is out of range or unknown; raised before any work starts."""


def config_from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """``cls(**d)`` for a config dataclass, refusing keys it does not have (the dataclass
    turns JSON lists into tuples itself)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown config keys for {cls.__name__}: {', '.join(unknown)}")
    return cls(**d)


def open_run_dir(run_dir: Path, record: dict[str, Any] | None, resume: bool) -> dict[str, Any]:
    """Start a run directory with ``record`` as its ``config.json``, or, on resume, return
    the stored record. A new run never writes into a directory that holds anything."""
    stored = run_dir / "config.json"
    if resume:
        if not stored.is_file():
            raise ConfigError(f"cannot resume: {stored} does not exist")
        return json.loads(stored.read_text())
    if run_dir.exists() and any(p.name != ".lock" for p in run_dir.iterdir()):
        raise ConfigError(f"{run_dir} already holds a run; use --resume {run_dir} to continue "
                          "it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(stored, record)
    return record


class RunDirLock:
    """An exclusive lock on a run directory for as long as one process works in it, so a
    second ``bnlab`` (a resume started while the first still runs) cannot interleave its
    writes. The operating system drops the lock when the process dies, even by SIGKILL."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.handle = None

    def __enter__(self) -> "RunDirLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "another process"
            self.handle.close()
            raise ConfigError(f"{self.path.parent} is in use by {owner}; wait for it to finish "
                              "or stop it before resuming") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"process {os.getpid()}")
        self.handle.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            self.handle.close()  # closing releases the lock
