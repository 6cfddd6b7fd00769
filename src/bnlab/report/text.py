"""A run's summary as plain text, for the terminal, and what ``bnlab report`` prints."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

from .build import build_report, render, section, write_page

__all__ = ["report_command", "summary_lines", "summary_text", "text_table"]

MIN_WIDTH = 60  # a narrower terminal gets lines this long, wrapped by the terminal


def terminal_width() -> int:
    """The terminal's columns (120 when the output is not a terminal)."""
    return max(MIN_WIDTH, shutil.get_terminal_size((120, 24)).columns)


def _rows(header: list[str], rows: list[list]) -> list[list[str]]:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return [[c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
            for r in cells]


def text_table(header: list[str], rows: list[list], width: int | None = None) -> str:
    """A fixed-width table; one wider than ``width`` columns is cut into blocks of columns,
    each repeating the first (the row's name)."""
    cells = _rows(header, rows)
    if width is None or len("  ".join(cells[0])) <= width:
        return "\n".join("  ".join(r).rstrip() for r in cells)
    blocks, block, used = [], [], len(cells[0][0])
    for j in range(1, len(header)):
        w = len(cells[0][j]) + 2
        if block and used + w > width:
            blocks.append(block)
            block, used = [], len(cells[0][0])
        block.append(j)
        used += w
    blocks.append(block)
    return "\n\n".join("\n".join("  ".join([r[0]] + [r[j] for j in b]).rstrip() for r in cells)
                       for b in blocks)


def summary_lines(summary: dict, width: int | None = None) -> str:
    """A summary's setting, first table and measured statements, ``width`` columns wide."""
    width = width or terminal_width()
    wrap = lambda text, lead: textwrap.fill(text, width, initial_indent=lead,  # noqa: E731
                                            subsequent_indent=" " * len(lead),
                                            break_on_hyphens=False)
    parts = []
    if summary.get("setting"):
        parts.append(wrap(summary["setting"], "setting: "))
    tables = section(summary["experiment"]).tables(summary)
    if tables:
        parts.append(text_table(*tables[0], width=width))
    parts.append("\n".join(wrap(m, "- ") for m in summary["measured"]))
    return "\n\n".join(parts)


def summary_text(run_dir: Path, report: Path, width: int | None = None) -> str:
    """The run's setting, first table and measured statements, from its summary.json."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    return f"\n{summary_lines(summary, width)}\n\nreport: {report}"


def report_command(run_dirs: list[Path], out: Path | None = None,
                   width: int | None = None) -> str:
    """``bnlab report RUN_DIR... [--out FILE.html]``; returns what it prints.

    Without ``out``, each run's summary.json, figures and report.html are rebuilt in its own
    directory, and the summary of each is returned with its report's path. With ``out``, one
    self-contained page (a section per run, or the one run's page) is written there and the
    run directories are only read: an archived or read-only run can be rendered.
    """
    if out is None:
        reports = [(Path(d), build_report(d)) for d in run_dirs]
        return "\n".join(summary_text(d, r, width) for d, r in reports)
    rendered = [render(d) for d in run_dirs]
    page = write_page(rendered, out)
    if len(rendered) == 1:
        return f"\n{summary_lines(rendered[0].summary, width)}\n\nreport: {page}"
    return "\n".join([f"report: {page}, a section per run:"]
                     + [f"  {i}. {r.run_dir}: {r.title}" for i, r in enumerate(rendered, 1)])
