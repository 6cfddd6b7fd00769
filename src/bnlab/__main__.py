"""``bnlab`` and ``python -m bnlab``. Loading the command line takes a moment; a Ctrl-C even
then ends in one line, not a traceback."""

import sys


def main() -> int:
    try:
        from bnlab.lab.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        print("bnlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
