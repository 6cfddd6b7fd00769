"""bnlab.report: statistics over seeds, figures and a self-contained HTML report.

Reads run directories only (``config.json``, ``run.json``, ``metrics.jsonl``); never imports
the trainer, and switches no matplotlib backend.
"""

from .build import ReportError, build_combined_report, build_report
from .stats import Interval, first_reaching, mean_interval

__all__ = ["Interval", "ReportError", "build_combined_report", "build_report", "first_reaching",
           "mean_interval"]
