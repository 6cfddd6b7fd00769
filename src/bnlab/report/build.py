"""Build a run's summary, figures and self-contained HTML report from its run directory
alone (``config.json``, ``run.json``, ``metrics.jsonl``); nothing here imports the trainer.

Each experiment has a section module in :mod:`bnlab.report.sections` with

* ``TITLE`` and ``EXPECTED``: the literature's expected outcome, written once (or
  ``title(summary)`` and ``expected(summary)`` for a module serving several experiments);
* ``analyze(rows, config) -> summary``: pure, from the finished units' rows (JSON-able);
* ``measured(summary) -> list[str]`` and ``tables(summary) -> [(header, rows)]``;
* ``figures(summary) -> {name: Figure}``, built from ``plot(summary, ax=None)`` functions.
"""

from __future__ import annotations

import base64
import html
import importlib
import json
import logging
from pathlib import Path
from types import ModuleType

from bnlab._io import atomic_write, write_json
from bnlab.lab.config import Config, ConfigError
from bnlab.lab.rundir import METRICS, RUN, read_config, read_rows, refuse_links
from .figures import WIDE, save_figure

log = logging.getLogger(__name__)

__all__ = ["ReportError", "build_combined_report", "build_report", "finished_rows", "section"]

SECTIONS = {"compare": "compare", "regularization": "regularization", "init-sweep": "sweeps",
            "lr-sweep": "sweeps", "noise": "noise", "ics": "ics", "smoothness": "smoothness",
            "batch-size": "batch_size"}


class ReportError(ValueError):
    """The run directory lacks what a report needs."""


def section(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.sections.{SECTIONS[name]}")


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
    return config, sec, summary


def title_expected(sec: ModuleType, summary: dict) -> tuple[str, str]:
    """A section serving several experiments (the sweeps) words them per summary."""
    if hasattr(sec, "title"):
        return sec.title(summary), sec.expected(summary)
    return sec.TITLE, sec.EXPECTED


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
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _img(path: str, alt: str, wide: bool) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (f'<img class="{"wide" if wide else "narrow"}" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{data}">')


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _provenance_text(p: dict | None) -> str:
    if p is None:
        return "Provenance: not recorded (run made before bnlab recorded it)."
    minutes = p["seconds"] / 60
    kernels = f"; BatchNorm: {' / '.join(p['kernels'])}" if p.get("kernels") else ""
    return (f"Run with bnlab {p['bnlab']}, torch {p['torch']}, Python {p['python']}, "
            f"{'/'.join(map(str, p['threads']))} thread(s){kernels}; started {p['started']}; "
            f"wall time {minutes:.1f} min over {p['sessions']} session(s).")


def _run_files(run_dir: Path) -> tuple[str, str]:
    """Write a run's summary.json and figures; return its report's (title, HTML body)."""
    config, sec, summary = analyze_run(run_dir)
    figures = {}
    for key, fig in sec.figures(summary).items():
        wide = fig.get_figwidth() >= WIDE
        figures[key] = (save_figure(fig, run_dir / "figures" / f"{key}.png"), wide)
    measured = sec.measured(summary)
    title, expected = title_expected(sec, summary)
    try:
        write_json(run_dir / "summary.json", {"expected": expected, "measured": measured, **summary})
    except ValueError as exc:  # JSON has no NaN: the rows hold values no run writes
        raise ReportError(f"{run_dir / METRICS}: its rows give a summary with {exc}; the record "
                          "is damaged: restore it, or start a new run") from None
    items = "".join(f"<li>{html.escape(m)}</li>" for m in measured)
    body = f"""<h1>{html.escape(title)}</h1>
<table class="text"><tr><th>expected (literature)</th><th>measured (this run)</th></tr>
<tr><td>{html.escape(expected)}</td><td><ul>{items}</ul></td></tr></table>
<h2>Numbers</h2>{''.join(table(h, rows) for h, rows in sec.tables(summary))}
<h2>Figures</h2>{''.join(_img(p, k, w) for k, (p, w) in figures.items())}
<h2>Configuration</h2>{table(["field", "value"], [[k, json.dumps(v)] for k, v in sorted(config.to_dict().items())])}
<p>{html.escape(_provenance_text(summary["provenance"]))}</p>"""
    return title, body


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}
table.text td{white-space:normal;text-align:left;vertical-align:top;width:50%}
img.wide{width:100%}img.narrow{max-width:100%}code{background:#f3f3f3;padding:1px 4px}"""


def _page(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
{body}
<p>Intervals are two-sided 95% Student-t intervals of the mean over seeds; n is the number of
seeds. Rebuild with <code>bnlab report RUN_DIR</code>.</p>
</body></html>
"""


def _check_out(out: Path, flag: str = "--out ") -> None:
    """A report is written only as an .html file that is a plain file, if it exists."""
    if out.is_dir():
        raise ReportError(f"{flag}{out} is a folder; name a file, e.g. {out / 'report.html'}")
    if out.suffix.lower() not in (".html", ".htm") or out.is_symlink() or (
            out.exists() and not out.is_file()):
        raise ReportError(f"{flag}{out}: a report is written only to an .html file that is "
                          "not a link or a device; name one, e.g. bnlab-report.html")


def build_report(run_dir: str | Path) -> Path:
    """Write summary.json, figures/*.png and report.html into ``run_dir``; returns the
    report's path."""
    run_dir = Path(run_dir)
    _check_out(run_dir / "report.html", flag="")
    page = _page(*_run_files(run_dir))
    path = atomic_write(run_dir / "report.html", lambda fh: fh.write(page.encode()))
    log.info("report written: %s", path)
    return path


def build_combined_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """One self-contained page with a section per run, each run's own files rebuilt on the
    way."""
    out = Path(out)
    _check_out(out)
    parts, toc = [], []
    for i, run_dir in enumerate(run_dirs, 1):
        title, body = _run_files(Path(run_dir))
        body = body.replace("<h2>", "<h3>").replace("</h2>", "</h3>")
        body = body.replace("<h1>", f'<h2 id="run{i}">{i}. ').replace("</h1>", "</h2>")
        parts.append(f'<section>{body}<p>Run directory: <code>{html.escape(str(run_dir))}</code></p></section>')
        toc.append(f'<li><a href="#run{i}">{html.escape(title)}</a></li>')
    page = _page("bnlab report", f"<h1>bnlab report: {len(parts)} runs</h1><ol>{''.join(toc)}</ol>"
                 + "".join(parts))
    return atomic_write(out, lambda fh: fh.write(page.encode()))
