"""The comparison report: results.py reads what train/evaluate stored, figures.py draws, build.py writes it."""

from pipeline.report.build import ReportInputs, build_report, log_to_mlflow

__all__ = ["ReportInputs", "build_report", "log_to_mlflow"]
