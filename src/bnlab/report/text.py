"""A run's summary as plain text, for the terminal."""

from __future__ import annotations

import json
from pathlib import Path

from .build import section

__all__ = ["summary_text", "text_table"]


def text_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths))) for r in cells)


def summary_text(run_dir: Path, report: Path) -> str:
    """The run's first table and its measured statements, from its summary."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    tables = section(summary["experiment"]).tables(summary)
    parts = [text_table(*tables[0])] if tables else []
    parts.append("\n".join("- " + m for m in summary["measured"]))
    parts.append(f"report: {report}")
    return "\n" + "\n\n".join(parts)
