"""The Ray executor (`executor: {kind: ray}`) on a local Ray instance, on CPU.

The K type fits of an EM iteration run in K actor groups at once; the results must match the
local executor's, and run.json must show when each fit ran (the intervals overlap).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("ray")

from emdpo_plugin.algorithms.metrics import clustering_scores  # noqa: E402
from emdpo_plugin.recipe.runner import run_plan  # noqa: E402
from emdpo_plugin.recipe.schema import validate_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OPENRLHF = str(Path(sys.executable).parent / "openrlhf")
RAY = {"kind": "ray", "object_store_mb": 300}  # a small local Ray: this box is shared


def _bandit_recipe(executor: dict) -> dict:
    """recipes/bandit.yaml cut to its data and EM stages: 2 groups, 60 annotators, 3 iterations."""
    raw = yaml.safe_load((ROOT / "recipes" / "bandit.yaml").read_text())
    raw["data"]["config"].update(annotators=60, group_probs=[0.6, 0.4])
    raw["model"].update(epochs=300, warm_epochs=300)  # long enough (~0.5 s) that overlap is unmistakable
    em = next(s for s in raw["stages"] if s["name"] == "em")
    em["config"].update(K=2, iterations=3, restarts=1, tol=0.0)
    raw["stages"] = [s for s in raw["stages"] if s["name"] in ("data", "em")]
    raw["executor"] = executor
    return raw


def _groups(run: Path, annotator_ids: list[str]) -> list[str]:
    data = json.loads((run / "run.json").read_text())["stages"]["data"]["outputs"]
    group = {}
    for line in (run / data["dir"] / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        group[row["annotator_id"]] = row["group"]
    return [group[a] for a in annotator_ids]


def _em_result(run: Path) -> tuple[float, np.ndarray, np.ndarray]:
    cl = json.loads((run / "em" / "clustering.json").read_text())
    resp = np.array(cl["responsibilities"])
    ari = clustering_scores(_groups(run, cl["annotator_ids"]), resp.argmax(1))["ari"]
    return ari, np.array(cl["eta"]), resp


def _iterations(timeline: list[dict], K: int) -> list[list[dict]]:
    assert len(timeline) % K == 0, timeline
    return [timeline[i: i + K] for i in range(0, len(timeline), K)]


def _assert_overlap(fits: list[dict]) -> None:
    """All K fits of one iteration were running at one moment: the latest start precedes the earliest end."""
    assert max(f["start"] for f in fits) < min(f["end"] for f in fits), fits


def test_recipe_executor_section_and_overrides():
    from emdpo_plugin.errors import RecipeError
    from emdpo_plugin.recipe.loader import load_recipe

    plan = validate_recipe(load_recipe(ROOT / "recipes" / "bandit.yaml"))
    assert plan.executor.kind == "local"  # the default
    raw = load_recipe(ROOT / "recipes" / "bandit.yaml", ["executor.kind=ray", "executor.address=auto",
                                                         "executor.gpus_per_type=2"])
    ex = validate_recipe(raw).executor
    assert (ex.kind, ex.address, ex.gpus_per_type) == ("ray", "auto", 2)
    with pytest.raises(RecipeError, match="executor.bogus"):
        validate_recipe(load_recipe(ROOT / "recipes" / "bandit.yaml", ["executor.bogus=1"]))


def test_bandit_em_on_ray_matches_local_and_overlaps(tmp_path):
    local, ray_run = tmp_path / "local", tmp_path / "ray"
    run_plan(validate_recipe(_bandit_recipe({"kind": "local"})), local)
    run_plan(validate_recipe(_bandit_recipe(RAY)), ray_run)
    import ray

    assert not ray.is_initialized()  # the executor stopped the Ray it started

    state = json.loads((ray_run / "run.json").read_text())
    assert state["executor"]["kind"] == "ray"
    timeline = [f for f in state["stages"]["em"]["fit_timeline"] if not f["desc"].startswith("seed")]
    iterations = _iterations(timeline, 2)  # the seeding fits run one at a time: left out
    assert len(iterations) == 3
    for fits in iterations:
        assert [f["worker"] for f in fits] == ["ray:type0", "ray:type1"]
        assert [f["desc"].rsplit(" ", 1)[-1] for f in fits] == ["type0", "type1"]
        assert all(f["end"] > f["start"] for f in fits)
        _assert_overlap(fits)
    assert "fit_timeline" not in state["stages"]["data"]
    local_timeline = json.loads((local / "run.json").read_text())["stages"]["em"]["fit_timeline"]
    assert {f["worker"] for f in local_timeline} == {"local"} and len(local_timeline) == 2 + 6  # seeds + 3 x K

    ari_local, eta_local, resp_local = _em_result(local)
    ari_ray, eta_ray, resp_ray = _em_result(ray_run)
    assert ari_local >= 0.9 and ari_ray == pytest.approx(ari_local)
    np.testing.assert_allclose(eta_ray, eta_local, atol=1e-4)
    np.testing.assert_allclose(resp_ray, resp_local, atol=1e-4)


@pytest.mark.slow  # three actor groups: each actor imports the OpenRLHF stack (~9 s of CPU)
def test_executor_verbs_groups_scoring_and_errors(tmp_path):
    """More groups appear when a call has more jobs; sharded scoring equals local scoring; an
    actor's exception reaches the driver as one EmdpoError naming the type and the remote error."""
    from data_builders.bandit import build
    from emdpo_plugin.backends.bandit import BanditBackend
    from emdpo_plugin.data.schema import ComparisonSet
    from emdpo_plugin.errors import EmdpoError
    from emdpo_plugin.executors import ExecutorConfig, FitJob, LocalExecutor, make_executor

    model = {"epochs": 40, "warm_epochs": 20, "label_smoothing": 0.01}
    recipe = {"seed": 5, "model": {"backend": "bandit", **model}}
    backend = BanditBackend(model, seed=5)
    data = ComparisonSet(build({"annotators": 30, "group_probs": [0.6, 0.4]}, seed=5).train)
    weights = np.random.default_rng(0).uniform(size=(len(data), 3))
    ref = backend.ref_score(data)

    ex = make_executor(ExecutorConfig(**RAY, cpus_per_type=0.5), recipe, tmp_path)
    try:
        assert ex.kind == "ray"
        first = backend.new_policy(1)
        ex.fit_many(backend, data, [FitJob(first, weights[:, 0], False, "one")])
        assert len(ex.groups) == 1
        policies = [first, backend.new_policy(2), backend.new_policy(3)]
        before = [p.state_dict()["4.weight"].clone() for p in policies]
        stats = ex.fit_many(backend, data, [FitJob(p, weights[:, k], True, f"t{k}") for k, p in enumerate(policies)])
        assert len(ex.groups) == 3 and [s["steps"] for s in stats] == [20, 20, 20]
        assert all(not np.allclose(b, p.state_dict()["4.weight"]) for b, p in zip(before, policies))  # updated in place
        assert [e["worker"] for e in ex.timeline[-3:]] == ["ray:type0", "ray:type1", "ray:type2"]

        expected = [backend.new_policy(1)]  # the same fits, locally
        LocalExecutor().fit_many(backend, data, [FitJob(expected[0], weights[:, 0], False, "")])
        expected += [backend.new_policy(2), backend.new_policy(3)]
        LocalExecutor().fit_many(backend, data, [FitJob(p, weights[:, k], True, "") for k, p in enumerate(expected)])
        ll = ex.loglik_many(backend, policies, data, ref)
        assert ll.shape == (len(data), 3)
        np.testing.assert_allclose(ll, LocalExecutor().loglik_many(backend, expected, data, ref), atol=1e-9)

        with pytest.raises(EmdpoError, match=r"'bad1' on actor type1 rank 0 failed: IndexError"):
            ex.fit_many(backend, data, [FitJob(policies[0], weights[:, 0], True, "ok0"),
                                        FitJob(policies[1], weights[:5, 1], True, "bad1")])
        with pytest.raises(EmdpoError, match=r"5 types need 2\.5 CPU .* has 2 CPU"):
            ex.fit_many(backend, data, [FitJob(backend.new_policy(k), weights[:, 0], True, "") for k in range(5)])
    finally:
        ex.close()


def _cli(*args: str) -> subprocess.CompletedProcess:
    # a fresh process: no rendezvous variables inherited from in-process tests of this session
    env = {k: v for k, v in os.environ.items()
           if k not in {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    return subprocess.run([OPENRLHF, *args], cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)


@pytest.mark.slow
def test_lm_recipe_on_ray_matches_local(tmp_path):
    """The CPU language-model recipe, reduced to data, sft, kmeans, em and report: with
    `--set executor.kind=ray` Cluster-DPO's two fits and every EM iteration's two fits run side by
    side, and the results match the local executor's. The Ray run reuses the local run's data
    and SFT stages (`--resume`), so only the stages that use the executor run twice."""
    from emdpo_plugin.recipe.loader import load_recipe

    small = ["data.config.users=24", "data.config.pairs_per_user=8", "data.config.test_size=32",
             "stages.sft.config.sft_steps=20", "stages.sft.config.max_texts=300",
             "stages.em.config.iterations=2", "stages.report.config.regret_prompts=4",
             "model.generation.max_new_tokens=8"]
    raw = load_recipe(ROOT / "recipes" / "emdpo_imdb_cpu.yaml", small)
    raw["stages"] = [s for s in raw["stages"] if s["name"] in ("data", "sft", "kmeans", "em", "report")]
    report = raw["stages"][-1]
    report["inputs"] = {k: v for k, v in report["inputs"].items() if k in ("dataset", "kmeans", "em")}
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(yaml.safe_dump(raw))

    local, ray_run = tmp_path / "local", tmp_path / "ray"
    proc = _cli("run", str(recipe), "--output-dir", str(local))
    assert proc.returncode == 0, proc.stderr[-4000:]
    shutil.copytree(local, ray_run, ignore=shutil.ignore_patterns("kmeans", "em", "report"))
    state = json.loads((ray_run / "run.json").read_text())
    for name in ("kmeans", "em", "report"):
        state["stages"][name]["status"] = "pending"
    (ray_run / "run.json").write_text(json.dumps(state))
    proc = _cli("run", str(recipe), "--output-dir", str(ray_run), "--resume",
                "--set", "executor.kind=ray", "--set", "executor.object_store_mb=300")
    assert proc.returncode == 0, proc.stderr[-4000:]

    state = json.loads((ray_run / "run.json").read_text())
    assert state["executor"]["kind"] == "ray"
    assert state["stages"]["sft"]["seconds"] == json.loads((local / "run.json").read_text())["stages"]["sft"]["seconds"]
    kmeans, em = state["stages"]["kmeans"]["fit_timeline"], state["stages"]["em"]["fit_timeline"]
    em = [f for f in em if not f["desc"].startswith("seed")]  # seeding fits run one at a time
    assert len(kmeans) == 2 and len(em) == 4
    for fits in [kmeans] + _iterations(em, 2):
        assert [f["worker"] for f in fits] == ["ray:type0", "ray:type1"]
        _assert_overlap(fits)

    m_local = json.loads((local / "report" / "metrics.json").read_text())
    m_ray = json.loads((ray_run / "report" / "metrics.json").read_text())
    for stage in ("kmeans", "em"):
        assert m_ray["clustering"][stage]["ari"] == pytest.approx(m_local["clustering"][stage]["ari"], abs=0.05)
    # Per-group accuracy: 32 test rows per group here, so one row is 0.031 and the actors' single-thread
    # float sums (the local run uses two threads) flip a row or two; the full recipe (128 rows per
    # group) is held to 0.05 by hand (docs/scale-out.md, Ray executor).
    acc = {name: {g: (v["accuracy"], m_ray["policies"][name]["per_group"][g]["accuracy"])
                  for g, v in policy["per_group"].items()}
           for name, policy in m_local["policies"].items() if name.startswith(("em/", "kmeans/"))}
    assert all(abs(a - b) <= 2 / 32 + 1e-9 for groups in acc.values() for a, b in groups.values()), acc


@pytest.mark.slow
def test_data_parallel_type_group_on_ray(tiny_model, tmp_path):
    """`gpus_per_type: 2` makes a type's group two DeepSpeed ranks (rendezvous through the host's
    BaseDistributedActor). A CPU box has no GPUs, so this test gives its own Ray two logical
    ones: the placement and rendezvous are the real ones, training runs over gloo on CPU."""
    import ray

    from emdpo_plugin.executors import ExecutorConfig, FitJob, LocalExecutor, make_executor
    from emdpo_plugin.recipe.runner import default_backend_factory

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=300 << 20,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                                       "TQDM_DISABLE": "1"}})
    try:
        recipe = {"seed": 0, "model": {
            "backend": "openrlhf", "pretrain": str(tiny_model), "max_len": 64, "beta": 0.1, "eval_batch_size": 32,
            "lora": {"rank": 8}, "train": {"lr": 1e-2, "micro_batch_size": 8, "batch_size": 16, "lr_warmup_steps": 1}}}
        backend = default_backend_factory(recipe, tmp_path)
        data = _lm_pairs()
        ref = backend.ref_score(data)
        policy = backend.new_policy(0)
        before = LocalExecutor().loglik_many(backend, [policy], data, ref)
        ex = make_executor(ExecutorConfig(kind="ray", gpus_per_type=2), recipe, tmp_path)
        try:
            stats = ex.fit_many(backend, data, [FitJob(policy, np.ones(len(data)), False, "dp fit")])
            assert [g.world_size for g in ex.groups] == [2]
            assert stats[0]["rows"] == len(data)
            local_after = LocalExecutor().loglik_many(backend, [policy], data, ref)
            assert local_after.mean() > before.mean() + 0.01  # the trained adapter came back to the driver
            np.testing.assert_allclose(ex.loglik_many(backend, [policy], data, ref), local_after, atol=1e-4)
        finally:
            ex.close()
        assert ray.is_initialized()  # not the executor's Ray: left running
    finally:
        ray.shutdown()


def _lm_pairs(n: int = 32):
    from emdpo_plugin.data.schema import Comparison, ComparisonSet

    good, bad = " a great and moving film", " a dull and boring film"
    return ComparisonSet([Comparison(f"a{i % 4}", f"review {i % 8}: it was", [good, bad] if i % 2 else [bad, good],
                                     [0, 1] if i % 2 else [1, 0], f"c{i}") for i in range(n)])
