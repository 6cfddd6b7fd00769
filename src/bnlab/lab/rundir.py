"""Run directories: the one record format every experiment writes, and resuming it.

A run directory holds

* ``config.json``: the experiment's name and its resolved config;
* ``run.json``: provenance: bnlab, torch and Python versions, threads, the code that
  computed BatchNorm (compiled kernels or torch ops), and each session's start date and
  wall time;
* ``metrics.jsonl``: the measurements, one compact JSON row each. Every row names its unit
  (one trained network or sweep point, e.g. ``bn-seed0``) and carries the digest of the
  config it was computed under; a unit's last row says ``"done": true``. While a run goes,
  the rows of units trained side by side interleave; a finished run's rows are grouped unit
  by unit, in the experiment's order;
* ``checkpoints/<unit>.pt``: a unit's training state after its last evaluation, with the
  number of rows it had written then.

Resuming replays each unfinished unit from its checkpoint (or from its start, when it has
none) and appends only the rows past those already recorded, so recorded rows are never
discarded, and a run that was killed ends with the rows an uninterrupted run has.
"""

from __future__ import annotations

import io
import json
import os
import platform
import stat
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

from bnlab._io import TMP_SUFFIX, atomic_write, dumps_row, write_json
from .config import Config, ConfigError
from .configs import EXPERIMENTS

__all__ = ["Record", "RunDirLock", "Unit", "check_new_run_dir", "read_config", "read_rows", "session"]

CONFIG, RUN, METRICS, CHECKPOINTS = "config.json", "run.json", "metrics.jsonl", "checkpoints"


def read_config(run_dir: Path) -> Config:
    """The config stored in ``run_dir``, checked as strictly as one from the command line."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (it holds no {CONFIG})")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(stored, dict) or stored.get("experiment") not in EXPERIMENTS:
        raise ConfigError(f"{path} does not name a bnlab experiment (expected a JSON object "
                          f"with \"experiment\": one of {', '.join(EXPERIMENTS)})")
    return EXPERIMENTS[stored.pop("experiment")].from_dict(stored, source=str(path))


def check_new_run_dir(run_dir: Path) -> None:
    """Check that ``run_dir`` can hold a new run, without creating anything."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} exists and is not a folder; choose another --out")
    if run_dir.is_dir() and any(p.name != ".lock" for p in run_dir.iterdir()):
        raise ConfigError(f"{run_dir} already holds files; continue a run there with "
                          f"--resume {run_dir}, or choose another --out")
    parent = next(p for p in run_dir.parents if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"--out {run_dir}: {parent} is a file, not a folder")


def refuse_links(run_dir: Path) -> None:
    """bnlab writes only inside the run directory: a link in it could send writes elsewhere."""
    for name in (CONFIG, RUN, METRICS, CHECKPOINTS, "figures", "summary.json", "report.html"):
        if (run_dir / name).is_symlink():
            raise ConfigError(f"{run_dir / name} is a link; bnlab writes only inside the run "
                              "directory: replace it with the file or folder itself")


def clear_leftovers(run_dir: Path) -> None:
    """Remove temporary files of writes that a killed process left half done."""
    for sub in (run_dir, run_dir / CHECKPOINTS, run_dir / "figures"):  # links were refused
        for p in sub.glob(f".*{TMP_SUFFIX}"):
            p.unlink(missing_ok=True)


@contextmanager
def session(run_dir: Path, threads: int) -> Iterator[None]:
    """Record this process's work in ``run.json``: versions, threads, start date, wall time,
    which BatchNorm code ran (compiled kernels or torch ops) and whether it finished."""
    import torch

    import bnlab

    path = run_dir / RUN
    try:
        info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"sessions": []}
        assert isinstance(info, dict) and isinstance(info.get("sessions"), list)
    except (ValueError, AssertionError):
        raise ConfigError(f"{path} is damaged; delete it (it holds only provenance) and "
                          "resume again") from None
    entry = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": 0.0,
             "bnlab": bnlab.__version__, "torch": torch.__version__,
             "python": platform.python_version(), "threads": threads, "finished": False}
    info["sessions"].append(entry)
    write_json(path, info)
    t0 = time.monotonic()
    try:
        yield
        entry["finished"] = True
    finally:
        from bnlab.nn import _kernels
        entry["seconds"] = round(time.monotonic() - t0, 3)
        entry["kernels"] = _kernels.describe()  # the code that computed BatchNorm
        try:
            write_json(path, info)
        except OSError:  # a full disk must not hide the error that ended the run
            if entry["finished"]:
                raise


class RunDirLock:
    """An exclusive lock on a run directory for as long as one process works in it. The
    lock file is opened without following links and never unlinked (unlinking would let a
    second process lock a fresh file while the first still holds the old one); the operating
    system drops the lock when the process dies, even by SIGKILL."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "RunDirLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                os.close(self.fd)
                raise OSError(0, "not a plain file")
        except OSError as exc:
            raise ConfigError(f"cannot open the lock file {self.path} ({exc.strerror}); if it "
                              "is a link or not a file, remove it and try again") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            busy = isinstance(exc, BlockingIOError)
            owner = busy and os.pread(self.fd, 100, 0).decode(errors="replace").strip()
            os.close(self.fd)
            if busy:
                owner = owner or "another process"
                raise ConfigError(f"{self.path.parent} is in use by {owner}; wait for it to "
                                  "finish or stop it first") from None
            raise ConfigError(f"cannot lock {self.path} ({exc.strerror}); if it is not a plain "
                              "file, remove it and try again") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"process {os.getpid()}".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def _row(line: bytes) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(row, dict) and isinstance(row.get("unit"), str) and "config" in row
    return row if ok else None


def read_rows(path: Path, digest: str | None = None, repair: bool = False) -> list[dict]:
    """The rows of ``metrics.jsonl``. A last line cut short by a crash is skipped (with
    ``repair``, cut off, and a whole last row given its newline, so the next row starts on
    a line of its own); any other bad line is an error naming it. With ``digest``, a row
    computed under another config is an error: config.json was edited after the run started."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines, rows = data.split(b"\n"), []
    if repair and data and not data.endswith(b"\n"):
        whole = _row(lines[-1]) is not None
        with open(path, "ab") as fh:
            fh.truncate(len(data) if whole else len(data) - len(lines[-1]))
            fh.write(b"\n" if whole else b"")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = _row(line)
        if row is None:
            if i == len(lines):  # no newline yet: a write cut short
                break
            raise ConfigError(f"{path}: line {i} is not a bnlab row; the record is damaged "
                              "(restore it, or start a new run)")
        if digest is not None and row["config"] != digest:
            raise ConfigError(f"{path}: line {i} was computed under another configuration "
                              f"(digest {row['config']}, config.json now gives {digest}); "
                              "config.json was changed after the run started: restore it, "
                              "or start a new run with the new values")
        rows.append(row)
    return rows


class Record:
    """The rows of a run, read once, and appended to by its units."""

    def __init__(self, run_dir: Path, config: Config) -> None:
        self.run_dir, self.digest = run_dir, config.digest()
        self.path = run_dir / METRICS
        self.rows = read_rows(self.path, self.digest, repair=True)
        self.counts = Counter(r["unit"] for r in self.rows)
        self.done = {r["unit"] for r in self.rows if r.get("done")}
        self.order: dict[str, int] = {}  # unit keys in the order the experiment created them

    def append(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(dumps_row(row))
            fh.flush()
            os.fsync(fh.fileno())

    def unit(self, **fields: Any) -> "Unit":
        unit = Unit(self, fields)
        self.order.setdefault(unit.key, len(self.order))
        return unit

    def put_in_order(self) -> None:
        """Rewrite ``metrics.jsonl`` with each unit's rows together, units in the order the
        experiment created them (rows of one unit keep their order). Networks trained side by
        side append their rows interleaved as they come; a finished run's record is thus the
        same, line for line, however it was scheduled, interrupted and resumed."""
        if not self.path.is_file():
            return
        lines = [line for line in self.path.read_bytes().split(b"\n") if line.strip()]
        def rank(line: bytes) -> int:
            row = _row(line)
            return self.order.get(row["unit"], len(self.order)) if row else len(self.order)
        ordered = sorted(lines, key=rank)  # stable: a unit's rows keep their order
        if ordered != lines:
            atomic_write(self.path, lambda fh: fh.write(b"\n".join(ordered) + b"\n"))


class Unit:
    """One trained network or sweep point: writes its rows, saves and loads its state."""

    def __init__(self, record: Record, fields: dict[str, Any]) -> None:
        self.record, self.fields = record, fields
        self.key = "-".join(f"{v}" if k == "norm" else f"{k}{v}" for k, v in fields.items())
        self.recorded = record.counts[self.key]
        self.done = self.key in record.done
        self.diverged = False  # set by the training loop when the unit's loss became non-finite
        self.written = 0  # rows this unit has produced, recorded ones included
        self.path = record.run_dir / CHECKPOINTS / f"{self.key}.pt"

    def write(self, row: dict) -> None:
        """Record ``row`` unless a previous session already recorded it."""
        if self.written >= self.recorded:
            self.record.append({"unit": self.key, "config": self.record.digest, **self.fields, **row})
        self.written += 1

    def finish(self) -> None:
        self.write({"done": True})
        self.done = True

    def save(self, state: dict) -> None:
        import torch

        buf = io.BytesIO()
        torch.save({**state, "rows": self.written}, buf)
        atomic_write(self.path, lambda fh: fh.write(buf.getvalue()))

    def damaged(self, why: str) -> ConfigError:
        return ConfigError(f"checkpoint {self.path} is damaged{why}; delete it and resume again "
                           "(the unit restarts from its first step; recorded rows are kept)")

    def load(self) -> dict | None:
        """The saved state, or None; afterwards rows continue from where it was saved."""
        import torch

        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            assert all(isinstance(state.get(k), dict) for k in ("model", "optimizer"))
            assert all(type(state.get(k)) is int and state[k] >= 0 for k in ("rows", "step"))
        except Exception:  # torch raises many kinds for a damaged file
            raise self.damaged("") from None
        if state["rows"] > self.recorded:
            raise self.damaged(f" (ahead of {METRICS}: {state['rows']} rows saved, "
                               f"{self.recorded} recorded)")
        self.written = state["rows"]
        return state
