"""The paper's bandit (section 5.1) through the same builder, backend, EM loop and CLI as the LM path."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_builders.bandit import BanditConfig, BanditEnvironment, build
from emdpo_plugin.algorithms.em import e_step
from emdpo_plugin.algorithms.likelihood import comparison_loglik
from emdpo_plugin.algorithms.metrics import clustering_scores
from emdpo_plugin.backends.bandit import BanditBackend
from emdpo_plugin.data.schema import ComparisonSet
from emdpo_plugin.executors import LocalExecutor
from emdpo_plugin.trainers.em_dpo import EMConfig, _Checkpoint, run_em

ROOT = Path(__file__).resolve().parents[1]
OPENRLHF = str(Path(sys.executable).parent / "openrlhf")


def test_builder_follows_section_5_1():
    ds = build({}, seed=123)
    assert len(ds.train) == 200 * 10
    per_annotator = Counter(r.annotator_id for r in ds.train)
    assert len(per_annotator) == 200 and set(per_annotator.values()) == {10}
    groups = Counter(r.group for r in ds.train)
    assert set(groups) == {"group0", "group1", "group2"}
    assert groups["group0"] > groups["group1"] > groups["group2"]  # drawn with p = 0.6 / 0.3 / 0.1
    for r in ds.train:
        arms = [int(a.removeprefix("arm")) for a in r.responses]
        assert arms[0] != arms[1]  # documented choice: a pair is two distinct arms
        g = int(r.group.removeprefix("group"))
        x = np.array(json.loads(r.prompt))
        assert np.all((0 <= x) & (x <= 1))
        if g in arms:  # the group's own arm always wins (noise 0.01 vs reward gap 10 * sum(x))
            assert arms[r.ranking[0]] == g
    assert [r.to_record() for r in build({}, seed=123).train[:20]] == [r.to_record() for r in ds.train[:20]]


def test_regularised_optimum_has_zero_regret_and_uniform_has_positive():
    env = BanditEnvironment(BanditConfig())
    x = np.random.default_rng(0).uniform(size=(1000, 3))
    assert env.regret(1, x, env.optimal_probs(1, x, beta=1.0), beta=1.0) == pytest.approx(0.0, abs=1e-12)
    uniform = np.full((1000, 3), 1 / 3)
    assert env.regret(1, x, uniform, beta=1.0) == pytest.approx(10 * x.sum(1).mean() * (1 - 1 / 3), rel=0.01)


def _policy_away_from_reference(backend, seed):
    policy = backend.new_policy(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    return policy


@pytest.mark.parametrize("responses, eps", [(2, 0.0), (2, 0.01), (3, 0.01)])
def test_fit_loss_is_the_e_step_likelihood(responses, eps):
    """The M-step's fast loss (logit margins, feature-major) is the same weighted likelihood the
    E-step scores with `comparison_loglik`; otherwise EM's monotonicity guard would compare two
    objectives. A fit of 0 steps returns the loss of the policy as it is."""
    ds = build({"annotators": 30, "responses_per_comparison": responses}, seed=4)
    data = ComparisonSet(ds.train)
    backend = BanditBackend({"warm_epochs": 0, "label_smoothing": eps}, seed=4)
    policy = _policy_away_from_reference(backend, 3)
    w = np.random.default_rng(0).uniform(size=len(data)) * (np.arange(len(data)) % 5 > 0)  # some rows weight 0
    stats = backend.fit(policy, data, w, warm=True)
    ll = comparison_loglik(backend.score(policy, data.prompts, data.responses), backend.ref_score(data),
                           data.rankings, data.response_mask, backend.beta, eps)
    assert stats["loss"] == pytest.approx(-(w @ ll) / w.sum(), rel=1e-5)
    assert stats["rows"] == int((w > 0).sum())


def test_exact_L_is_the_expectation_that_sampling_estimates():
    from emdpo_plugin.trainers.minmax_ensemble import estimate_L

    backend = BanditBackend({}, seed=0)
    policies = [_policy_away_from_reference(backend, s) for s in (1, 2, 3)]
    prompts = backend.sample_prompts(400, seed=5)
    L = backend.exact_L(policies, prompts)
    # by hand for one entry: E_x sum_y pi_2(y|x) (log pi_0(y|x) + log 3)
    x = np.array([json.loads(p) for p in prompts])
    p0, p2 = backend.probs(policies[0], x), backend.probs(policies[2], x)
    assert L[0, 2] == pytest.approx(np.mean(np.sum(p2 * (np.log(p0) + np.log(3)), axis=1)), rel=1e-9)
    assert np.all(np.diag(L) >= 0)  # L[z, z] is KL(pi_z || uniform), averaged over x
    sampled = estimate_L(backend, policies, prompts, lambda j: backend.sample(policies[j], prompts, 200, seed=j))
    np.testing.assert_allclose(sampled, L, atol=0.05 * np.abs(L).max())


def test_tabular_game_is_uniform_with_equal_regrets():
    """The ideal answer recipes/bandit.yaml is checked against: on exact per-group policies (the
    paper's regularised optimum, and conservative DPO's population optimum at eps = 0.01) the
    game's weights are 1/3 each and the three groups' true regrets are equal, with Hedge at the
    recipe's eta and steps agreeing with the LP."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bandit_tabular", ROOT / "benchmarks" / "bandit_tabular.py")
    tab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tab)  # a script, not part of the package
    play, spread, tabular_logprobs = tab.play, tab.spread, tab.tabular_logprobs

    env = BanditEnvironment(BanditConfig())
    x = np.random.default_rng(0).uniform(size=(20_000, 3))
    for kind in ("optimum", "dpo"):
        res = play(env, x, tabular_logprobs(env, x, kind, beta=1.0, eps=0.01), beta=1.0, eta=0.05, steps=1000)
        np.testing.assert_allclose(res["lp_weights"], 1 / 3, atol=1e-6)
        np.testing.assert_allclose(res["hedge_weights"], 1 / 3, atol=1e-3)
        assert res["hedge_value"] == pytest.approx(res["lp_value"], rel=1e-3)
        assert spread(res["regret_hedge"]) <= 0.01
    # conservative DPO's optimum: margin log 99 between the group's arm and the others
    logp = tabular_logprobs(env, x, "dpo", beta=1.0, eps=0.01)
    assert np.median(logp[1, :, 1] - logp[1, :, 0]) == pytest.approx(np.log(99), rel=1e-9)
    with pytest.raises(ValueError, match="infinity"):
        tabular_logprobs(env, x, "dpo", beta=1.0, eps=0.0)


def _small(annotators=60, epochs=150, warm=50):
    ds = build({"annotators": annotators, "group_probs": [0.6, 0.4]}, seed=5)
    backend = BanditBackend({"epochs": epochs, "warm_epochs": warm, "label_smoothing": 0.01}, seed=5)
    return ComparisonSet(ds.train), backend


def test_em_log_likelihood_never_decreases_and_recovers_groups(tmp_path):
    """Algorithm 1 as written (exact E-step, the generalised-EM guard, no early stop)."""
    data, backend = _small()
    state, policies = run_em(backend, data, EMConfig(K=2, iterations=6, estep="exact", resp_tol=0), seed=1,
                             ckpt=_Checkpoint(tmp_path / "ck", "fp"), desc="em")
    ll = np.array(state["log_likelihood"])
    assert len(ll) == 6
    assert np.all(np.diff(ll) >= -1e-6 * np.abs(ll[:-1])), ll
    assert ll[-1] > ll[0]
    resp = np.exp(np.array(state["log_resp"]))
    assert clustering_scores(data.annotator_groups(), resp.argmax(1))["ari"] >= 0.9
    np.testing.assert_allclose(sum(state["eta"]), 1.0)


def test_em_stops_once_responsibilities_are_stable_and_ends_with_an_exact_estep(tmp_path):
    data, backend = _small()
    state, policies = run_em(backend, data, EMConfig(K=2, iterations=6), seed=1,
                             ckpt=_Checkpoint(tmp_path / "ck", "fp"), desc="em")
    assert state["stopped"] == "responsibilities stable" and 2 <= state["iteration"] < 6
    assert state["final_estep"] == "exact"
    # the reported posterior and likelihood are those of a fresh full E-step under the final policies
    ll = LocalExecutor().loglik_many(backend, policies, data, backend.ref_score(data))
    est = e_step(ll, data.annotator_index, data.n_annotators, np.array(state["eta"]))
    np.testing.assert_allclose(est.log_likelihood, state["log_likelihood"][-1], rtol=1e-9)
    np.testing.assert_allclose(est.log_resp, state["log_resp"], atol=1e-9)
    assert clustering_scores(data.annotator_groups(), est.log_resp.argmax(1))["ari"] >= 0.9
    assert state["ari_trace"][-1] >= 0.9 and len(state["ari_trace"]) == state["iteration"]
    cost = state["cost"]
    assert cost["rows_trained"] > 0 and cost["pairs_scored"] > 0 and cost["seconds"]["checkpoint"] > 0


def test_em_resumes_from_last_finished_iteration(tmp_path):
    data, backend = _small(annotators=30, epochs=60, warm=20)
    cfg = EMConfig(K=2, iterations=4, resp_tol=0)
    calls = {"n": 0}
    real_fit = backend.fit

    def dying_fit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 2 + 1:  # 2 seeding fits, 2 iterations of 2 types, then die mid-iteration 3
            raise KeyboardInterrupt("killed")
        return real_fit(*args, **kwargs)

    backend.fit = dying_fit
    ck = _Checkpoint(tmp_path / "ck", "fp")
    with pytest.raises(KeyboardInterrupt):
        run_em(backend, data, cfg, seed=3, ckpt=ck, desc="em")
    saved = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert saved["iteration"] == 2 and not saved["done"]

    calls["n"] = -10_000  # no more deaths; count fits of the resumed run
    state, _ = run_em(backend, data, cfg, seed=3, ckpt=ck, desc="em")
    assert state["iteration"] == 4 and calls["n"] == -10_000 + 2 * 2  # only iterations 3 and 4 ran
    assert state["log_likelihood"][:2] == saved["log_likelihood"]

    # a different config does not reuse the checkpoint
    assert _Checkpoint(tmp_path / "ck", "other").load(backend) is None


def test_restarts_keep_the_best_log_likelihood(tmp_path):
    from emdpo_plugin.trainers.base import StageContext
    from emdpo_plugin.trainers.em_dpo import EMDPOStage
    from emdpo_plugin.data.io import write_dataset_dir
    from emdpo_plugin.data.manifest import build_manifest

    ds = build({"annotators": 40, "group_probs": [0.5, 0.5]}, seed=2)
    write_dataset_dir(tmp_path / "data", ds.train, ds.test, build_manifest(ds.train, ds.test, builder="bandit", config=ds.config))
    backend = BanditBackend({"epochs": 60, "warm_epochs": 20}, seed=2)
    ctx = StageContext(run_dir=tmp_path, stage_name="em", seed=2, recipe={"model": {}}, _backend=backend)
    out = EMDPOStage().run(ctx, EMConfig(K=2, iterations=2, restarts=3),
                           {"dataset": {"dir": "data", "manifest": "data/manifest.json"}})
    cl = json.loads((tmp_path / "em" / "clustering.json").read_text())
    finals = [r["final_log_likelihood"] for r in cl["restarts"]]
    assert len(finals) == 3 and len(set(np.round(finals, 6))) > 1  # seeds differ
    assert cl["chosen_restart"] == int(np.argmax(finals))
    assert out["log_likelihood"] == pytest.approx(max(finals))
    assert sorted(out["policies"]) == ["em/type0", "em/type1"]


def test_a_clustering_stage_with_policies_is_em_step_zero(tmp_path):
    """`inputs: {init: <cluster_dpo stage>}`: its type policies are M-step 0 (an E-step under
    them, then warm M-steps), so EM retrains nothing from the reference."""
    from emdpo_plugin.data.io import write_dataset_dir
    from emdpo_plugin.data.manifest import build_manifest
    from emdpo_plugin.trainers.base import StageContext
    from emdpo_plugin.trainers.em_dpo import EMDPOStage

    ds = build({"annotators": 60, "group_probs": [0.6, 0.4]}, seed=5)
    write_dataset_dir(tmp_path / "data", ds.train, ds.test, build_manifest(ds.train, ds.test, builder="bandit", config=ds.config))
    data = ComparisonSet(ds.train)
    backend = BanditBackend({"epochs": 150, "warm_epochs": 50, "label_smoothing": 0.01}, seed=5)
    groups = sorted(set(data.annotator_groups()))
    hard = np.array([[g == k for k in groups] for g in data.annotator_groups()], dtype=float)
    (tmp_path / "kmeans").mkdir()
    policies = {}
    for k in range(2):  # a clustering stage's output: one policy per (true) cluster
        p = backend.new_policy(k)
        backend.fit(p, data, hard[data.annotator_index, k], warm=False)
        backend.save(p, tmp_path / "kmeans" / f"type{k}")
        policies[f"kmeans/type{k}"] = f"kmeans/type{k}"
    (tmp_path / "kmeans" / "clustering.json").write_text(json.dumps(
        {"annotator_ids": data.annotator_ids, "responsibilities": hard.tolist()}))
    init = {"policies": policies, "clustering": "kmeans/clustering.json",
            "epochs_seen": {name: 150.0 for name in policies}}
    fits = []
    real_fit = backend.fit
    backend.fit = lambda *a, **kw: fits.append(kw["warm"]) or real_fit(*a, **kw)
    ctx = StageContext(run_dir=tmp_path, stage_name="em", seed=5, recipe={"model": {}}, _backend=backend)
    out = EMDPOStage().run(ctx, EMConfig(K=2, iterations=2, resp_tol=0),
                           {"dataset": {"dir": "data", "manifest": "data/manifest.json"}, "init": init})
    assert out["start"] == "clustering policies"
    assert fits == [True] * 4  # 2 iterations x 2 types, every one warm: no fit from the reference
    assert out["ari"] == 1.0 and min(out["epochs_seen"].values()) > 150


def _run_cli(*args, cwd=ROOT):
    return subprocess.run([OPENRLHF, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_bandit_recipe_reproduces_the_paper(tmp_path):
    """recipes/bandit.yaml at Table 1's schedule, once, checked against section 5.1 and the
    tabular game (weights 1/3, equal regrets): DPO serves the majority; EM-DPO recovers the
    groups; MinMax-DPO's weights are near uniform and its per-group regrets near equal."""
    out = tmp_path / "bandit"
    proc = _run_cli("run", "recipes/bandit.yaml", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert all(s["status"] == "done" for s in run["stages"].values())
    m = json.loads((out / "report" / "metrics.json").read_text())
    dpo = {g: v["regret"] for g, v in m["policies"]["dpo"]["per_group"].items()}
    majority = max(m["dataset"]["groups"], key=m["dataset"]["groups"].get)
    for g, r in dpo.items():  # DPO serves the majority and leaves the minorities behind
        if g != majority:
            assert r >= 1.5 * dpo[majority], dpo
    ens = m["ensembles"]["minmax"]
    regrets = np.array(list(ens["per_group_regret"].values()))
    assert ens["max_regret"] <= 0.9 * max(dpo.values()), (ens, dpo)
    assert np.all(np.abs(regrets - regrets.mean()) <= 0.05 * regrets.mean()), regrets
    assert all(0.28 <= w <= 0.39 for w in ens["weights"]), ens["weights"]
    assert abs(ens["hedge_value"] - ens["lp_value"]) <= 1e-2 * abs(ens["lp_value"])
    ensemble = json.loads((out / "minmax" / "ensemble.json").read_text())
    assert ensemble["L_method"] == "exact"
    # the tabular game's regret at uniform weights is 10.0 per group (benchmarks/bandit_tabular.py)
    assert regrets.mean() == pytest.approx(10.0, rel=0.05)
    em = m["clustering"]["em"]
    assert em["ari"] >= 0.9
    ll = np.array(em["log_likelihood"])
    assert np.all(np.diff(ll) >= -1e-6 * np.abs(ll[:-1]))
    for f in ("report.md", "regret_after_aggregation.png", "accuracy_after_clustering.png", "weights_minmax.png"):
        assert (out / "report" / f).stat().st_size > 0
    assert "regret_after_aggregation.png" in (out / "report" / "report.md").read_text()

    # --resume on a finished run skips every stage and changes nothing
    before = (out / "report" / "metrics.json").read_text()
    again = _run_cli("run", "recipes/bandit.yaml", "--output-dir", str(out), "--resume")
    assert again.returncode == 0 and again.stdout.count("skip") == 5, again.stdout
    assert (out / "report" / "metrics.json").read_text() == before


def _recipe(tmp_path, body: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(f"extends: {ROOT / 'recipes' / 'bandit.yaml'}\nname: broken\n" + body)
    return p


@pytest.mark.parametrize("body, needle", [
    ("stages:\n  - {name: em, trainer: em_dpoo}\n", "em_dpoo"),
    ("stages:\n  - {name: em, config: {KK: 3}}\n", "stages.em.config.KK"),
    ("stages:\n  - {name: minmax, inputs: {policies: emm}}\n", "emm"),
])
def test_bad_recipes_fail_with_one_line(tmp_path, body, needle):
    proc = _run_cli("run", str(_recipe(tmp_path, body)), "--output-dir", str(tmp_path / "out"),
                    "--allow-extends-outside")  # the recipe extends recipes/bandit.yaml from tmp_path
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "out" / "run.json").exists()


def test_dry_run_prints_plan_without_running(tmp_path):
    proc = _run_cli("run", "recipes/bandit.yaml", "--dry-run", "--output-dir", str(tmp_path / "out"),
                    "--set", "stages.em.config.K=4")
    assert proc.returncode == 0, proc.stderr
    for stage in ("data", "dpo", "em", "minmax", "report"):
        assert stage in proc.stdout
    assert "K: 4" in proc.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("row, needle", [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "annotator_id"),
    ({"annotator_id": "a", "prompt": "p", "responses": ["x", "y"], "ranking": [0, 2]}, "ranking"),
    ({"annotator_id": "a", "prompt": "p", "responses": ["x", ""], "ranking": [0, 1]}, "responses"),
])
def test_data_validate_names_row_and_field(tmp_path, row, needle):
    good = {"annotator_id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    proc = _run_cli("data", "validate", str(f))
    assert proc.returncode != 0
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "row 2" in line and needle in line, line


def test_killed_run_resumes_from_last_finished_em_iteration(tmp_path):
    """SIGKILL during EM, then --resume: finished stages are skipped, EM continues where it was."""
    import signal
    import time

    out = tmp_path / "run"
    args = ["run", "recipes/bandit.yaml", "--output-dir", str(out),
            "--set", "data.config.annotators=60", "--set", "model.epochs=300", "--set", "model.warm_epochs=300",
            "--set", "stages.em.config.iterations=8", "--set", "stages.em.config.restarts=1",
            "--set", "stages.em.config.warm_start=true"]  # warm fits keep moving: no early fixed point
    proc = subprocess.Popen([OPENRLHF, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state_file = out / "em" / "restarts" / "r0" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if state_file.exists() and json.loads(state_file.read_text())["iteration"] >= 2:
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state_file.read_text())
    assert not killed_at["done"] and killed_at["iteration"] < 8
    run = json.loads((out / "run.json").read_text())
    assert run["stages"]["em"]["status"] == "running" and run["stages"]["dpo"]["status"] == "done"

    again = _run_cli(*args, "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "skip data" in again.stdout and "skip dpo" in again.stdout
    cl = json.loads((out / "em" / "clustering.json").read_text())
    assert cl["resumed_from_iteration"] == [killed_at["iteration"]]
    assert len(cl["log_likelihood"]) == 8
    assert cl["log_likelihood"][: killed_at["iteration"]] == killed_at["log_likelihood"]
