"""Progress of a run: one line on stderr, redrawn in place, for the ``bnlab`` command and a
terminal; a bar under the cell in a Jupyter notebook (:func:`display` picks)."""

from __future__ import annotations

import collections
import html
import logging
import os
import shutil
import sys
import threading
import time
import weakref
from typing import Any

__all__ = ["NotebookProgress", "ProgressBar", "display", "in_notebook"]

KERNELS_LOG = "bnlab.nn._kernels"  # its records with a ``progress_status`` say what runs now
ETA_AFTER = 3.0  # seconds of steady work, and
ETA_SHARE = 0.01  # share of the work, before a time left is estimated
ETA_WIDTH = len("~0:00:00 left")
PAUSE_MIN, PAUSE_CPU = 30.0, 0.05  # a gap of this many seconds between updates in which the
#                                    process used less than this share of one core's time (it
#                                    was stopped, not working: a long evaluation computes)
#                                    restarts the pace
NOTE_MIN = 24  # characters kept for the note before the bar narrows


class _Display:
    """What every progress display shows, whatever it draws on: the share of the work done,
    the time since it started, the time left, and the note (what is being worked on).

    The time left comes from the pace over the last ``window`` seconds of work, weighted by
    each step's cost when the :class:`~bnlab.lab.train.Progress` it follows gives one; it is
    left blank until ``ETA_AFTER`` seconds and ``ETA_SHARE`` of the work give a pace worth
    reading, and the pace restarts after a pause the log announces (compiling kernels),
    which says what it waits for in the meantime. A subclass draws in :meth:`_draw`."""

    def __init__(self, window: float = 120.0) -> None:
        self.start, self.window = time.monotonic(), window
        self.recent: collections.deque = collections.deque()  # (time, share done)
        self.paced: tuple[float, float] | None = None  # where the pace was last (re)started
        self.cpu = time.process_time()  # the process's CPU time at the last update
        self.last_draw, self.ended = -float("inf"), False  # draw at once
        self.progress: Any = None  # the Progress followed, for its weighted work
        self.status = ""  # what the work waits for now, shown in place of the time left
        self.state = (0, 0, "")  # the last (done, total, note)
        self._lock = threading.RLock()
        _STATUS.attach(self)

    def follow(self, progress: Any) -> None:
        """Read the cost-weighted work (``work_done``, ``work_total``) of ``progress``."""
        self.progress = progress

    def __call__(self, done: int, total: int, note: str) -> None:
        with self._lock:
            self.state = (done, total, note)
            self._draw(force=False)

    def set_status(self, status: str) -> None:
        """Show ``status`` (e.g. "compiling BatchNorm kernels") until it is cleared with "";
        clearing it restarts the pace, so the pause does not count against the time left."""
        with self._lock:
            if status == self.status:
                return
            self.status = status
            if not status:
                self.recent.clear()
                self.paced = None
            self._draw(force=True)

    def close(self) -> None:
        """Stop showing the kernels' log."""
        _STATUS.detach(self)

    def _draw(self, force: bool) -> None:
        raise NotImplementedError

    def _pace(self, now: float) -> tuple[float, bool]:
        """(share of the work done, final?), recorded for the pace. A long gap in which the
        process did not compute (it was stopped: kill -STOP, Ctrl-Z) restarts the pace, as an
        announced pause does: the work before it says nothing of the pace after it."""
        share, final = self._fraction()
        cpu = time.process_time()
        if self.recent and now - self.recent[-1][0] > PAUSE_MIN \
                and cpu - self.cpu < PAUSE_CPU * (now - self.recent[-1][0]):
            self.recent.clear()  # a long gap with the process idle: it was stopped
            self.paced = None
        self.cpu = cpu
        self.recent.append((now, share))
        self.paced = self.paced or (now, share)
        while len(self.recent) > 2 and now - self.recent[0][0] > self.window:
            self.recent.popleft()
        return share, final

    def _fraction(self) -> tuple[float, bool]:
        """(share of the work done, final?)."""
        done, total, _ = self.state
        p = self.progress
        if p is not None and p.work_total > 0:
            return min(1.0, p.work_done / p.work_total), done >= total > 0
        return min(1.0, done / max(total, 1)), done >= total > 0

    def _fields(self, now: float, share: float) -> str:
        """The share done and the time since the start, each of a fixed width."""
        return f"{100 * share:5.1f}%  {_clock(now - self.start):>7}"

    def _time_left(self, now: float, share: float, final: bool) -> str:
        """"done", the status the work waits on, the estimated time left, or "" (too early)."""
        return "done" if final else self.status or self._eta(now, share)

    def _eta(self, now: float, share: float) -> str:
        if now - self.paced[0] < ETA_AFTER or share - self.paced[1] < ETA_SHARE:
            return ""
        t0, s0 = self.recent[0]
        return f"~{_clock(round((1 - share) * (now - t0) / (share - s0)))} left" if share > s0 else ""


class ProgressBar(_Display):
    """One line of progress on stderr, fitted to the terminal and redrawn in place (on a pipe
    or log: a line every 10% or 30 s). Every field has a fixed width, so the line does not
    jitter as notes change; the time left is :class:`_Display`'s.

    Drawing never stops the work: a stream that fails (a full disk, a closed pipe) leaves
    the bar quiet for the rest of the run."""

    def __init__(self, stream=None, window: float = 120.0) -> None:
        self.stream = stream or sys.stderr or open(os.devnull, "w")  # stderr may be closed
        self.quiet = False
        try:
            self.tty = self.stream.isatty()
        except (OSError, ValueError):
            self.tty = False
        self.last_decile = -1
        super().__init__(window)

    def _draw(self, force: bool) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        share, final = self._pace(now)
        decile = int(10 * share)
        wait = 0.2 if self.tty else (30 if decile == self.last_decile else 0)
        if not (final or force) and now - self.last_draw < wait:
            return
        self.last_draw, self.last_decile, self.ended = now, decile, final
        self._write(self._line(now, share, final))

    def _line(self, now: float, share: float, final: bool) -> str:
        eta = self._time_left(now, share, final)
        columns = shutil.get_terminal_size((80, 20)).columns - 1 if self.tty else 100
        fields = f" {self._fields(now, share)}  "
        width = max(0, min(30, columns - len(fields) - ETA_WIDTH - 2 - NOTE_MIN - 2))
        bar = f"[{'#' * int(width * share)}{'-' * (width - int(width * share))}]" if width else ""
        if len(eta) > ETA_WIDTH:  # a status: it takes the note's place too
            line = f"{bar}{fields}{eta}"
        else:
            line = f"{bar}{fields}{eta:<{ETA_WIDTH}}  {self.state[2]}"
        return line[:columns]

    def _write(self, line: str) -> None:
        columns = shutil.get_terminal_size((80, 20)).columns - 1 if self.tty else 0
        end = "\n" if self.ended or not self.tty else ""
        try:
            self.stream.write(("\r" + line.ljust(columns) if self.tty else line.rstrip()) + end)
            self.stream.flush()
        except (OSError, ValueError):  # a full disk, a closed pipe or stream: go quiet
            self.quiet = True

    def close(self) -> None:
        """End the line and stop showing the kernels' log."""
        super().close()
        with self._lock:
            if self.tty and not self.ended and not self.quiet:
                self.ended = True
                self._write_raw("\n")

    def _write_raw(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.quiet = True


class NotebookProgress(_Display):
    """Progress under a Jupyter notebook's cell: a progress bar with the share done, the time
    since the start, the time left (as :class:`ProgressBar` estimates it) and the note, drawn
    as HTML through IPython's display and redrawn in place, at most every ``INTERVAL``
    seconds (and at the end). Needs IPython only; drawing that fails leaves it quiet, and the
    work goes on."""

    INTERVAL = 0.25  # seconds between redraws: a notebook's front end is slow to redraw

    def __init__(self, window: float = 120.0) -> None:
        from IPython.display import HTML, display

        self._html, self._display = HTML, display
        self.handle: Any = None
        self.quiet = False
        super().__init__(window)
        with self._lock:
            self._draw(force=True)  # the display appears under the cell that runs

    def _draw(self, force: bool) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        share, final = self._pace(now)
        if not (final or force) and now - self.last_draw < self.INTERVAL:
            return
        self.last_draw, self.ended = now, final
        self._show(self._markup(now, share, final))

    def _markup(self, now: float, share: float, final: bool) -> str:
        text = "  ".join(filter(None, [self._fields(now, share),
                                       self._time_left(now, share, final), self.state[2]]))
        return (f'<div style="font-family:monospace;white-space:pre">'
                f'<progress value="{share:.4f}" max="1" style="width:24ch;vertical-align:middle">'
                f'</progress> {html.escape(text)}</div>')

    def _show(self, markup: str) -> None:
        try:
            if self.handle is None:
                self.handle = self._display(self._html(markup), display_id=True)
            else:
                self.handle.update(self._html(markup))
        except Exception:  # noqa: BLE001  a front end gone or failing must not stop the work
            logging.getLogger(__name__).debug("notebook progress failed", exc_info=True)
            self.quiet = True

    def close(self) -> None:
        """Draw the last state, and stop showing the kernels' log."""
        super().close()
        with self._lock:
            self._draw(force=True)


def in_notebook() -> bool:
    """Whether this process is a Jupyter (IPython) kernel. IPython is not imported for it:
    a kernel has imported it already."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    try:
        return get is not None and getattr(get(), "kernel", None) is not None
    except Exception:  # noqa: BLE001  a broken IPython is no kernel to draw in
        return False


def display(stream=None) -> _Display:
    """The progress display for where this process runs: :class:`NotebookProgress` in a
    Jupyter kernel, else a :class:`ProgressBar` on ``stream`` (stderr)."""
    return NotebookProgress() if in_notebook() else ProgressBar(stream)


class _StatusHandler(logging.Handler):
    """Shows the kernels' log records that carry a ``progress_status`` on the open bars. One
    handler serves every bar: it is installed when the first bar opens and removed, with the
    log's level and propagation as they were, when the last one closes (bars that overlap
    leave it as they found it; a bar must be closed for that). Meanwhile the
    kernels' INFO records are enabled; where the log would not have shown them, they stop
    here (printed by the log's own handlers they would cut through the bar), and records at
    the level it shows go on to it as before."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.logger = logging.getLogger(KERNELS_LOG)
        self.bars: weakref.WeakSet[_Display] = weakref.WeakSet()
        self.saved = (self.logger.level, self.logger.propagate)
        self.shown = self.logger.getEffectiveLevel()
        self.guard = threading.Lock()

    def attach(self, bar: _Display) -> None:
        with self.guard:
            if self not in self.logger.handlers:
                self.saved = (self.logger.level, self.logger.propagate)
                self.shown = self.logger.getEffectiveLevel()  # what the log shows without bars
                if self.shown > logging.INFO:
                    self.logger.setLevel(logging.INFO)
                    self.logger.propagate = False
                self.logger.addHandler(self)
            self.bars.add(bar)

    def detach(self, bar: _Display) -> None:
        with self.guard:
            self.bars.discard(bar)
            if not self.bars and self in self.logger.handlers:
                self.logger.removeHandler(self)
                self.logger.setLevel(self.saved[0])
                self.logger.propagate = self.saved[1]

    def emit(self, record: logging.LogRecord) -> None:
        status = getattr(record, "progress_status", None)
        if status is not None:
            for bar in list(self.bars):
                bar.set_status(status)
        if not self.logger.propagate and self.saved[1] and record.levelno >= self.shown \
                and self.logger.parent is not None:
            self.logger.parent.handle(record)


_STATUS = _StatusHandler()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
