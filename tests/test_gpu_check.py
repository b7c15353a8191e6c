"""benchmarks/gpu_check.py, the one script a GPU session runs, on CPU at its tiny size: it must not
rot between the (rare) sessions that have a GPU. Its stock-DPO comparison runs too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_runs_the_recipe_and_stock_dpo_at_tiny_size(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path),
                           "--size", "tiny", "--skip-launcher", "--timeout", "600"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = tmp_path.glob("gpu_check_*.json")
    report = json.loads(result.read_text())
    run = report["runs"]["no_launcher"]
    assert run["exit"] == 0 and run["mstep_tokens_per_s"] > 0
    assert {"dpo", "em", "minmax", "report"} <= set(run["stages"])
    stock = report["stock_dpo"]
    assert "error" not in stock, proc.stderr[-3000:]
    assert stock["fit_seconds"] > 0 and stock["tokens"] > 0 and stock["tokens_per_s"] > 0
    assert stock["mstep_over_stock_tokens_per_s"] == pytest.approx(run["mstep_tokens_per_s"] / stock["tokens_per_s"],
                                                                    rel=0.01)
    assert stock["peak_gpu_mib"] is None  # CPU: no GPU memory to compare
