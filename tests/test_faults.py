"""Fault injection: a run of a reduced LM recipe is SIGKILLed at named points and resumed with
`--resume`; it must end with the same report/metrics.json as a run that was never interrupted.

Kills come from `emdpo_plugin.faults` (`EMDPO_FAULT=<point>[:<n>]`): the child process kills
itself at an exact place, so the tests are deterministic (no timing a kill from outside). The
recipe is the CPU default (recipes/emdpo_imdb_cpu.yaml) scaled down as in test_lm_pipeline.py and
cut to data -> sft -> dpo -> em -> minmax -> oracle -> report: every kind of stage that trains,
samples or evaluates, at about 20 seconds of stage time on 2 CPU cores. LoRA dropout is on, so
every fit draws random numbers: a resumed process must draw the same ones (`fit_seed`).

Compared: every number of metrics.json within 1e-6, except what measures the machine rather than
the result (`MEASURED`: seconds and peak memory per stage). One uninterrupted run is shared.

Concurrent runs into one folder are refused by the run lock, checked in test_recipe.py
(`test_second_run_into_a_locked_folder_fails_at_once_naming_the_holder`,
`test_lock_names_a_live_holder_process_and_dies_with_it`); here every resume after a SIGKILL
also shows that a killed run leaves no stale lock.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from emdpo_plugin.faults import ENV, POINTS
from emdpo_plugin.recipe.loader import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.config.users=24", "data.config.pairs_per_user=6", "data.config.test_size=8",
         "stages.sft.config.sft_steps=20", "model.train.lr_warmup_steps=0", "stages.sft.config.max_texts=300",
         "stages.em.config.iterations=2", "stages.minmax.config.prompts=8",
         "stages.minmax.config.steps=2000", "stages.report.config.regret_prompts=8",
         "model.generation.max_new_tokens=8",
         "model.lora.dropout=0.1",  # randomness in every fit, which a resumed process must draw alike
         "model.train.optimizer_state=carry"]  # each type's Adam state, which a resumed process must restore
STAGES = ("data", "sft", "dpo", "em", "minmax", "oracle", "report")
MEASURED = {"timings_s", "peak_rss_mib"}  # wall-clock seconds and memory: the host's, not the result's
TOL = 1e-6


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """The reduced recipe, resolved into one self-contained file (no extends, no output_dir)."""
    raw = load_recipe(ROOT / "recipes" / "emdpo_imdb_cpu.yaml", SMALL)
    raw["stages"] = [s for s in raw["stages"] if s["name"] in STAGES]
    for stage in raw["stages"]:  # the report and the oracle's budget name only stages that are kept
        stage["inputs"] = {slot: src for slot, src in stage["inputs"].items() if src in STAGES}
    raw.pop("output_dir", None)
    raw["name"] = "faults"
    path = tmp_path_factory.mktemp("recipe") / "faults.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(recipe: Path, out: Path, *overrides: str, fault: str | None = None, resume: bool = True) -> int:
    """`python -m emdpo_plugin run` in a child process (a SIGKILL hits the child, not pytest);
    returns its exit code, -SIGKILL when a fault point fired."""
    args = [sys.executable, "-m", "emdpo_plugin", "run", str(recipe), "--output-dir", str(out),
            *(["--resume"] if resume else []), *[a for o in overrides for a in ("--set", o)]]
    # a fresh process: no rendezvous variables inherited from in-process tests of this session
    env = {k: v for k, v in os.environ.items()
           if k not in {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", ENV}}
    if fault is not None:
        assert fault.partition(":")[0] in POINTS, fault
        env[ENV] = fault
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-4000:]}")
    return proc.returncode


def killed(recipe: Path, out: Path, fault: str) -> dict[str, Any]:
    """Run (resuming whatever `out` holds) until `fault` kills it; returns run.json as it was left."""
    assert run(recipe, out, fault=fault) == -signal.SIGKILL, f"{fault} never fired"
    return json.loads((out / "run.json").read_text())


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two JSON documents differ: numbers by more than TOL, anything else at all."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}: keys {sorted(set(a) ^ set(b))}"] if set(a) != set(b) else []
        return out + [d for k in sorted(set(a) & set(b)) for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        out = [f"{path}: length {len(a)} != {len(b)}"] if len(a) != len(b) else []
        return out + [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        same = a == b or abs(a - b) <= TOL or (math.isnan(a) and math.isnan(b))
        return [] if same else [f"{path}: {a!r} != {b!r}"]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} != {b!r}"]


def metrics(out: Path) -> dict[str, Any]:
    m = json.loads((out / "report" / "metrics.json").read_text())
    return {k: v for k, v in m.items() if k not in MEASURED}


def assert_finished_like(out: Path, baseline: Path) -> None:
    state = json.loads((out / "run.json").read_text())
    assert {n: s["status"] for n, s in state["stages"].items()} == dict.fromkeys(STAGES, "done")
    diff = differences(metrics(baseline), metrics(out))
    assert not diff, "resumed run differs from the uninterrupted one:\n" + "\n".join(diff[:40])


@pytest.fixture(scope="module")
def baseline(recipe, tmp_path_factory) -> Path:
    """One uninterrupted run, shared by every test here."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    assert run(recipe, out, resume=False) == 0
    return out


def test_the_comparison_sees_a_change_in_any_number():
    a = {"x": [1.0, {"y": 0.5}], "s": "a", "timings_s": {"em": 1}}
    assert differences(a, json.loads(json.dumps(a))) == []
    assert differences(a, {**a, "x": [1.0 + 5e-7, {"y": 0.5}]}) == []
    assert differences(a, {**a, "x": [1.0, {"y": 0.5 + 2e-6}]}) == [".x[1].y: 0.5 != 0.500002"]
    assert differences(a, {**a, "x": [1.0]}) == [".x: length 2 != 1"]
    assert differences({"a": None}, {"a": 0}) and differences({"a": 1}, {"b": 1})


@pytest.mark.slow
def test_kill_inside_an_em_m_step_resumes_from_the_last_finished_iteration(recipe, baseline, tmp_path):
    out = tmp_path / "run"
    state = killed(recipe, out, "em.m_step:2")  # iteration 2's M-step: iteration 1 is checkpointed
    assert state["stages"]["em"]["status"] == "running" and state["stages"]["dpo"]["status"] == "done"
    ckpt = json.loads((out / "em" / "restarts" / "r0" / "state.json").read_text())
    assert ckpt["iteration"] == 1 and not ckpt["done"]
    assert (out / "em" / "restarts" / "r0" / "type0" / "optimizer.pt").exists()  # the carried state
    assert run(recipe, out) == 0
    assert json.loads((out / "em" / "clustering.json").read_text())["resumed_from_iteration"] == [1]
    assert_finished_like(out, baseline)


@pytest.mark.slow
def test_kills_between_stages_lose_nothing(recipe, baseline, tmp_path):
    """Killed after sft was marked done, then (resumed) after em: each resume starts at the next stage."""
    out = tmp_path / "run"
    for fault, done in (("runner.stage_done:2", ["data", "sft"]), ("runner.stage_done:2", ["dpo", "em"])):
        before = {n for n, s in json.loads((out / "run.json").read_text())["stages"].items()
                  if s["status"] == "done"} if (out / "run.json").exists() else set()
        state = killed(recipe, out, fault)  # a count per process: the 2nd stage this process finished
        assert {n for n, s in state["stages"].items() if s["status"] == "done"} == before | set(done)
        assert all(s["status"] == "pending" for n, s in state["stages"].items() if n not in before | set(done))
    assert run(recipe, out) == 0
    assert_finished_like(out, baseline)


@pytest.mark.slow
def test_kills_inside_an_em_checkpoint_write_are_recovered_at_every_step(recipe, baseline, tmp_path):
    """`_Checkpoint.save` of iteration 2 killed at each step of its swap in turn (one process per
    kill); each resume recovers the last complete checkpoint and goes on from there."""
    out = tmp_path / "run"
    r0 = out / "em" / "restarts" / "r0"
    tmp, old = r0.with_name("r0.tmp"), r0.with_name("r0.old")

    def iteration(folder: Path) -> int:
        return json.loads((folder / "state.json").read_text())["iteration"]

    killed(recipe, out, "em.checkpoint.written:2")  # iteration 2 written to .tmp, iteration 1 in place
    assert iteration(tmp) == 2 and iteration(r0) == 1 and not old.exists()
    # resumed at iteration 2 (after recovery drops the .tmp): its save is this process's first
    killed(recipe, out, "em.checkpoint.swapping:1")  # iteration 1 moved aside, nothing in place
    assert iteration(tmp) == 2 and iteration(old) == 1 and not r0.exists()
    killed(recipe, out, "em.checkpoint.swapped:1")  # iteration 2 in place, iteration 1 not yet deleted
    assert iteration(r0) == 2 and iteration(old) == 1 and not tmp.exists()
    assert run(recipe, out) == 0  # the finished checkpoint is taken as it is: no iteration re-runs
    assert sorted(p.name for p in r0.parent.iterdir()) == ["r0"]
    # the checkpoint in place is the third process's, resumed from iteration 1
    assert json.loads((out / "em" / "clustering.json").read_text())["resumed_from_iteration"] == [1]
    log = (out / "run.log").read_text()
    assert log.count("em restart 0 iteration 1/2") == 1, log[-3000:]  # iteration 1 ran once, in the first process
    assert_finished_like(out, baseline)


@pytest.mark.slow
def test_resume_after_an_input_change_reruns_exactly_the_stages_downstream(recipe, baseline, tmp_path):
    """On the real LM graph (test_identity.py checks each kind of change on fixture trainers): a
    config change re-runs its stage and those that read it (the oracle reads EM's budget), an sft
    change every stage that loads its model, nothing else; run.json tells which ran."""
    out = tmp_path / "run"
    shutil.copytree(baseline, out)  # a finished run folder holds only run-relative paths

    def rerun(*overrides: str) -> set[str]:
        before = json.loads((out / "run.json").read_text())["stages"]
        assert run(recipe, out, *overrides) == 0
        after = json.loads((out / "run.json").read_text())["stages"]
        assert all(s["status"] == "done" for s in after.values())
        return {name for name in STAGES if after[name] != before[name]}  # a skipped stage's entry is kept as is

    assert rerun() == set()
    assert rerun("stages.em.config.min_responsibility=0.02") == {"em", "minmax", "oracle", "report"}
    assert rerun("stages.em.config.min_responsibility=0.02", "stages.dpo.config.seed=5") == {"dpo", "report"}
    assert rerun("stages.em.config.min_responsibility=0.02", "stages.dpo.config.seed=5",
                 "stages.sft.config.sft_steps=21") == set(STAGES) - {"data"}
