"""The ``bnlab`` command line.

    bnlab compare [options]        the seed's experiment: plain FC vs FC + BN
    bnlab compare --resume DIR     continue an interrupted comparison
    bnlab run NAME [options]       a named experiment (noise, ics, regularization, init-sweep,
                                   lr-sweep, smoothness); --full for the documented setting
    bnlab report RUN_DIR...        rebuild a run's summary, figures and report.html (several
                                   runs: also one combined page, --out)
    bnlab download NAME            fetch MNIST or Fashion-MNIST into bnlab's cache
    bnlab bench                    time bnlab's BatchNorm against torch.nn's
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import typing
from datetime import datetime
from pathlib import Path
from typing import Sequence

from .compare import CompareConfig, Progress, run_compare
from .rundir import ConfigError
from .data import DATASETS, IDX_SPECS, DataError, download
from .experiments import EXPERIMENTS, run_experiment
from .models import ACTIVATIONS, NORMS
from bnlab.report import ReportError

__all__ = ["main"]

_DEFAULTS = CompareConfig()

# (flag, config field, type, help); every flag maps onto one CompareConfig field
_COMPARE_FLAGS = [
    ("--dataset", "dataset", str, f"one of {', '.join(DATASETS)}"),
    ("--epochs", "epochs", int, "training epochs per run"),
    ("--seeds", "seeds", int, "runs per variant, with seeds 0..N-1"),
    ("--batch-size", "batch_size", int, "mini-batch size (the last incomplete batch is dropped)"),
    ("--lr", "lr", float, "SGD learning rate"),
    ("--momentum", "momentum", float, "SGD momentum (0 for plain SGD)"),
    ("--depth", "depth", int, "number of hidden layers"),
    ("--width", "width", int, "units per hidden layer"),
    ("--activation", "activation", str, f"one of {', '.join(ACTIVATIONS)}"),
    ("--init-scale", "init_scale", float, "standard deviation of the Gaussian initial weights"),
    ("--norms", "norms", lambda s: tuple(p.strip() for p in s.split(",") if p.strip()),
     f"comma-separated variants from {', '.join(NORMS)}; 'none' is the plain baseline"),
    ("--data-dir", "data_dir", str, "folder with the IDX files (searched first)"),
]


def _default_text(field: str) -> str:
    value = getattr(_DEFAULTS, field)
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnlab", description="Batch Normalization, measured.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cmp_ = sub.add_parser("compare", help="plain FC network vs the same network with BN",
                          description="Train a fully connected network with and without Batch "
                          "Normalization over several seeds, and write metrics, figures and an "
                          "HTML report into a run directory.")
    for flag, field, typ, text in _COMPARE_FLAGS:
        cmp_.add_argument(flag, dest=field, type=typ, default=None,
                          help=f"{text} (default: {_default_text(field)})")
    cmp_.add_argument("--out", type=Path, default=None,
                      help="run directory (default: runs/compare-DATASET-TIMESTAMP)")
    cmp_.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                      help="continue an interrupted run from its last completed epochs, with its "
                      "stored configuration (no other options allowed)")

    run = sub.add_parser("run", help="a named experiment; bnlab run NAME --help for its options",
                         description="Run a named experiment into a run directory.")
    names = run.add_subparsers(dest="experiment", required=True, metavar="NAME")
    for exp in EXPERIMENTS.values():
        ep = names.add_parser(exp.name, help=exp.summary, description=exp.summary)
        defaults = exp.config_cls()
        for name, typ in exp.config_cls.field_types().items():
            parse, shown = _flag_type(typ), getattr(defaults, name)
            if isinstance(shown, tuple):
                shown = ",".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in shown)
            full = f"; --full: {exp.full[name]}" if name in exp.full else ""
            text = exp.config_cls.HELP.get(name, name.replace("_", " "))
            ep.add_argument("--" + name.replace("_", "-"), dest=name, type=parse, default=None,
                            help=f"{text} (default: {shown}{full})")
        ep.add_argument("--full", action="store_true",
                        help="start from the documented full setting: " +
                        ", ".join(f"{k}={v}" for k, v in exp.full.items()))
        ep.add_argument("--out", type=Path, default=None,
                        help=f"run directory (default: runs/{exp.name}-TIMESTAMP)")
        ep.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue an interrupted run; finished units are kept")

    rep = sub.add_parser("report", help="rebuild summary.json, figures and report.html of a run; "
                         "with several runs, also one combined page")
    rep.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", type=Path, default=Path("bnlab-report.html"),
                     help="the combined page, when several runs are given (default: bnlab-report.html)")

    dl = sub.add_parser("download", help="download MNIST or Fashion-MNIST, checksum-verified")
    dl.add_argument("name", choices=sorted(IDX_SPECS))
    dl.add_argument("--dest", type=Path, default=None, help="folder (default: bnlab's cache)")

    # bench's own options are parsed by bnlab.bench (see main)
    sub.add_parser("bench", help="time bnlab's BatchNorm against torch.nn's "
                   "(bnlab bench --help for its options)", add_help=False)
    return parser


class ProgressBar:
    """Fixed-width progress on stderr: redrawn in place on a terminal, a line every 10% or
    30 s otherwise (logs, CI)."""

    def __init__(self, unit: str = "epochs", stream=None, width: int = 24) -> None:
        self.unit, self.stream, self.width = unit, stream or sys.stderr, width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self.base: int | None = None  # work already done when this process started
        self.last_line, self.last_decile = 0.0, -1

    def update(self, done: int, total: int, text: str) -> None:
        now = time.monotonic()
        if self.base is None:
            self.base = done - 1
        elapsed = now - self.start
        left = elapsed / max(done - self.base, 1) * (total - done)
        filled = int(self.width * done / max(total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        line = (f"[{bar}] {done:>5}/{total} {self.unit}  {text}  "
                f"{_clock(elapsed)} elapsed, ~{_clock(left)} left")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == total else ""))
            self.stream.flush()
            return
        decile = 10 * done // max(total, 1)
        if decile != self.last_decile or now - self.last_line > 30 or done == total:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_decile, self.last_line = decile, now

    def __call__(self, p: Progress) -> None:
        self.update(p.done, p.total, f"{p.norm:<8} seed {p.seed:<2} epoch {p.record['epoch']:>4}  "
                    f"test acc {p.record['test_acc'] * 100:6.2f}%")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _flag_type(typ):
    """An argparse type for a config field's annotation (comma lists for tuples)."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) is tuple:
        item = args[0]
        return lambda text: tuple(item(v.strip()) for v in text.split(",") if v.strip())
    if type(None) in args:  # Optional[X]
        return next(a for a in args if a is not type(None))
    return typ


def _cmd_run(args: argparse.Namespace) -> int:
    from bnlab.report import build_report

    exp = EXPERIMENTS[args.experiment]
    given = {f: getattr(args, f) for f in exp.config_cls.field_types() if getattr(args, f) is not None}
    if args.resume is not None:
        if given or args.full or args.out is not None:
            raise ConfigError("--resume continues a run with its stored configuration; give no "
                              "other options")
        run_dir, config = args.resume, None
    else:
        config = exp.config_cls(**{**(exp.full if args.full else {}), **given})
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = args.out or Path("runs") / f"{exp.name}-{stamp}"
    bar = ProgressBar(unit="units")
    try:
        run_experiment(exp.name, config, run_dir, resume=args.resume is not None,
                       progress=lambda done, total, key: bar.update(done, total, key))
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished units are saved. Continue with:\n"
              f"  bnlab run {exp.name} --resume {run_dir}", file=sys.stderr)
        return 130
    report = build_report(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"\n{exp.name}: expected: {summary['expected']}")
    for line in summary["measured"]:
        print("- " + line)
    print(f"\nreport: {report}")
    return 0


def _config_from_args(args: argparse.Namespace) -> CompareConfig:
    given = {f: getattr(args, f) for _, f, _, _ in _COMPARE_FLAGS if getattr(args, f) is not None}
    return dataclasses.replace(_DEFAULTS, **given)


def _print_summary(summary_path: Path, report: Path) -> None:
    from bnlab.report.figures import LABELS

    summary = json.loads(summary_path.read_text())
    print(f"\n{'variant':<20} {'n':>2}  {'final test acc % [95% CI]':<27} {'train acc %':>11}")
    for norm in summary["config"]["norms"]:
        v = summary["variants"].get(norm)
        if v is None:
            continue
        t = v["final_test_acc"]
        ci = f"{t['mean'] * 100:6.2f} [{t['low'] * 100:6.2f}, {t['high'] * 100:6.2f}]"
        print(f"{LABELS.get(norm, norm):<20} {v['n']:>2}  {ci:<27} "
              f"{v['final_train_acc']['mean'] * 100:11.2f}")
    for line in summary.get("verdict", []):
        print("- " + line)
    print(f"\nreport: {report}")


def _cmd_compare(args: argparse.Namespace) -> int:
    from bnlab.report import build_report

    if args.resume is not None:
        extra = [flag for flag, f, _, _ in _COMPARE_FLAGS if getattr(args, f) is not None]
        if extra or args.out is not None:
            raise ConfigError("--resume continues a run with its stored configuration; do not "
                              f"combine it with {', '.join(extra + (['--out'] if args.out else []))}")
        run_dir, config = args.resume, None
    else:
        config = _config_from_args(args)  # validates before any work starts
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = args.out or Path("runs") / f"compare-{config.dataset}-{stamp}"
    bar = ProgressBar()
    try:
        config = run_compare(config, run_dir, resume=args.resume is not None, progress=bar)
    except KeyboardInterrupt:
        print(f"\ninterrupted; completed epochs are saved. Continue with:\n"
              f"  bnlab compare --resume {run_dir}", file=sys.stderr)
        return 130
    report = build_report(run_dir)
    _print_summary(run_dir / "summary.json", report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from bnlab.bench import main as bench_main

        return bench_main(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "compare":
            return _cmd_compare(args)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "report":
            from bnlab.report import build_combined_report, build_report

            if len(args.run_dirs) > 1:
                print(f"report: {build_combined_report(args.run_dirs, args.out)}")
                return 0
            run_dir = args.run_dirs[0]
            report = build_report(run_dir)
            summary = json.loads((run_dir / "summary.json").read_text())
            if "experiment" in summary:
                print("\n".join(["- " + m for m in summary["measured"]] + [f"report: {report}"]))
            else:
                _print_summary(run_dir / "summary.json", report)
            return 0
        if args.command == "download":
            spec = IDX_SPECS[args.name]
            print(f"downloaded {args.name} to {download(spec, args.dest)}")
            return 0
    except (ConfigError, DataError, ReportError, ValueError) as exc:
        print(f"bnlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2
