"""Progress shown by the ``bnlab`` command: one line on stderr, redrawn in place."""

from __future__ import annotations

import collections
import os
import shutil
import sys
import time

__all__ = ["ProgressBar"]


class ProgressBar:
    """One line of progress on stderr, fitted to the terminal and redrawn in place (on a pipe
    or log: a line every 10% or 30 s). The ETA comes from the pace over the last ``window``
    seconds, so a slow first step does not skew it."""

    def __init__(self, stream=None, window: float = 30.0) -> None:
        self.stream = stream or sys.stderr or open(os.devnull, "w")  # stderr may be closed
        self.tty = self.stream.isatty()
        self.start, self.window = time.monotonic(), window
        self.recent: collections.deque = collections.deque()
        self.last_draw, self.last_decile, self.ended = 0.0, -1, False

    def __call__(self, done: int, total: int, note: str) -> None:
        now, final, decile = time.monotonic(), done >= total, 10 * done // max(total, 1)
        self.recent.append((now, done))
        while len(self.recent) > 2 and now - self.recent[0][0] > self.window:
            self.recent.popleft()
        wait = 0.2 if self.tty else (30 if decile == self.last_decile else 0)
        if not final and now - self.last_draw < wait:
            return
        self.last_draw, self.last_decile, self.ended = now, decile, final
        t0, d0 = self.recent[0]
        rate = (done - d0) / (now - t0) if now > t0 and done > d0 else 0.0
        eta = "done" if final else f"~{_clock((total - done) / rate)} left" if rate else ""
        columns = shutil.get_terminal_size((80, 20)).columns - 1 if self.tty else 100
        text = f" {100 * done / max(total, 1):5.1f}%  {_clock(now - self.start)}  {eta}  {note}"
        width = max(0, min(30, columns - len(text) - 2))
        filled = int(width * done / max(total, 1))
        line = ((f"[{'#' * filled}{'-' * (width - filled)}]" if width else "") + text)[:columns]
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r" + line.ljust(columns) if self.tty else line) + end)
        self.stream.flush()

    def close(self) -> None:
        if self.tty and not self.ended:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
