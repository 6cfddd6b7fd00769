"""bnlab.report: statistics over seeds, figures and a self-contained HTML report.

Reads run directories only (``config.json``, ``metrics.jsonl``); never imports the trainer.
"""

from .build import ReportError, build_combined_report, build_report, load_curves
from .stats import Interval, first_reaching, mean_interval, summarize_compare

__all__ = ["Interval", "ReportError", "build_combined_report", "build_report", "first_reaching", "load_curves",
           "mean_interval", "summarize_compare"]
