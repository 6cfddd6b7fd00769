"""How a bnlab process stops: Ctrl-C (SIGINT), SIGTERM and SIGHUP alike.

The first of them raises :class:`Interrupted` in the main thread; the command then saves
what it finished, releases the run directory and says in one line how to continue. Further
signals are ignored from then on: a second Ctrl-C pressed in impatience would otherwise cut
that cleanup short, or the interpreter's exit, into a traceback. The process ends with code
128 + the signal's number (130 for Ctrl-C), as a shell reports a process a signal ended.

While :func:`held` is in force (importing torch, NumPy, Numba or matplotlib, whose
extension modules turn an interrupt during their initialisation into an ImportError or an
abort), a signal waits and is raised when the block ends.

Nothing here runs at import: :func:`install` routes the signals, :func:`restore` gives back
what was there.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

__all__ = ["Interrupted", "exit_code", "held", "ignore", "install", "on_main_thread",
           "restore"]

STOPS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
              if hasattr(signal, name))
_state = {"holding": 0, "pending": None, "raised": False}


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by signal ``signum``."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def exit_code(exc: BaseException) -> int:
    """128 + the signal's number; a KeyboardInterrupt raised otherwise counts as Ctrl-C."""
    return 128 + getattr(exc, "signum", int(signal.SIGINT))


def _handler(signum: int, frame: Any) -> None:
    if _state["raised"]:
        return  # stopping already: let it finish
    if _state["holding"]:
        _state["pending"] = _state["pending"] or signum
        return
    _state["raised"] = True
    raise Interrupted(signum)


def on_main_thread() -> bool:
    """Whether this is the main thread, the one the signals reach."""
    return threading.current_thread() is threading.main_thread()



def install() -> dict[int, Any]:
    """Route SIGINT, SIGTERM and SIGHUP to this module; returns the handlers they had (for
    :func:`restore`). Where they were routed here already, the state carries on (a second
    stop after the first is still ignored). A signal ignored when bnlab started stays
    ignored: ``nohup`` ignores SIGHUP, a shell ignores SIGINT for a job it puts in the
    background, and the run must survive what they meant it to."""
    if not on_main_thread():  # only the main thread may set handlers; it gets the signals
        return {}
    previous = {sig: h for sig in STOPS if (h := signal.getsignal(sig)) is not signal.SIG_IGN}
    if any(h is not _handler for h in previous.values()):
        _state.update(holding=0, pending=None, raised=False)
    for sig in previous:
        signal.signal(sig, _handler)
    return previous


def restore(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def ignore() -> None:
    """Ignore the signals from now on: the process is ending and must end as it decided."""
    _state["raised"] = True


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold the signals while the block runs; one that arrived is raised when it ends."""
    previous = install() if on_main_thread() and signal.getsignal(signal.SIGINT) is not _handler \
        else None
    _state["holding"] += 1
    try:
        yield
    finally:
        _state["holding"] -= 1
        pending = _state["pending"]
        if previous is not None:
            restore(previous)
    if not _state["holding"] and pending is not None and not _state["raised"]:
        _state["pending"] = None
        if previous is None:  # our handler stays: stopping now, later ones are ignored
            _state["raised"] = True
        raise Interrupted(pending)
