"""Build a run's summary, figures and self-contained HTML report from its run directory
alone (``config.json``, ``run.json``, ``metrics.jsonl``); nothing here imports the trainer.

Each experiment's registry entry (:func:`bnlab.lab.experiment_configs.experiment`) names its
section module, one of :mod:`bnlab.report.sections` for bnlab's own, with

* ``TITLE`` and ``EXPECTED``: the literature's expected outcome, written once (or
  ``title(summary)`` and ``expected(summary)`` for a module serving several experiments);
* ``analyze(rows, config) -> summary``: pure, from the finished units' rows (JSON-able);
* ``measured(summary) -> list[str]`` and ``tables(summary) -> [(header, rows)]``;
* ``figures(summary) -> {name: Figure}``, built from ``plot(summary, ax=None)`` functions.

A report is rendered in memory (:func:`render`); :func:`build_report` then writes it into
the run directory, and :func:`build_combined_report` writes one page elsewhere without
writing into any run directory (an archived, read-only run can be rendered).
"""

from __future__ import annotations

import base64
import html
import importlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from bnlab._io import TMP_SUFFIX, atomic_write
from bnlab.lab.experiment_configs import experiment
from bnlab.lab.fields import Config, ConfigError
from bnlab.lab.rundir import METRICS, RUN, read_config, read_rows, refuse_links
from .figures import PAGE_PX, png_bytes

log = logging.getLogger(__name__)

__all__ = ["Rendered", "ReportError", "build_combined_report", "build_report", "finished_rows",
           "render", "section"]

SUMMARY, PAGE, FIGURES = "summary.json", "report.html", "figures"  # a report's own files


class ReportError(ValueError):
    """The run directory lacks what a report needs."""


def section(name: str) -> ModuleType:
    """The report section of the experiment ``name``, imported."""
    return importlib.import_module(experiment(name).section)


def finished_rows(run_dir: Path, config: Config) -> list[dict]:
    """The measurement rows of every finished unit (an interrupted run reports what it
    finished, and says n honestly)."""
    rows = read_rows(run_dir / METRICS, config.digest())
    done = {r["unit"] for r in rows if r.get("done")}
    if not done:
        raise ReportError(f"{run_dir}: no unit has finished yet; continue the run with "
                          f"--resume {run_dir}")
    return [r for r in rows if r["unit"] in done and not r.get("done")]


def analyze_run(run_dir: Path) -> tuple[Config, ModuleType, dict]:
    try:
        refuse_links(run_dir)
        config = read_config(run_dir)
        rows = finished_rows(run_dir, config)
    except ConfigError as exc:
        raise ReportError(str(exc)) from None
    sec = section(config.name)
    try:
        summary = sec.analyze(rows, config)
    except ReportError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
        raise ReportError(f"{run_dir / METRICS}: its rows do not hold what the {config.name} "
                          f"report needs ({type(exc).__name__}: {exc}); the record is damaged: "
                          "restore it, or start a new run") from None
    summary["experiment"], summary["provenance"] = config.name, provenance(run_dir)
    summary["setting"] = setting(config)
    return config, sec, summary


def title_expected(sec: ModuleType, summary: dict) -> tuple[str, str]:
    """A section serving several experiments (the sweeps) words them per summary."""
    if hasattr(sec, "title"):
        return sec.title(summary), sec.expected(summary)
    return sec.TITLE, sec.EXPECTED


def _shown(value) -> str:
    """A config value as a reader types it: 0.0464 not 0.046415888336127795, text unquoted."""
    if isinstance(value, (list, tuple)):
        return ",".join(_shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return "unset" if value is None else str(value)


def setting(config: Config) -> str | None:
    """One line on how this run's config stands to the experiment's documented full setting
    (``--full``): that setting, the quick default, or custom (None if it has none)."""
    cls, full = type(config), type(config).FULL
    if not full:
        return None
    try:
        full_config, default = cls(**full), cls()
    except ConfigError:  # a full setting this version refuses: say nothing rather than wrong
        return None
    documented = ", ".join(f"{k}={_shown(v)}" for k, v in full.items())
    if config.digest() == full_config.digest():
        return f"the documented full setting (--full: {documented})."
    if config.digest() == default.digest():
        here = ", ".join(f"{k}={_shown(getattr(config, k))}" for k in full)
        return (f"the quick default ({here}), not the documented full setting (--full: "
                f"{documented}); rerun with --full for numbers to quote.")
    ours, theirs = config.to_dict(), full_config.to_dict()
    # to_dict holds no session fields (where, how fast), nor added fields at their defaults
    diff = [f"{k}={_shown(v)} (--full: {_shown(theirs.get(k, getattr(full_config, k)))})"
            for k, v in sorted(ours.items()) if v != theirs.get(k, getattr(full_config, k))]
    more = f" and {len(diff) - 4} more fields" if len(diff) > 5 else ""
    return (f"custom; it differs from the documented full setting in "
            f"{', '.join(diff[:4] if more else diff)}{more}.")


def provenance(run_dir: Path) -> dict | None:
    """Versions, threads, dates and wall time from ``run.json`` (None if not recorded)."""
    try:
        sessions = json.loads((run_dir / RUN).read_text(encoding="utf-8"))["sessions"]
        first, last = sessions[0], sessions[-1]
        return {"bnlab": last["bnlab"], "torch": last["torch"], "python": last["python"],
                "threads": sorted({s["threads"] for s in sessions}),
                "kernels": sorted({s["kernels"] for s in sessions if "kernels" in s}),
                "started": first["started"],
                "sessions": len(sessions), "seconds": round(sum(s["seconds"] for s in sessions), 1)}
    except (OSError, ValueError, KeyError, IndexError, TypeError, RecursionError):
        return None


def _kernels_text(kernels: str) -> str:
    """``Numba 0.68.1, threading layer omp`` as recorded; the layer left out where none
    started (the run used no threaded kernel)."""
    return re.sub(r", threading layer none started$", "", kernels)


def _provenance_text(p: dict | None) -> str:
    if p is None:
        return "Provenance: not recorded (run made before bnlab recorded it)."
    minutes = p["seconds"] / 60
    kernels = (f"; BatchNorm kernels: {' / '.join(map(_kernels_text, p['kernels']))}"
               if p.get("kernels") else "")
    return (f"Run with bnlab {p['bnlab']}, torch {p['torch']}, Python {p['python']}, "
            f"{'/'.join(map(str, p['threads']))} thread(s){kernels}; started {p['started']}; "
            f"wall time {minutes:.1f} min over {p['sessions']} session(s).")


def _img(data: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode()}">')


def _cell(value) -> str:
    """A table cell whose parts ("mean", "[low, high]", "(n=k)") each stay on one line, so
    that a table too wide for the page breaks between them, not inside them."""
    parts = re.split(r" (?=[\[(])", str(value))
    return " ".join(f"<span>{html.escape(p)}</span>" for p in parts)


def table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="{cls}"><tr>{head}</tr>{body}</table></div>'


@dataclass(frozen=True)
class Rendered:
    """A run's report in memory: its title, HTML body (images inline), summary (as
    ``summary.json`` holds it) and figures as PNG bytes by name."""

    run_dir: Path
    title: str
    body: str
    summary: dict
    figures: dict[str, bytes]

    def summary_json(self) -> str:
        return json.dumps(self.summary, indent=1, sort_keys=True, allow_nan=False) + "\n"


def full_summary(run_dir: Path) -> tuple[Config, ModuleType, dict, str]:
    """The run's config, section, summary as ``summary.json`` holds it (the analysis with
    the literature's expected outcome and the measured statements), and the title."""
    config, sec, summary = analyze_run(run_dir)
    title, expected = title_expected(sec, summary)
    summary = {"expected": expected, "measured": sec.measured(summary), **summary}
    try:
        json.dumps(summary, allow_nan=False)
    except ValueError as exc:  # JSON has no NaN: the rows hold values no run writes
        raise ReportError(f"{run_dir / METRICS}: its rows give a summary with {exc}; the record "
                          "is damaged: restore it, or start a new run") from None
    return config, sec, summary, title


def _run_files(run_dir: Path) -> Rendered:
    """Everything a run's report consists of, rendered in memory."""
    config, sec, summary, title = full_summary(run_dir)
    figures = {key: png_bytes(fig) for key, fig in sec.figures(summary).items()}
    measured, expected = summary["measured"], summary["expected"]
    items = "".join(f"<li>{html.escape(m)}</li>" for m in measured)
    note = summary["setting"]
    note = "" if note is None else (
        f'<p class="setting{" full" if note.startswith("the documented") else ""}">'
        f"<b>Setting:</b> {html.escape(note)}</p>")
    config_rows = [[k, _shown(v)] for k, v in sorted(config.to_dict().items())]
    body = f"""<h1>{html.escape(title)}</h1>{note}
<table class="text"><tr><th>expected (literature)</th><th>measured (this run)</th></tr>
<tr><td>{html.escape(expected)}</td><td><ul>{items}</ul></td></tr></table>
<h2>Numbers</h2>{''.join(table(h, rows) for h, rows in sec.tables(summary))}
<h2>Figures</h2>{''.join(_img(data, key) for key, data in figures.items())}
<h2>Configuration</h2>{table(["field", "value"], config_rows, "config")}
<p>{html.escape(_provenance_text(summary["provenance"]))}</p>"""
    return Rendered(Path(run_dir), title, body, summary, figures)


def render(run_dir: str | Path) -> Rendered:
    """A run's report in memory; nothing is written."""
    return _run_files(Path(run_dir))

_CSS = f"""body{{font-family:system-ui,sans-serif;max-width:{PAGE_PX}px;margin:2em auto;padding:0 16px;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td span{{white-space:nowrap}}div.scroll{{overflow-x:auto}}
td:first-child,th:first-child{{text-align:left}}th{{background:#f3f3f3}}
table.text td{{text-align:left;vertical-align:top;width:50%}}table.text th{{text-align:left}}
table.config td,table.config th{{text-align:left}}table.config td span{{white-space:normal}}
p.setting{{background:#fff4d6;border-left:4px solid #e0a800;padding:6px 10px}}
p.setting.full{{background:#eef6ee;border-color:#4a4}}
img{{max-width:100%;display:block;margin:1em 0}}code{{background:#f3f3f3;padding:1px 4px}}"""


def _page(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
{body}
<p>Intervals are two-sided 95% Student-t intervals of the mean over seeds; n is the number of
seeds. Rebuild with <code>bnlab report RUN_DIR</code>.</p>
</body></html>
"""


def _check_out(out: Path) -> None:
    """A page is written elsewhere only as an .html file that is a plain file, if it exists."""
    if out.is_dir():
        raise ReportError(f"--out {out} is a folder; name a file, e.g. {out / 'report.html'}")
    if out.suffix.lower() not in (".html", ".htm") or out.is_symlink() or (
            out.exists() and not out.is_file()):
        raise ReportError(f"--out {out}: a report is written only to an .html file that is "
                          "not a link or a device; name one, e.g. bnlab-report.html")


def _check_own_files(run_dir: Path) -> None:
    """The report's own paths in ``run_dir`` are what it writes there, or absent."""
    for name, kind in ((SUMMARY, "file"), (PAGE, "file"), (FIGURES, "folder")):
        path = run_dir / name
        if path.is_symlink() or (path.exists() and path.is_dir() != (kind == "folder")):
            what = "a link" if path.is_symlink() else "a folder" if path.is_dir() else "a file"
            raise ReportError(f"{path} is {what}, where bnlab report writes the run's {name} "
                              f"{kind}; move or remove it and report again, or render the run "
                              f"elsewhere with bnlab report {run_dir} --out FILE.html")


def _stale(run_dir: Path) -> list[Path]:
    """Temporary files a killed report left beside its own outputs (atomic_write's
    ``.NAME.XXXXXXXX.tmp``), and none of anything else."""
    tail = r"\.[0-9a-f]{8}" + re.escape(TMP_SUFFIX)
    top = re.compile(r"\.(summary\.json|report\.html)" + tail)
    figure = re.compile(r"\..+\.png" + tail)
    found = [p for p in run_dir.glob(".*" + TMP_SUFFIX) if top.fullmatch(p.name)]
    if (run_dir / FIGURES).is_dir() and not (run_dir / FIGURES).is_symlink():
        found += [p for p in (run_dir / FIGURES).glob(".*" + TMP_SUFFIX) if figure.fullmatch(p.name)]
    return [p for p in found if p.is_file() and not p.is_symlink()]


def build_report(run_dir: str | Path) -> Path:
    """Write summary.json, figures/*.png and report.html into ``run_dir``; returns the
    report's path. Temporary files a killed report left there are cleared first."""
    run_dir = Path(run_dir)
    _check_own_files(run_dir)
    try:
        for path in _stale(run_dir):
            log.info("removing a killed report's temporary file %s", path)
            path.unlink()
        rendered = _run_files(run_dir)
        text = rendered.summary_json()
        atomic_write(run_dir / SUMMARY, lambda fh: fh.write(text.encode()))
        for key, data in rendered.figures.items():
            atomic_write(run_dir / FIGURES / f"{key}.png", lambda fh, d=data: fh.write(d))
        page = _page(rendered.title, rendered.body)
        path = atomic_write(run_dir / PAGE, lambda fh: fh.write(page.encode()))
    except PermissionError as exc:
        raise ReportError(f"{exc.filename or run_dir}: not writable, so the report cannot be "
                          f"written into the run directory; render it elsewhere with bnlab "
                          f"report {run_dir} --out FILE.html") from None
    log.info("report written: %s", path)
    return path


def combined_page(rendered: list[Rendered]) -> str:
    """One self-contained page: a run's own page for one run, else a section per run."""
    if len(rendered) == 1:
        r = rendered[0]
        return _page(r.title, r.body + f"<p>Run directory: <code>{html.escape(str(r.run_dir))}"
                     "</code></p>")
    parts, toc = [], []
    for i, r in enumerate(rendered, 1):
        body = r.body.replace("<h2>", "<h3>").replace("</h2>", "</h3>")
        body = body.replace("<h1>", f'<h2 id="run{i}">{i}. ').replace("</h1>", "</h2>")
        parts.append(f'<section>{body}<p>Run directory: <code>{html.escape(str(r.run_dir))}'
                     "</code></p></section>")
        toc.append(f'<li><a href="#run{i}">{html.escape(r.title)}</a></li>')
    return _page("bnlab report", f"<h1>bnlab report: {len(parts)} runs</h1><ol>{''.join(toc)}</ol>"
                 + "".join(parts))


def build_combined_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write one self-contained page for ``run_dirs`` to ``out``, a section per run (one
    run: its own page). The run directories are only read."""
    return write_page([render(Path(d)) for d in run_dirs], out)


def write_page(rendered: list[Rendered], out: str | Path) -> Path:
    out = Path(out)
    _check_out(out)
    page = combined_page(rendered)
    return atomic_write(out, lambda fh: fh.write(page.encode()))
