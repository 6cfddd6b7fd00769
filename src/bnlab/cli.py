"""The ``bnlab`` command line, generated from the experiments' config classes.

    bnlab run NAME [options]       an experiment (bnlab run --help lists them); --full for
                                   its documented full setting; --resume DIR to continue one
    bnlab compare [options]        short for bnlab run compare
    bnlab report RUN_DIR...        rebuild a run's summary, figures and report.html
    bnlab export RUN_DIR --csv DIR | --tensorboard DIR
                                   a run's measurements as CSV or TensorBoard files
    bnlab download NAME            fetch MNIST or Fashion-MNIST into bnlab's cache
    bnlab bench                    time bnlab's BatchNorm against torch.nn's
                                   (bench lab: the lab against a plain loop;
                                   bench resnet: a ResNet training step)

    bnlab --import MODULE[,MODULE] COMMAND ...
                                   import one's own modules first (also BNLAB_IMPORT):
                                   the norms, models and experiments they register are
                                   options and subcommands like bnlab's own

Heavy modules (torch, matplotlib, scipy) are imported only by the command that needs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
import traceback
import re
import typing
from pathlib import Path
from typing import Any, Sequence

import bnlab
from bnlab._io import silence
from bnlab.lab import signals
from bnlab.lab.fields import DATASETS, PARSE, SESSION_FIELDS, Config, ConfigError, flag
from bnlab.lab.experiment_configs import Experiment, experiment, experiments
from bnlab.lab.model_registry import describe_models
from bnlab.lab.norms import describe_norms
from bnlab.lab.data import DataError
from bnlab.lab.progress import ProgressBar
from bnlab.lab.rundir import read_config, unclaim

__all__ = ["main"]

UNSET = object()  # what "--n-train all" parses to: given, and None in the config
IMPORT_ENV = "BNLAB_IMPORT"  # modules imported before every command, comma-separated
IMPORTED: list[str] = []  # the user's modules this process imported (--import, BNLAB_IMPORT)
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

class _Parser(argparse.ArgumentParser):
    """Usage errors end in one line that says where to look, exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parse_as(typ: Any):
    """An argparse type for a config field's annotation (comma-separated lists for tuples)."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) is tuple:
        item = _parse_as(args[0])
        parse = lambda text: tuple(item(v.strip()) for v in text.split(",") if v.strip())  # noqa: E731
        parse.__name__ = f"comma-separated {item.__name__}"
        return parse
    if type(None) in args:  # X | None: "all" or "none" unsets it
        inner = _parse_as(next(a for a in args if a is not type(None)))
        parse = lambda text: UNSET if text.strip().lower() in ("all", "none") else inner(text)  # noqa: E731
        parse.__name__ = inner.__name__
        return parse
    return PARSE.get(typ, typ)


def _path(text: str) -> Path:
    """A path option: an empty one would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (give a folder or file name)")
    return Path(text)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def _listed(items: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return " and ".join(filter(None, [", ".join(items[:-1]), items[-1]]))


def _add_experiment(sub, entry: Experiment, name: str) -> None:
    cls = entry.config
    p = sub.add_parser(name, help=entry.summary, description=entry.summary)
    defaults, hints = cls(), typing.get_type_hints(cls)
    names = {"norms": describe_norms, "model": describe_models}  # as registered now
    for f in dataclasses.fields(cls):
        full = f"; --full: {_shown(cls.FULL[f.name])}" if f.name in cls.FULL else ""
        listed = f"; {names[f.name]()}" if f.name in names else ""
        p.add_argument(flag(f.name), dest=f.name, type=_parse_as(hints[f.name]),
                       default=None, help=f"{f.metadata['help']}{listed} (default: "
                       f"{_shown(getattr(defaults, f.name))}{full})")
    if cls.FULL:
        p.add_argument("--full", action="store_true", help="start from the documented full "
                       "setting: " + ", ".join(f"{k}={_shown(v)}" for k, v in cls.FULL.items()))
    p.add_argument("--out", type=_path, default=None,
                   help=f"run directory (default: runs/{cls.name}-DATASET-TIMESTAMP)")
    session = [flag(f.name) for f in dataclasses.fields(cls) if f.name in SESSION_FIELDS]
    p.add_argument("--resume", type=_path, default=None, metavar="RUN_DIR",
                   help="continue an interrupted run with its stored configuration (no other "
                   f"options, except {_listed(session)})")
    p.set_defaults(experiment=cls.name)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bnlab", description="Batch Normalization, measured.")
    parser.add_argument("--version", action="version", version=f"bnlab {bnlab.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log details, and show tracebacks of errors")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE[,MODULE]",
                        help="import these Python modules before anything else (repeatable; "
                        f"also ${IMPORT_ENV}, comma-separated): the norms, models and "
                        "experiments they register become options and subcommands. A "
                        "module in the current folder is found, as python -m finds it")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    _add_experiment(sub, experiment("compare"), "compare")
    run = sub.add_parser("run", help="an experiment; bnlab run NAME --help for its options",
                         description="Run an experiment into a run directory.")
    names = run.add_subparsers(dest="name", required=True, metavar="NAME", parser_class=_Parser)
    for entry in experiments():
        _add_experiment(names, entry, entry.name)
    rep = sub.add_parser("report", help="rebuild each run's summary.json, figures and "
                         "report.html; with --out, write one page instead")
    rep.add_argument("run_dirs", type=_path, nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", type=_path, default=None, help="write one self-contained page here "
                     "instead (a section per run); the run directories are only read")
    exp = sub.add_parser("export", help="write a run's measurements as CSV files or "
                         "TensorBoard event files", description="Write a run's measurements "
                         "and summary tables as CSV files (--csv), or its measurements as "
                         "TensorBoard event files, a TensorBoard run per network "
                         "(--tensorboard). The run directory is only read.")
    exp.add_argument("run_dir", type=_path, metavar="RUN_DIR")
    exp.add_argument("--csv", type=_path, default=None, metavar="DIR",
                     help="a new or empty folder for metrics.csv and a CSV file per summary table")
    exp.add_argument("--tensorboard", type=_path, default=None, metavar="DIR",
                     help="a new or empty folder for the event files (needs the tensorboard "
                     "extra: pip install 'bnlab[tensorboard]')")
    dl = sub.add_parser("download", help="download MNIST or Fashion-MNIST, checksum-verified")
    dl.add_argument("name", choices=[d for d in DATASETS if d != "digits"])
    dl.add_argument("--dest", type=_path, default=None, help="folder (default: bnlab's cache)")
    sub.add_parser("bench", help="time bnlab's BatchNorm against torch.nn's "
                   "(bnlab bench --help for its options)", add_help=False)
    return parser


def _config(args: argparse.Namespace) -> tuple[Config | None, dict]:
    """The config the options give, or for --resume None and the fields that may change for
    this session (SESSION_FIELDS: they cannot change the numbers)."""
    cls = experiment(args.experiment).config
    given = {f.name: None if getattr(args, f.name) is UNSET else getattr(args, f.name)
             for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    if args.resume is None:
        return cls(**{**(cls.FULL if getattr(args, "full", False) else {}), **given}), {}
    extra = [flag(k) for k in given if k not in SESSION_FIELDS] + ["--full"] * getattr(args, "full", False)
    if extra or args.out is not None:
        raise ConfigError("--resume continues a run with its stored configuration; do not "
                          f"combine it with {', '.join(extra + ['--out'] * (args.out is not None))}")
    return None, given


class CommandError(ValueError):
    """An error the command has already worded for its user."""


def _run_dir(args: argparse.Namespace, config: Config) -> tuple[Path, list[Path]]:
    """Where a new run goes: --out, or a new folder runs/NAME-DATASET-TIMESTAMP (with -2, -3,
    ... when one of that name exists, so runs started together never share one); and the
    folders made here, innermost first (removed if the run never starts)."""
    if args.out is not None:
        return args.out, []
    from bnlab.lab.rundir import new_run_dir

    return new_run_dir(config)


def _started(run_dir: Path | None) -> bool:
    return run_dir is not None and (run_dir / "config.json").is_file()


def _next_step(run_dir: Path | None, resume: str, trained: bool, sep: str = "\n  ") -> str:
    """What is on disk now and the command that goes on from it (after ``sep``)."""
    if trained:
        return f"the run is complete. Write its report with:{sep}bnlab report {run_dir}"
    if _started(run_dir):
        return f"finished work is saved. Continue with:{sep}bnlab {resume} --resume {run_dir}"
    return "nothing was written"


def _os_message(exc: OSError) -> str:
    return (f"{f'{exc.filename}: ' if exc.filename else ''}{exc.strerror or exc}; check the path "
            "and free space, then try again")


def _cmd_run(args: argparse.Namespace) -> int:
    with signals.held():  # an interrupt here would break torch's import, not stop a run
        import torch

        from bnlab.lab.cluster import ClusterError
        from bnlab.lab.distributed import world_from_env
        from bnlab.lab.runner import run_experiment
        from bnlab.lab.train import Progress

    config, overrides = _config(args)
    world = world_from_env()
    lead = world == 1 or os.environ.get("RANK") == "0"
    stored, claimed, run_dir, taken = None, [], None, {}
    resume = "compare" if args.command == "compare" else f"run {args.experiment}"
    if config is None:
        run_dir = args.resume
        stored = read_config(run_dir) if lead else None
        if stored is not None and stored.name != args.experiment:
            raise ConfigError(f"{run_dir} holds a {stored.name} run; continue it with "
                              f"bnlab run {stored.name} --resume {run_dir}")
        if world == 1:
            taken = _resume_settings(args, stored, overrides)
    if world == 1:  # before anything is made: a device that is not here, in one line
        from bnlab.lab.device import resolve

        this = config or dataclasses.replace(stored, **overrides)
        resolve(this.device, last_session="device" in taken)
        if taken:
            _say(f"resuming with {' '.join(f'{flag(k)} {v}' for k, v in taken.items())}, as "
                 "the last session ran")
    if world > 1:  # a process of a data-parallel run; first, what this group can run
        from bnlab.lab.distributed import check_data_parallel

        check_data_parallel(experiment(args.experiment).config, config or stored, overrides,
                            world)
        if config is not None:
            run_dir, claimed = _run_dir(args, config) if lead else (args.out, [])
        return _run_rank(args, config, run_dir, overrides, resume, claimed)
    nproc = overrides.get("nproc") or getattr(config or stored, "nproc", 1)
    if nproc > 1:
        return _launch(args, config, stored, nproc, resume, overrides)
    bar, trained = ProgressBar(), False
    try:
        if config is not None:
            run_dir, claimed = _run_dir(args, config)
        run_experiment(config, run_dir, resume=config is None, progress=Progress(bar), **overrides)
        trained = True
        _close(bar)
        with signals.held():  # after training (matplotlib takes 0.6 s); an interrupt here
            from bnlab.report import build_report  # would break its import

        report = build_report(run_dir)
    except KeyboardInterrupt as exc:
        _close(bar)
        _say(f"interrupted; {_next_step(run_dir, resume, trained)}")
        return signals.exit_code(exc)
    except (OSError, ClusterError, torch.cuda.OutOfMemoryError) as exc:
        step = f"; {_next_step(run_dir, resume, trained, ' ')}" if _started(run_dir) else ""
        if isinstance(exc, ClusterError):  # the hint only where a run was started
            text = str(exc)
        elif isinstance(exc, OSError):
            text = _os_message(exc)
        else:
            text = _out_of_memory(exc)
        if step and isinstance(exc, ClusterError):  # on a cluster again, or on this machine
            step += " [--scheduler ADDRESS]"
        raise CommandError(text + step) from exc
    finally:
        _close(bar)  # on any error too: the line ends, the kernels' log is handed back
        unclaim(claimed)
    _print_summary(run_dir, report)
    return 0


def _resume_settings(args: argparse.Namespace, stored: Config, overrides: dict) -> dict:
    """A resume takes up where the last session found the data, how many processes it ran
    and on which device, unless told otherwise (the processes a launcher starts are told on
    their command line); returns the settings taken up."""
    from bnlab.lab.rundir import RESUMED, last_settings

    taken = {}
    for name, value in last_settings(args.resume).items():
        if name in RESUMED and name not in overrides and hasattr(stored, name) \
                and value is not None and value != getattr(stored, name):
            overrides[name] = taken[name] = value
            args.argv += [flag(name), str(value)]
    return taken


def _out_of_memory(exc: BaseException) -> str:
    """A GPU's out-of-memory error in one line: torch's first two sentences ("CUDA out of
    memory. Tried to allocate 2.00 GiB"), and what to do."""
    said = ". ".join(" ".join(str(exc).split()).split(". ")[:2]).rstrip(".")
    return (f"{said}: the GPU's memory is full; train fewer or smaller networks at once "
            "(fewer --workers, a smaller --width), or on the CPU (--device cpu)")


def _close(bar: ProgressBar | None) -> None:
    try:
        if bar is not None:
            bar.close()
    except (OSError, ValueError):  # stderr closed or full: the run goes on without it
        pass


def _print_summary(run_dir: Path, report: Path) -> None:
    """The summary on stdout; the run and its report are saved, so a stdout that is closed
    (``| head``) or full only loses the summary."""
    from bnlab.report.text import summary_text

    _print(summary_text(run_dir, report))


def _print(text: str) -> None:
    """``text`` on stdout, where a closed (``| head``, ``>&-``) or full stdout loses only the
    text."""
    if sys.stdout is None:  # started with stdout closed
        return
    try:
        print(text)
        sys.stdout.flush()
    except OSError:
        silence(sys.stdout)


def _launch(args: argparse.Namespace, config: Config | None, stored: Config | None,
            nproc: int, resume: str, overrides: dict) -> int:
    """``nproc`` processes on this machine, each running this command as one rank (a new
    ``config``, or the ``stored`` one of a resumed run). Everything the ranks would check,
    the data included, is checked here first."""
    from bnlab.lab.distributed import RankFailed, check_fits, launch
    from bnlab.lab.runner import load_data
    from bnlab.lab.rundir import check_new_run_dir

    check_fits(nproc)
    if config is not None and args.out is not None:
        check_new_run_dir(args.out, config)
    load_data(config or dataclasses.replace(stored, **overrides))  # its checks, here
    run_dir, claimed = _run_dir(args, config) if config is not None else (args.resume, [])
    argv = list(args.argv) + (["--out", str(run_dir)] if claimed else [])
    try:
        return launch(argv, nproc)
    except KeyboardInterrupt as exc:  # each process was interrupted; process 0 says where
        if getattr(exc, "lead_code", None) not in [128 + s for s in signals.STOPS]:  # it stands
            _say(f"interrupted; {_next_step(run_dir, resume, False)}")  # unless it could not
        return signals.exit_code(exc)
    except RankFailed as exc:
        step = (f"finished work is saved, and once that is mended the run continues with: "
                f"bnlab {resume} --resume {run_dir}" if _started(run_dir) else "nothing was written")
        raise RankFailed(f"{exc}. Its error is above; {step}.") from None
    finally:
        unclaim(claimed)


def _run_rank(args: argparse.Namespace, config: Config | None, run_dir: Path | None,
              overrides: dict, resume: str, claimed: list[Path]) -> int:
    """One process of a data-parallel run (started by --nproc or torchrun); rank 0 runs the
    experiment as one process would, with progress and report."""
    from bnlab.report import build_report
    from bnlab.lab.distributed import DataParallel
    from bnlab.lab.runner import run_experiment
    from bnlab.lab.train import Progress

    bar = None
    try:
        dp = DataParallel.join()
        bar = ProgressBar() if dp.lead else None
        run_experiment(config, run_dir, resume=config is None, dp=dp, **overrides,
                       **({"progress": Progress(bar)} if bar else {}))
    except BaseException as exc:
        # this process is ending: the launcher's interrupt, sent when it sees a process
        # fail, would only break the interpreter's exit into a traceback
        signals.ignore()
        if not isinstance(exc, KeyboardInterrupt):
            raise
        if os.environ.get("RANK") == "0":  # one process speaks for the run
            _close(bar)
            _say(f"interrupted; {_next_step(run_dir, resume, False)}")
        return signals.exit_code(exc)
    finally:
        unclaim(claimed)
    dp.finish()
    if not dp.lead:  # done: leave at once, before the interpreter's teardown of torch's
        for stream in (sys.stdout, sys.stderr):  # distributed threads can abort the process
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(0)
    _close(bar)
    _print_summary(run_dir, build_report(run_dir))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    with signals.held():  # an interrupt here would break matplotlib's import
        from bnlab.report.text import report_command

    _print(report_command(args.run_dirs, args.out))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if args.csv is None and args.tensorboard is None:
        raise CommandError("give --csv DIR, --tensorboard DIR, or both")
    with signals.held():  # an interrupt here would break pandas' import
        from bnlab.report.export import check_targets, export_csv, export_tensorboard

    check_targets(args.csv, args.tensorboard)  # both, before either is written
    lines = []
    if args.tensorboard is not None:  # first: a record without steps has none to export
        runs = export_tensorboard(args.run_dir, args.tensorboard)
        lines.append(f"tensorboard: {len(runs)} runs in {args.tensorboard}; view them with "
                     f"tensorboard --logdir {args.tensorboard}")
    if args.csv is not None:
        files = export_csv(args.run_dir, args.csv)
        lines.insert(0, f"csv: {', '.join(f.name for f in files)} in {args.csv}")
    _print("\n".join(lines))
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from bnlab.lab.data import IDX_SPECS, download

    _print(f"downloaded {args.name} to {download(IDX_SPECS[args.name], args.dest)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bnlab`` command ``argv``; returns its exit code. Every error ends in one
    line on stderr and code 2; an interrupt (Ctrl-C, SIGTERM, SIGHUP) in one line and code
    128 + the signal's number."""
    previous = signals.install()
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        signals.restore(previous)


class ImportFailed(Exception):
    """A module named by --import or BNLAB_IMPORT could not be imported."""


def _leading(argv: list[str]) -> tuple[list[tuple[str, str]], bool, int | None]:
    """The global options before the command: the modules to import, each with where it
    was named (the environment variable's first, then ``--import``'s); whether -v is given;
    and the index of ``bench`` in ``argv`` where it is the command and no global option but
    -v and --import precedes it (bench parses its own options). Unique prefixes count, as
    argparse takes them (``--imp``)."""
    named = [(m, IMPORT_ENV) for m in os.environ.get(IMPORT_ENV, "").split(",")]
    verbose, others, i = False, False, 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        option, eq, value = argv[i].partition("=")
        if len(option) > 2 and "--import".startswith(option):
            if not eq and i + 1 < len(argv):
                i, value = i + 1, argv[i + 1]
            named += [(m, "--import") for m in value.split(",")]
        elif option == "-v" or (len(option) > 4 and "--verbose".startswith(option)):
            verbose = True
        else:
            others = True
        i += 1
    bench = i if argv[i:i + 1] == ["bench"] and not others else None
    return [(m.strip(), where) for m, where in named if m.strip()], verbose, bench


def import_modules(named: list[tuple[str, str]]) -> None:
    """Import each module of ``(module, where it was named)``, the current folder first on
    the path as ``python -m`` has it, for these imports only (what such a module imports
    later, such as an experiment's runner, is best a module of its package, found through
    the package). ImportFailed names the module, where it was named, and why."""
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        for name, where in named:
            if not _MODULE.fullmatch(name):
                raise ImportFailed(f"cannot import {name!r} (named by {where}): not a module "
                                   "name; give a dotted name such as mynorms (for mynorms.py "
                                   "in the current folder or on the Python path)")
            try:
                importlib.import_module(name)
                IMPORTED.append(name)
            except Exception as exc:  # noqa: BLE001  the user's module: any error is theirs
                raise ImportFailed(f"cannot import {name} (named by {where}): "
                                   f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    finally:
        sys.path.remove(cwd)


def _main(argv: list[str]) -> int:
    named, verbose, bench = _leading(argv)
    try:
        import_modules(named)
    except ImportFailed as exc:
        if verbose:
            _say(traceback.format_exc().rstrip("\n"))
        where = "" if verbose or exc.__cause__ is None else " (-v shows where)"
        _say(f"bnlab: error: {exc}{where}")
        return 2
    parser = build_parser()
    if bench is not None:
        from bnlab.bench import main as bench_main

        return bench_main(argv[bench + 1:])
    args = parser.parse_args(argv)
    args.argv = argv  # the processes of a data-parallel run repeat the command
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    command = {"compare": _cmd_run, "run": _cmd_run, "report": _cmd_report,
               "export": _cmd_export,
               "download": _cmd_download}[args.command]
    where = f"bnlab {args.command}" + (f" {args.name}" if args.command == "run" else "")
    try:
        return command(args)
    except KeyboardInterrupt as exc:
        if os.environ.get("RANK", "0") == "0":  # of a data-parallel run's processes, one speaks
            _say(f"\n{where}: interrupted")
        return signals.exit_code(exc)
    except Exception as exc:  # noqa: BLE001  every error ends in one line; -v shows the traceback
        if args.verbose:
            _say(traceback.format_exc().rstrip("\n"))
        if isinstance(exc, OSError):
            message = _os_message(exc)
        elif isinstance(exc, (DataError, ValueError)):  # ConfigError and ReportError are too
            message = str(exc)
        else:
            message = f"internal: {type(exc).__name__}: {exc} (-v shows where; please report it)"
        _say(f"{where}: error: {message}")
        return 2


def _say(text: str) -> None:
    """A line on stderr. A stderr that is closed or full loses it, and changes nothing else:
    not the exit code, and never into a traceback."""
    if sys.stderr is None:
        return
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        silence(sys.stderr)
