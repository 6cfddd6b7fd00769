"""Atomic file writes, shared by the lab (run directories) and the report, and standard
streams that may fail."""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Callable, IO

__all__ = ["TMP_SUFFIX", "atomic_write", "dumps_row", "finite", "silence", "write_json"]

TMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None],
                 check: Callable[[Path], None] | None = None, exclusive: bool = False) -> Path:
    """Write ``path`` through ``write(fh)`` into a temporary file beside it, then rename.

    Readers see the old file or the new one, never a half-written one, even if the process
    is killed mid-write (a killed write leaves a ``.NAME.*.tmp`` file, which the run
    directory clears on resume). ``check(temporary_path)`` may raise to refuse the new
    content, in which case ``path`` is left as it was. With ``exclusive``, an existing
    ``path`` is never replaced: FileExistsError instead. An OSError names ``path`` when the
    system gave no file name (a full disk fails a write, not an open).
    """
    path = Path(path)
    try:
        _atomic_write(path, write, check, exclusive)
    except OSError as exc:
        exc.filename = exc.filename or str(path)
        raise
    return path


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None],
                  check: Callable[[Path], None] | None, exclusive: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    # O_EXCL | O_NOFOLLOW: never write through a planted file or link; mode 0o666 lets the
    # process umask decide the permissions, as for any file the user creates.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if check is not None:
            check(tmp)
        if exclusive:
            _link_new(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _link_new(tmp: Path, path: Path) -> None:
    """Give ``tmp``'s content the name ``path`` unless that name exists: a hard link fails
    where a rename would replace (a file system without hard links: checked, then renamed)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any, exclusive: bool = False) -> Path:
    text = json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write(path, lambda fh: fh.write(text.encode()), exclusive=exclusive)


def finite(v: Any) -> Any:
    """``v`` with every non-finite float in it, nested ones included, as None (JSON has no
    NaN)."""
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(finite(x) for x in v)
    return None if isinstance(v, float) and not math.isfinite(v) else v


def dumps_row(row: dict) -> str:
    """One compact JSON line; non-finite floats become null."""
    return json.dumps(finite(row), separators=(",", ":"), allow_nan=False) + "\n"


def silence(stream: Any) -> None:
    """Send what ``stream`` (sys.stdout or sys.stderr) still holds, and all it is given later,
    to the null device: once a write failed (a closed pipe, a full disk), the interpreter's
    last flush at exit would fail again and change the exit code."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(fd, stream.fileno())
        finally:
            os.close(fd)
        stream.flush()
    except (OSError, ValueError, AttributeError):  # no descriptor (a test's capture): nothing held
        pass
