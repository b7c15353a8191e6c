"""Runs under launchers: `python -m emdpo_plugin`, the DeepSpeed launcher's `--local_rank`, and a
rank-aware run with 2 CPU processes under torchrun and under `deepspeed` (gloo).

Rank 0 drives every stage; the other rank serves its backend calls (training data parallel,
scoring and sampling sharded). The end-to-end runs use the CPU recipe reduced to minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emdpo_plugin import dist
from emdpo_plugin.cli import strip_local_rank
from emdpo_plugin.errors import EmdpoError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = ["data.config.users=24", "data.config.pairs_per_user=6", "data.config.test_size=8",
         "data.config.val_size=8", "stages.sft.config.sft_steps=20", "model.train.lr_warmup_steps=0", "stages.sft.config.max_texts=300",
         "stages.em.config.iterations=2", "stages.minmax.config.prompts=8", "stages.minmax.config.steps=2000",
         "stages.minmax_w14.config.prompts=8", "stages.minmax_kmeans.config.prompts=8",
         "stages.report.config.regret_prompts=8", "model.generation.max_new_tokens=8"]
DIST_VARS = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}


def _env() -> dict[str, str]:
    """A fresh process environment: no rendezvous variables left by in-process tests."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the deepspeed launcher starts `python3`
    return env


def test_local_rank_is_taken_out_of_argv(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank(["--local_rank=1", "run", "r.yaml"]) == ["run", "r.yaml"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_local_rank(["run", "--local-rank", "0", "r.yaml", "--resume"]) == ["run", "r.yaml", "--resume"]
    with pytest.raises(EmdpoError, match="--local_rank: expected a process index"):
        strip_local_rank(["--local_rank=x"])


def test_module_entry_point_accepts_the_launchers_argument():
    proc = subprocess.run([sys.executable, "-m", "emdpo_plugin", "--local_rank=0", "trainers", "dpo"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "dpo" in proc.stdout


def test_shard_and_gather_without_a_launcher_are_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    idx, mine = dist.shard(list("abcde"))
    assert mine == list("abcde") and dist.gather(idx, mine, 5) == list("abcde")
    assert not dist.launched() and dist.is_driver()


def _check_two_process_run(out: Path, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
    assert [s for s, v in run["stages"].items() if v["status"] != "done"] == []
    assert proc.stdout.count("start data") == 1  # rank 0 alone runs the stages
    m = json.loads((out / "report" / "metrics.json").read_text())
    for name in ("dpo", "em/type0", "em/type1", "minmax/ensemble"):
        for g, v in m["policies"][name]["per_group"].items():
            assert 0 <= v["accuracy"] <= 1, (name, g, v)
    assert (out / "minmax" / "routing.yaml").exists()
    assert not list(out.rglob("*.tmp*")), "a temporary file was left behind"


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    args = [str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "emdpo_plugin", "run",
            "recipes/emdpo_imdb_cpu.yaml", "--output-dir", str(out)]
    for s in SMALL:
        args += ["--set", s]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=_env())
    _check_two_process_run(out, proc)


@pytest.mark.slow
def test_deepspeed_launcher_two_processes(tmp_path):
    out = tmp_path / "run"
    args = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29531", "--module", "emdpo_plugin", "run",
            "recipes/emdpo_imdb_cpu.yaml", "--output-dir", str(out)]
    for s in SMALL:
        args += ["--set", s]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=_env())
    _check_two_process_run(out, proc)


def test_rank0_drives_and_workers_mirror_backend_calls(tmp_path):
    """Two gloo processes: every mirrored verb runs on both ranks with the same arguments, a deep
    copy of a policy reaches the worker in full, scoring is sharded and gathered, save runs on rank 0."""
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", str(ROOT / "tests" / "mirror_worker.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["new"] == [60, 61, 62] and r0["old"] == [40, 41, 42]
    assert r0["calls"] == ["new_policy", "fit", "fit", "score", "score", "save"]
    assert r1["calls"] == ["new_policy", "fit", "fit", "score", "score"]
