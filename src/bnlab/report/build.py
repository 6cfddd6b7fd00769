"""Build a comparison's summary, figures and self-contained HTML report from its run
directory alone (``config.json`` and ``metrics.jsonl``); nothing here imports the trainer."""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

import numpy as np

from bnlab._io import atomic_write, read_jsonl, write_json
from .figures import LABELS, save_compare_figures
from .stats import format_interval, summarize_compare

log = logging.getLogger(__name__)

__all__ = ["ReportError", "build_report", "load_curves"]

METRICS = ("train_acc", "test_acc", "train_loss", "test_loss", "sgd_loss")


class ReportError(ValueError):
    """The run directory lacks what a report needs."""


def load_curves(run_dir: str | Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(config, {norm: {metric: (n_seeds, n_epochs)}}) from a run directory.

    Only seeds that completed every epoch count, so an interrupted run reports the finished
    seeds and says n honestly.
    """
    run_dir = Path(run_dir)
    config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
    for p in (config_path, metrics_path):
        if not p.is_file():
            raise ReportError(f"{run_dir} is not a run directory: {p.name} is missing")
    config = json.loads(config_path.read_text())
    rows = read_jsonl(metrics_path)
    epochs = config["epochs"]
    curves: dict[str, dict[str, np.ndarray]] = {}
    for norm in config["norms"]:
        by_seed: dict[int, dict[int, dict]] = {}
        for r in rows:
            if r["norm"] == norm:
                by_seed.setdefault(r["seed"], {})[r["epoch"]] = r
        complete = [s for s in sorted(by_seed) if len(by_seed[s]) == epochs]
        if complete:
            curves[norm] = {m: np.array([[by_seed[s][e][m] for e in range(1, epochs + 1)]
                                         for s in complete]) for m in METRICS}
    if not curves:
        raise ReportError(f"{run_dir}: no variant has a seed with all {epochs} epochs yet")
    return config, curves


def _img(path: str, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt_interval(d: dict | None, pct: bool = True, clip: bool | None = None) -> str:
    return "–" if d is None else format_interval(d, pct=pct, digits=2, clip=clip, show_n=False).replace("%", "")


def _variant_table(summary: dict) -> str:
    rows = []
    for norm, v in summary["variants"].items():
        rows.append(
            f"<tr><td>{html.escape(LABELS.get(norm, norm))}</td><td>{v['n']}</td>"
            f"<td>{_fmt_interval(v['final_test_acc'])}</td><td>{_fmt_interval(v['best_test_acc'])}</td>"
            f"<td>{_fmt_interval(v['final_train_acc'])}</td><td>{_fmt_interval(v['final_gap'], clip=False)}</td>"
            f"<td>{_fmt_interval(v['final_test_loss'], pct=False)}</td></tr>")
    return ("<table><tr><th>variant</th><th>n</th><th>final test acc % (95% CI)</th>"
            "<th>best test acc %</th><th>final train acc %</th><th>train − test gap (pts)</th>"
            "<th>final test loss</th></tr>" + "".join(rows) + "</table>")


def _target_table(summary: dict) -> str:
    t = summary.get("epochs_to_target")
    if not t or not t["variants"]:
        return "<p>No baseline (plain) variant in this run, so no epochs-to-target.</p>"
    rows = []
    for norm, v in t["variants"].items():
        epoch = "not reached" if v["epoch"] is None else str(v["epoch"])
        ratio = "–" if v["ratio"] is None else f"{v['ratio']:.1f}×"
        per_seed = ", ".join("–" if e is None else str(e) for e in v["per_seed_epochs"])
        rows.append(f"<tr><td>{html.escape(LABELS.get(norm, norm))}</td><td>{epoch}</td>"
                    f"<td>{t['baseline_epochs']}</td><td>{ratio}</td><td>{per_seed}</td></tr>")
    milestones = "".join(
        f"<tr><td>{m['baseline_epoch']}</td><td>{m['test_acc'] * 100:.2f}</td>"
        + "".join(f"<td>{'not reached' if e is None else e}</td>" for e in m["epochs"].values())
        + "</tr>" for m in summary.get("milestones", []))
    heads = "".join(f"<th>{html.escape(LABELS.get(n, n))} first reached it at epoch</th>"
                    for n in t["variants"])
    milestone_table = ("<p>The same question at several horizons:</p><table><tr><th>plain epoch</th>"
                       f"<th>plain mean test acc %</th>{heads}</tr>{milestones}</table>")
    return (f"<p>Target: the plain network's mean final test accuracy, "
            f"<b>{t['target_test_acc'] * 100:.2f}%</b> after {t['baseline_epochs']} epochs.</p>"
            "<table><tr><th>variant</th><th>first epoch at target (mean curve)</th>"
            "<th>plain epochs</th><th>ratio</th><th>per seed (vs that seed's plain final)</th></tr>"
            + "".join(rows) + "</table>" + milestone_table)


def verdict(summary: dict) -> list[str]:
    """Plain-language statements of whether the seed's two claims hold in this run."""
    t, v = summary.get("epochs_to_target"), summary["variants"]
    lines = []
    if not t or "bn" not in t["variants"]:
        return lines
    bn, base = t["variants"]["bn"], t["baseline"]
    if bn["epoch"] is None:
        lines.append("Faster convergence: NOT observed: BN never reached the plain network's "
                     "final test accuracy.")
    else:
        lines.append(f"Faster convergence: BN reached the plain network's final test accuracy "
                     f"({t['target_test_acc'] * 100:.2f}%, epoch {t['baseline_epochs']}) at epoch "
                     f"{bn['epoch']}, {bn['ratio']:.1f}× fewer epochs (seed's claim: 100 vs 20-30, "
                     f"3.3-5×).")
    b, p = v["bn"]["final_test_acc"], v[base]["final_test_acc"]
    if b["n"] >= 2 and p["n"] >= 2:
        if b["low"] > p["high"]:
            word = "holds: the 95% intervals do not overlap"
        elif b["mean"] > p["mean"]:
            word = "higher on average, but the 95% intervals overlap"
        else:
            word = "NOT observed: BN's mean is not higher"
    else:
        word = "higher" if b["mean"] > p["mean"] else "NOT observed"
        word += " (a single seed: no interval)"
    lines.append(f"Higher final test accuracy: BN {b['mean'] * 100:.2f}% vs plain "
                 f"{p['mean'] * 100:.2f}% (n={b['n']}, {p['n']}); {word}.")
    return lines


_CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}
code{background:#f3f3f3;padding:1px 4px}.verdict{background:#f6f8fa;border-left:4px solid #1f77b4;padding:.5em 1em}"""


def _page(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
{body}
<p>Intervals are two-sided 95% Student-t intervals of the mean over seeds; n is the number of
seeds. Rebuild with <code>bnlab report RUN_DIR</code>.</p>
</body></html>
"""


def compare_body(config: dict, summary: dict, figures: dict[str, str]) -> tuple[str, str]:
    """(title, HTML body) of a ``bnlab compare`` run's report."""
    cfg_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v))}</td></tr>"
                       for k, v in sorted(config.items()))
    arch = (f"{config['depth']} × {config['width']} {config['activation']}, "
            f"init N(0, {config['init_scale']}²), SGD lr {config['lr']}"
            f"{', momentum ' + str(config['momentum']) if config['momentum'] else ''}, "
            f"batch {config['batch_size']}")
    verdict_html = "".join(f"<li>{html.escape(s)}</li>" for s in verdict(summary))
    body = f"""<h1>Fully connected vs fully connected + Batch Normalization</h1>
<p>Dataset <b>{html.escape(config['dataset'])}</b>; {html.escape(arch)};
{config['epochs']} epochs; seeds 0..{config['seeds'] - 1}. Accuracies and losses are measured in
inference mode over the whole training and test sets after every epoch; n counts the seeds
that completed every epoch.</p>
<div class="verdict"><ul>{verdict_html}</ul></div>
<h2>Final accuracy</h2>{_variant_table(summary)}
<h2>Epochs to target</h2>{_target_table(summary)}
<h2>Accuracy</h2>{_img(figures['accuracy'], 'accuracy per epoch')}
<h2>Loss</h2>{_img(figures['loss'], 'loss per epoch')}
<h2>Configuration</h2><table>{cfg_rows}</table>"""
    return f"bnlab compare: {config['dataset']}", body


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def experiment_body(config: dict, section, figures: dict[str, str]) -> tuple[str, str]:
    """(title, HTML body) of a named experiment: expected and measured side by side,
    numbers, figures."""
    measured = "".join(f"<li>{html.escape(m)}</li>" for m in section.measured)
    tables = "".join(_table(h, rows) for h, rows in section.tables)
    imgs = "".join(_img(path, key) for key, path in figures.items())
    cfg_rows = [[k, json.dumps(v)] for k, v in sorted(config.items())]
    body = f"""<h1>{html.escape(section.title)}</h1>
<table><tr><th>expected (literature)</th><th>measured (this run)</th></tr>
<tr><td style="text-align:left;vertical-align:top">{html.escape(section.expected)}</td>
<td style="text-align:left;vertical-align:top"><ul>{measured}</ul></td></tr></table>
<h2>Numbers</h2>{tables}
<h2>Figures</h2>{imgs}
<h2>Configuration</h2>{_table(["field", "value"], cfg_rows)}"""
    return section.title, body


def _experiment_files(run_dir: Path) -> tuple[str, str]:
    from .experiments import SECTIONS
    from .figures import save_figure

    path = run_dir / "results.json"
    if not path.is_file():
        raise ReportError(f"{run_dir}: results.json is missing; the run has not finished "
                          f"(continue it with --resume {run_dir})")
    results = json.loads(path.read_text())
    name = results["experiment"]
    section = SECTIONS[name](results)
    figures = {key: save_figure(fig, run_dir / "figures" / f"{key}.png")
               for key, fig in section.figures.items()}
    write_json(run_dir / "summary.json", {"experiment": name, "expected": section.expected,
                                           "measured": section.measured, **section.summary})
    return experiment_body(results["config"], section, figures)


def _compare_files(run_dir: Path) -> tuple[str, str]:
    config, curves = load_curves(run_dir)
    summary = summarize_compare(curves)
    summary["config"] = config
    summary["verdict"] = verdict(summary)
    write_json(run_dir / "summary.json", summary)
    figures = save_compare_figures(curves, summary, run_dir / "figures")
    return compare_body(config, summary, figures)


def _run_files(run_dir: Path) -> tuple[str, str]:
    """Write a run's summary.json and figures; return its report's (title, body)."""
    config_path = run_dir / "config.json"
    if config_path.is_file() and "experiment" in json.loads(config_path.read_text()):
        return _experiment_files(run_dir)
    return _compare_files(run_dir)


def build_report(run_dir: str | Path) -> Path:
    """Write summary.json, figures/*.png and report.html into ``run_dir``; returns the
    report's path. Works for ``bnlab compare`` runs and for named experiments."""
    run_dir = Path(run_dir)
    page = _page(*_run_files(run_dir))
    path = atomic_write(run_dir / "report.html", lambda fh: fh.write(page.encode()))
    log.info("report written: %s", path)
    return path


def build_combined_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """One self-contained page with a section per run (compare runs and experiments alike),
    each run's own files rebuilt on the way."""
    parts, toc = [], []
    for i, run_dir in enumerate(run_dirs, 1):
        title, body = _run_files(Path(run_dir))
        body = body.replace("<h2>", "<h3>").replace("</h2>", "</h3>")
        body = body.replace("<h1>", f'<h2 id="run{i}">{i}. ').replace("</h1>", "</h2>")
        parts.append(f'<section>{body}<p>Run directory: <code>{html.escape(str(run_dir))}</code></p></section>')
        toc.append(f'<li><a href="#run{i}">{html.escape(title)}</a></li>')
    body = (f"<h1>bnlab report: {len(parts)} runs</h1><ol>{''.join(toc)}</ol>" + "".join(parts))
    page = _page("bnlab report", body)
    return atomic_write(out, lambda fh: fh.write(page.encode()))
