"""``bnlab`` and ``python -m bnlab``. Loading the command line takes a moment; a Ctrl-C even
then ends in one line, not a traceback. Once the command has ended, signals are ignored and
stdout and stderr are settled, so the interpreter's exit can change neither the message nor
the exit code. The process then ends at once: the exit handlers run, but the interpreter
does not tear down its modules one by one (with torch loaded that took 0.6 s of every
command, and everything bnlab wrote is already closed and on disk), unless the user's own
modules were imported (``--import``)."""

import atexit
import os
import signal
import sys


def main() -> int:
    try:
        from bnlab.cli import main as cli_main

        code = cli_main()
    except KeyboardInterrupt as exc:
        _say("bnlab: interrupted")
        code = 128 + getattr(exc, "signum", int(signal.SIGINT))
    _settle()
    return code


def run() -> None:
    """The console script: :func:`main`, then the exit handlers (``atexit``: logging's
    flush among them), then the end of the process without the interpreter's teardown;
    the usual exit where the user's own modules were imported (``--import``), whose open
    files only the teardown may flush and close."""
    code = main()
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    cli = sys.modules.get("bnlab.cli")
    if run_exit_handlers is None or cli is None or getattr(cli, "IMPORTED", None):
        sys.exit(code)  # not CPython, the command line not loaded, or the user's modules
    run_exit_handlers()
    _settle()
    os._exit(code)


def _say(text: str) -> None:
    try:
        if sys.stderr is not None:
            print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _settle() -> None:
    """Ignore further signals and flush the standard streams (one that fails goes to the
    null device): the interpreter's exit, which joins threads and flushes, must not be cut
    into a traceback by a late Ctrl-C, nor turn a failed flush into exit code 120."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            from bnlab._io import silence

            silence(stream)


if __name__ == "__main__":
    run()
