"""``bnlab`` and ``python -m bnlab``. Loading the command line takes a moment; a Ctrl-C even
then ends in one line, not a traceback. Once the command has ended, signals are ignored and
stdout and stderr are settled, so the interpreter's exit can change neither the message nor
the exit code."""

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
    raise SystemExit(main())
