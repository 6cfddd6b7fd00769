"""Run directories: the one record format every experiment writes, and resuming it.

A run directory holds

* ``config.json``: the experiment's name and its resolved config;
* ``run.json``: provenance: bnlab, torch and Python versions, threads, the device and the
  code that computed BatchNorm (compiled kernels or torch ops on the CPU; a resume on the
  same device keeps to it), and each session's start date and wall time (kept current while
  it runs);
* ``metrics.jsonl``: the measurements, one compact JSON row each. Every row names its unit
  (one trained network or sweep point, e.g. ``bn-seed0``) and carries the digest of the
  config it was computed under; a unit's last row says ``"done": true``. While a run goes,
  the rows of units trained side by side interleave; a finished run's rows are grouped unit
  by unit, in the experiment's order;
* ``checkpoints/<unit>.pt``: a unit's training state after its last evaluation, with the
  number of rows it had written then, in CPU tensors whatever the device that trained it;
* ``.lock``: while a process works in the run (removed when it ends).

Resuming replays each unfinished unit from its checkpoint (or from its start, when it has
none) and appends only the rows past those already recorded, so recorded rows are never
discarded, and a run that was killed ends with the rows an uninterrupted run has.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
import contextlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from bnlab._io import TMP_SUFFIX, atomic_write, dumps_row, finite, write_json
from . import signals
from .fields import Config, ConfigError, flag, spelling_is
from .experiment_configs import EXPERIMENTS
from .runlock import LOCK, RunDirLock, holder

log = logging.getLogger(__name__)

__all__ = ["RESUMED", "Record", "RunDirLock", "Session", "Unit", "check_new_run_dir", "claim_run_dir",
           "last_settings", "read_config", "read_rows", "session", "start_run"]

CONFIG, RUN, METRICS, CHECKPOINTS = "config.json", "run.json", "metrics.jsonl", "checkpoints"


def _load_json(path: Path) -> Any:
    """``path``'s JSON; ValueError for text that is not JSON, nested too deep included."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:  # json's parser recurses once per nesting level
        raise ValueError("nested too deeply") from None


def read_config(run_dir: Path) -> Config:
    """The config stored in ``run_dir``, checked as strictly as one from the command line."""
    path = run_dir / CONFIG
    if not run_dir.exists():
        raise ConfigError(f"{run_dir} does not exist; give the folder of a run (bnlab prints it "
                          "when the run starts and ends)")
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (it holds no {CONFIG})")
    try:
        stored = _load_json(path)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are too
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("experiment"), str):
        raise ConfigError(f"{path} does not name a bnlab experiment (expected a JSON object "
                          f"with \"experiment\": one of {', '.join(EXPERIMENTS)})")
    if stored["experiment"] not in EXPERIMENTS:
        how = ("import that module first" if spelling_is("python")
               else "pass that module with bnlab --import MODULE")
        raise ConfigError(f"{path} holds a run of the experiment {stored['experiment']!r}, "
                          f"which is not registered (bnlab's own are {', '.join(EXPERIMENTS)}); "
                          f"an experiment of your own is registered by the module that defines "
                          f"it: {how}")
    return EXPERIMENTS[stored.pop("experiment")].from_dict(stored, source=str(path))


def check_new_run_dir(run_dir: Path, config: Config | None = None) -> None:
    """Check that ``run_dir`` can hold a new run of ``config``, without creating anything."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise ConfigError(f"{flag('out')} {run_dir} is a link to {os.readlink(run_dir)}, which does not "
                          "exist; remove the link or create its target, or choose another "
                          f"{flag('out')}")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{flag('out')} {run_dir} exists and is not a folder; choose another "
                          f"{flag('out')}")
    if run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir()):
        raise _taken(run_dir, config)
    parent = next((p for p in run_dir.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(f"{flag('out')} {run_dir}: {parent} is a file, not a folder")


def _taken(run_dir: Path, config: Config | None) -> ConfigError:
    """``run_dir`` holds files: --resume is the advice only where they are a run of the same
    configuration, never for someone else's run."""
    busy = holder(run_dir)
    if busy:
        return ConfigError(f"{flag('out')} {run_dir} is in use by {busy}, a run going there now; wait "
                           f"for it to finish, or choose another {flag('out')}")
    try:
        stored = read_config(run_dir)
    except ConfigError:
        stored = None
    if stored is not None and config is not None and stored.name == config.name \
            and stored.digest() == config.digest():
        return ConfigError(f"{run_dir} already holds a {stored.name} run of this configuration; "
                           f"continue it with --resume {run_dir}, or choose another {flag('out')}")
    held = f"a {stored.name} run of another configuration" if stored else "files"
    return ConfigError(f"{flag('out')} {run_dir} already holds {held}; choose another "
                       f"{flag('out')}")


def new_run_dir(config: Config) -> tuple[Path, list[Path]]:
    """A new folder ``runs/NAME-DATASET-TIMESTAMP`` under the current folder, made now (with
    -2, -3, ... when one of that name exists: see :func:`claim_run_dir`), and the folders
    made for it, innermost first, for :func:`unclaim`."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    runs = Path("runs")
    made = [] if runs.is_dir() else [runs]
    run_dir = claim_run_dir(runs / f"{config.name}-{config.dataset}-{stamp}")
    return run_dir, [run_dir, *made]


def unclaim(made: list[Path]) -> None:
    """Remove the folders :func:`new_run_dir` made for a run that never started (one that
    holds a run stays; the lock removes its own file, and one another process holds keeps
    the folder)."""
    if not made or (made[0] / CONFIG).exists():
        return
    for path in made:
        try:
            path.rmdir()
        except OSError:  # gone already, or not empty
            pass


def claim_run_dir(base: Path) -> Path:
    """Create and return a new, empty folder named ``base``, or ``base-2``, ``base-3``, ... if
    that name is taken: ``mkdir`` fails on an existing name, so processes started at the same
    moment never share one."""
    above = next((p for p in base.parents if p.exists()), Path("."))
    if not above.is_dir():
        raise ConfigError(f"{above} is a file, where bnlab keeps its runs in a folder of that "
                          f"name; move it, or choose where the run goes with {flag('out')}")
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"{base} and 9999 numbered names beside it are taken; choose an "
                      f"{flag('out')}")


def start_run(run_dir: Path, config: Config) -> None:
    """Write a new run's ``config.json`` and empty ``metrics.jsonl``; call it holding the
    lock. The folder is checked again here: another process may have started a run in it
    since it was checked unlocked. An existing ``config.json`` is never replaced."""
    check_new_run_dir(run_dir, config)
    stored = {"experiment": config.name, **config.to_dict()}
    try:
        write_json(run_dir / CONFIG, stored, exclusive=True)
    except FileExistsError:
        raise _taken(run_dir, config) from None
    with open(run_dir / METRICS, "xb"):  # rows are appended from here on
        pass


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


GPU_CODE = "cuda"  # the code of rows computed on a GPU (bn_code)


def bn_code(device: str = "cpu") -> str:
    """Which code computes the lab's numbers in this process: on the CPU, bnlab's BatchNorm
    in ``"compiled kernels"`` or in ``"torch ops"``; on a GPU (``device`` of type cuda),
    :data:`GPU_CODE`. They agree to float tolerance, not bit for bit, so a run keeps one on
    one device (a resume keeps the device unless told otherwise)."""
    from bnlab.nn import kernels

    if device.split(":")[0] == "cuda":
        return GPU_CODE
    return "compiled kernels" if kernels.available() else "torch ops"


# the session settings a resume takes from the last session unless told otherwise: where the
# data lies, how many processes train each network, where TensorBoard's files go, the device
RESUMED = ("data_dir", "nproc", "tensorboard", "device")


def last_settings(run_dir: Path) -> dict[str, Any]:
    """The session settings of the run's last session that recorded them ({} if none did, or
    run.json cannot be read: a resume then starts from the defaults)."""
    try:
        sessions = _load_json(run_dir / RUN)["sessions"]
        return next(s["settings"] for s in reversed(sessions)
                    if isinstance(s, dict) and isinstance(s.get("settings"), dict))
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return {}


def _recorded_code(sessions: list) -> str | None:
    """The code that computed the last recorded rows: the last session's that names one
    (runs recorded before ``code`` existed: from its ``kernels`` description)."""
    for s in reversed(sessions):
        if not isinstance(s, dict):
            continue
        if s.get("code") in ("compiled kernels", "torch ops", GPU_CODE):
            return s["code"]
        if s.get("code") is None and isinstance(s.get("kernels"), str) and "code" not in s:
            return "torch ops" if s["kernels"].startswith("off") else "compiled kernels"
    return None


def _other_code(run_dir: Path, recorded: str, during: bool) -> ConfigError:
    """The one-line refusal to compute a run's rows with other code than its recorded ones."""
    from bnlab.nn import kernels

    if recorded == "torch ops":
        return ConfigError(f"{run_dir} is computed with the torch ops (bnlab's compiled BatchNorm "
                           "kernels off), but the kernels are on here and would change its "
                           "numbers from here on: resume it with BNLAB_KERNELS=0 set")
    reason = " ".join(str(kernels.unavailable_reason()).split())[:160]
    how = ("resume it without BNLAB_KERNELS=0" if "BNLAB_KERNELS" in reason else
           "install numba and resume" if "not importable" in reason else
           "clear Numba's cache (the __pycache__ folder in bnlab/nn, or NUMBA_CACHE_DIR) and resume")
    state = "stopped working in this session" if during else "are off here"
    return ConfigError(f"{run_dir} is computed with bnlab's compiled BatchNorm kernels, which "
                       f"{state} ({reason}); the torch ops would change its numbers from here on: "
                       f"{how}, or start a new run")


class Session:
    """This process's work in ``run.json``: versions, threads, the device (``device``, and
    a GPU's name), start date, the BatchNorm code (``kernels``: its description; ``code``:
    see :func:`bn_code`), wall time and whether it finished. The entry is written when the
    session starts and its wall time kept current (every ``EVERY`` seconds, as rows are
    written), so a process killed outright leaves about how long it ran. The rows of a run
    computed on one device are computed by one code: :meth:`check_code` refuses another,
    before a row is written. A session on another device than the last rows' was asked for
    (a resume keeps the device unless told otherwise): its code takes over from there.

    ``device``: where this session computes, a :class:`torch.device` (default the CPU)."""

    EVERY = 5.0

    def __init__(self, run_dir: Path, threads: int, settings: dict[str, Any] | None = None,
                 device: Any = None) -> None:
        import torch

        import bnlab
        from . import device as devices

        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.run_dir, self.path = run_dir, run_dir / RUN
        try:
            self.info = _load_json(self.path) if self.path.is_file() else {"sessions": []}
            assert isinstance(self.info, dict) and isinstance(self.info.get("sessions"), list)
        except (ValueError, AssertionError, OSError):
            raise ConfigError(f"{self.path} is damaged; delete it (it holds provenance, and "
                              "which BatchNorm code computed the run) and resume again") from None
        self.code = _recorded_code(self.info["sessions"])  # of the rows recorded so far
        if self.code is not None and (self.code == GPU_CODE) != (self.device.type == "cuda"):
            self.code = None  # rows go on on another device, as asked: its code from here
        self.entry = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "seconds": 0.0, "bnlab": bnlab.__version__, "torch": torch.__version__,
                      "python": platform.python_version(), "threads": threads,
                      **devices.describe(self.device), "kernels": self._kernels(),
                      "code": None, "finished": False, "settings": settings or {}}
        self._lock = threading.Lock()  # rows come from several threads
        self._t0 = self._saved = time.monotonic()

    def _kernels(self) -> str:
        """The description of the code computing BatchNorm here (``kernels``)."""
        from bnlab.nn import kernels

        from .device import gpu_code

        return gpu_code(self.device) if self.device.type == "cuda" else kernels.describe()

    def start(self) -> None:
        """Refuse other code than the recorded rows', and record this session."""
        if self.code is not None and bn_code(self.device.type) != self.code:
            raise _other_code(self.run_dir, self.code, during=False)
        self.info["sessions"].append(self.entry)
        self._write()

    def check_code(self) -> None:
        """Before a row is written: the code computing it is the run's (the first row of a
        run fixes it); the wall time is brought up to date now and then."""
        code = bn_code(self.device.type)
        with self._lock:
            if self.code is None or self.entry["code"] is None:
                if self.code is not None and code != self.code:
                    raise _other_code(self.run_dir, self.code, during=True)
                self.code = self.entry["code"] = code
                self._write()
            elif code != self.code:
                raise _other_code(self.run_dir, self.code, during=True)
            elif time.monotonic() - self._saved >= self.EVERY:
                self._write()

    def end(self, finished: bool) -> None:
        with self._lock:
            self.entry["finished"] = finished
            self._write()

    def _write(self) -> None:
        self._saved = time.monotonic()
        self.entry["seconds"] = round(self._saved - self._t0, 3)
        if self.device.type != "cuda":  # the threading layer, once one started
            self.entry["kernels"] = self._kernels()
        write_json(self.path, self.info)


@contextmanager
def session(run_dir: Path, threads: int, settings: dict[str, Any] | None = None,
            device: Any = None) -> Iterator[Session]:
    """A :class:`Session` for the duration of the block, ended as finished when the block
    completes. ``settings``: the session's own options (where the data lay, processes,
    workers, the device), which a resume takes up again unless it is given others;
    ``device``: where it computes (a :class:`torch.device`; default the CPU)."""
    s = Session(run_dir, threads, settings, device)
    s.start()
    finished = False
    try:
        yield s
        finished = True
    finally:
        try:
            s.end(finished)
        except OSError:  # a full disk must not hide the error that ended the run
            if finished:
                raise


def _row(line: bytes) -> dict | None:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
        return None
    ok = isinstance(row, dict) and isinstance(row.get("unit"), str) and "config" in row
    return row if ok else None


def read_rows(path: Path, digest: str | None = None, repair: bool = False,
              missing_ok: bool = False) -> list[dict]:
    """The rows of ``metrics.jsonl`` (none for a missing file with ``missing_ok``). A last line
    cut short by a crash is skipped (with ``repair``, cut off, and a whole last row given its
    newline, so the next row starts on a line of its own); any other bad line is an error
    naming it, as is a row repeated or following its unit's ``done`` row (a unit counts its
    recorded rows to resume). With ``digest``, a row computed under another config is an
    error: config.json was edited after the run started."""
    if not path.is_file():
        if path.exists() or path.is_symlink() or not missing_ok:
            raise _no_record(path)
        return []
    data = path.read_bytes()
    lines, rows = data.split(b"\n"), []
    if repair and data and not data.endswith(b"\n"):
        whole = _row(lines[-1]) is not None
        with open(path, "ab") as fh:
            fh.truncate(len(data) if whole else len(data) - len(lines[-1]))
            fh.write(b"\n" if whole else b"")
    seen: dict[str, int] = {}  # each row, canonically, at its first line
    ended: dict[str, int] = {}  # each finished unit at its "done" row's line
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
        _check_once(path, i, row, seen, ended)
        rows.append(row)
    return rows


def _no_record(path: Path) -> ConfigError:
    what = "is not a file" if path.exists() or path.is_symlink() else "is missing"
    return ConfigError(f"{path} {what}: the run's record of measurements is lost; restore "
                       "it, or start a new run")


def _check_once(path: Path, i: int, row: dict, seen: dict[str, int], ended: dict[str, int]) -> None:
    """Refuse row ``i`` if it repeats an earlier row or follows its unit's last one: no run
    writes either, and a resumed unit would skip as many real rows."""
    unit, key = row["unit"], json.dumps(row, sort_keys=True)
    if key in seen:
        raise ConfigError(f"{path}: line {i} repeats line {seen[key]} (unit {unit}); the record "
                          f"is damaged: delete line {i} if it is a copy, or restore the file")
    if unit in ended:
        raise ConfigError(f"{path}: line {i} follows the last row of unit {unit} (line "
                          f"{ended[unit]}); the record is damaged: restore it, or start a new run")
    seen[key] = i
    if row.get("done"):
        ended[unit] = i


class Record:
    """The rows of a run, read once, and appended to by its units.

    ``listeners``: callables given each row appended from then on, once it is durably
    written, as ``metrics.jsonl`` holds it (non-finite floats as None), a unit's last row
    (``"done": true``) included; rows recorded by an earlier session are never given again.
    They are called one at a time, in the thread that wrote the row. A listener that raises
    is logged once and dropped: the run goes on without it (a row is recorded all the same).
    """

    def __init__(self, run_dir: Path, config: Config) -> None:
        self.run_dir, self.digest = run_dir, config.digest()
        self.path = run_dir / METRICS
        # without checkpoints nothing depends on recorded rows: a run stopped before its
        # first row may have no record yet (runs started before bnlab created it at once)
        saved = (run_dir / CHECKPOINTS).is_dir() and any((run_dir / CHECKPOINTS).glob("*.pt"))
        self.rows = read_rows(self.path, self.digest, repair=True, missing_ok=not saved)
        self.counts = Counter(r["unit"] for r in self.rows)
        self.done = {r["unit"] for r in self.rows if r.get("done")}
        self.order: dict[str, int] = {}  # unit keys in the order the experiment created them
        self.session: Session | None = None  # checks the code computing each row
        self.listeners: list[Callable[[dict], Any]] = []
        self._telling = threading.Lock()  # rows come from several threads

    def append(self, row: dict) -> None:
        if self.session is not None:
            self.session.check_code()
        # A listener gets every recorded row: an interrupt between the write and the telling
        # would leave a row recorded and never told (a resume tells none of the rows it
        # finds), so it waits till both are done. It reaches the main thread only; rows
        # appended by worker threads are done before their next step, where they stop.
        held = signals.held() if self.listeners and signals.on_main_thread() \
            else contextlib.nullcontext()
        with held:
            try:  # one whole line per write: rows of threads side by side never mix
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(dumps_row(row))
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                exc.filename = exc.filename or str(self.path)  # a full disk names the file
                raise
            if self.listeners:
                self._tell(finite(row))

    def _tell(self, row: dict) -> None:
        """Give ``row`` to every listener; one that fails is dropped (training must not stop
        for a view of its rows)."""
        with self._telling:
            for listener in list(self.listeners):
                try:
                    listener(row)
                except Exception:  # noqa: BLE001  whatever it raised, the run goes on
                    log.warning("%r failed on a row of unit %s and is given no more rows; the "
                                "run goes on, its rows are recorded in %s", listener,
                                row.get("unit"), self.path, exc_info=True)
                    self.listeners.remove(listener)

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


def unit_key(fields: dict[str, Any]) -> str:
    """The name of the unit of ``fields`` in the record: ``bn-seed0``, ``scale0.1-none-seed2``."""
    return "-".join(f"{v}" if k == "norm" else f"{k}{v}" for k, v in fields.items())


class Unit:
    """One trained network or sweep point: writes its rows, saves and loads its state."""

    def __init__(self, record: Record, fields: dict[str, Any]) -> None:
        self.record, self.fields = record, fields
        self.key = unit_key(fields)
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
        """Save ``state`` (tensors on any device) as the unit's checkpoint, in CPU tensors:
        it loads on any machine, and the run continues on any device."""
        import torch

        from .device import to_cpu

        buf = io.BytesIO()
        torch.save({**to_cpu(state), "rows": self.written}, buf)
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
