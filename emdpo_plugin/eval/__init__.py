"""Per-group evaluation, metrics.json, plots and report.md."""
