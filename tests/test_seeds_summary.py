"""Several seeds (`run --seeds`, eval/summary.py) and per-row dumps (eval/per_row.py).

The unit tests build seed runs on disk the way the report stage leaves them (run.json,
report/metrics.json, report/per_row.npz) from a known generative process, so the bootstrap's
intervals and the matched-group names can be checked against the truth. The slow test runs the
bandit recipe, reduced, for two seeds through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emdpo_plugin import cli
from emdpo_plugin.algorithms.metrics import preference_metrics
from emdpo_plugin.data.io import write_dataset_dir
from emdpo_plugin.data.manifest import build_manifest
from emdpo_plugin.data.schema import Comparison, ComparisonSet
from emdpo_plugin.errors import RecipeError
from emdpo_plugin.eval.per_row import read_per_row, reward_differences, write_per_row
from emdpo_plugin.eval.summary import (
    load_seed_run,
    seed_dir,
    summarize_policy,
    PolicySeed,
    write_summary,
)
from emdpo_plugin.recipe.seeds import parse_seeds

GROUPS = ("grammar", "sentiment")
# true mean reward difference of each (summary) policy on each group
TRUTH = {"dpo": {"grammar": 0.1, "sentiment": 0.6}, "em/grammar": {"grammar": 0.9, "sentiment": -0.2},
         "em/sentiment": {"grammar": -0.3, "sentiment": 1.0}, "minmax/ensemble": {"grammar": 0.4, "sentiment": 0.4}}


def _fake_seed(root: Path, seed: int, *, prompts: int = 60, matching: str = "matched_group",
               seed_sd: float = 0.3) -> Path:
    """A finished seed run: type indices swap with the seed's parity; per-row diffs ~ N(truth + seed effect, 1)."""
    rng = np.random.default_rng(1000 + seed)
    run = seed_dir(root, seed)
    (run / "report").mkdir(parents=True)
    swap = seed % 2 == 1
    type_of = {"em/grammar": "em/type1" if swap else "em/type0", "em/sentiment": "em/type0" if swap else "em/type1"}
    names = {"dpo": "dpo", **type_of, "minmax/ensemble": "minmax/ensemble"}  # summary name -> name in this seed
    group = np.array([g for _ in range(prompts) for g in GROUPS])
    prompt_index = np.repeat(np.arange(prompts), len(GROUPS))
    diffs, policies = [], {}
    for true_name, orig in names.items():
        effect = rng.normal(0.0, seed_sd)  # the seed's effect on this policy (training randomness)
        mu = np.array([TRUTH[true_name][g] for g in group]) + effect
        d = mu + rng.normal(0.0, 1.0, size=len(group))
        diffs.append(d)
        policies[orig] = {"per_group": {
            g: {"accuracy": float(np.mean(d[group == g] > 0)), "margin": float(np.mean(d[group == g])),
                "regret": float(max(0.0, 1.0 - TRUTH[true_name][g]) + 0.05 * seed), "regret_se": 0.02}
            for g in GROUPS}}
    np.savez_compressed(run / "report" / "per_row.npz", policies=np.array(list(names.values())), diff=np.stack(diffs),
                        group=group, prompt_index=prompt_index,
                        comparison_id=np.array([f"c{i}" for i in range(len(group))]))
    clustering = {"ari": 1.0 - 0.1 * seed, "nmi": 0.9, "eta": [0.5, 0.5], "log_likelihood": [-1.0]}
    if matching == "matched_group":
        clustering["matched_group"] = {orig: n.split("/")[1] for n, orig in type_of.items()}
    elif matching == "type_to_group":
        clustering["type_to_group"] = {n.split("/")[1]: int(orig[-1]) for n, orig in type_of.items()}
    metrics = {"recipe": "fake", "seed": seed, "dataset": {}, "policies": policies,
               "clustering": {"em": clustering},
               "ensembles": {"minmax": {"weights": [0.3, 0.7], "policies": ["em/type0", "em/type1"],
                                        "max_regret": 0.6, "per_group_regret": {}}},
               "timings_s": {"em": 10.0 + seed}}
    (run / "report" / "metrics.json").write_text(json.dumps(metrics))
    stages = {"report": {"trainer": "report", "status": "done", "outputs": {"metrics": "report/metrics.json"}}}
    if matching == "recompute":
        del metrics["clustering"]["em"]
        (run / "report" / "metrics.json").write_text(json.dumps(metrics))
        # annotators a0..a5: a0-a2 grammar, a3-a5 sentiment; responsibilities put grammar on type_of's index
        g_type = int(type_of["em/grammar"][-1])
        resp = [[1.0, 0.0] if (i < 3) == (g_type == 0) else [0.0, 1.0] for i in range(6)]
        (run / "em").mkdir()
        (run / "em" / "clustering.json").write_text(json.dumps(
            {"annotator_ids": [f"a{i}" for i in range(6)], "responsibilities": resp, "eta": [0.5, 0.5],
             "log_likelihood": []}))
        rows = [Comparison(f"a{i}", f"p{i}", ["x", "y"], [0, 1], f"c{i}", group="grammar" if i < 3 else "sentiment")
                for i in range(6)]
        write_dataset_dir(run / "data", rows, None, build_manifest(rows, None, builder="t", config={}))
        stages = {"data": {"trainer": "data", "status": "done", "outputs": {"dir": "data", "manifest": "data/manifest.json"}},
                  "em": {"trainer": "em_dpo", "status": "done", "outputs": {"clustering": "em/clustering.json"}},
                  **stages}
    (run / "run.json").write_text(json.dumps({"stages": stages}))
    return run


def _summary(tmp_path: Path, seeds: list[int], **kw) -> dict:
    for s in seeds:
        _fake_seed(tmp_path, s, **kw)
    out = write_summary(tmp_path, seeds, n_boot=1000)
    return json.loads((out / "metrics.json").read_text())


def _width(stat: dict) -> float:
    return stat["ci95"][1] - stat["ci95"][0]


def test_summary_names_types_by_matched_group_and_intervals_contain_the_mean(tmp_path):
    s = _summary(tmp_path, [0, 1, 2])
    assert list(s["policies"]) == ["dpo", "em/grammar", "em/sentiment", "minmax/ensemble"]
    assert s["policies"]["em/grammar"]["source"] == ["em/type0", "em/type1", "em/type0"]
    # the grammar-matched type is the one that is good on grammar, in every seed despite the swap
    acc = s["policies"]["em/grammar"]["per_group"]["grammar"]["accuracy"]
    assert all(v > 0.6 for v in acc["per_seed"])
    assert s["policies"]["em/sentiment"]["per_group"]["grammar"]["margin"]["mean"] < 0
    for name, p in s["policies"].items():
        for g in GROUPS:
            for m in ("accuracy", "margin", "regret"):
                st = p["per_group"][g][m]
                assert st["mean"] == pytest.approx(np.mean(st["per_seed"]))
                assert st["ci95"][0] <= st["mean"] <= st["ci95"][1], (name, g, m, st)
        for m in ("accuracy", "margin", "regret"):
            st = p["worst_group"][m]
            assert st["ci95"][0] <= st["mean"] <= st["ci95"][1], (name, m, st)
    # worst group: lowest margin, highest regret, per seed
    dpo = s["policies"]["dpo"]
    assert dpo["worst_group"]["margin"]["per_seed"] == [
        min(dpo["per_group"][g]["margin"]["per_seed"][k] for g in GROUPS) for k in range(3)]
    assert dpo["worst_group"]["regret"]["mean"] == pytest.approx(np.mean([0.9, 0.95, 1.0]))
    # the true margins lie inside the intervals of the policies with a clear signal
    assert s["policies"]["em/grammar"]["per_group"]["grammar"]["margin"]["ci95"][0] > 0.3
    # ensembles: weights under the members' matched names; clustering: ari {mean, min, per_seed}
    w = s["ensembles"]["minmax"]["weights"]
    assert w["em/grammar"]["per_seed"] == [0.3, 0.7, 0.3] and w["em/sentiment"]["per_seed"] == [0.7, 0.3, 0.7]
    assert s["ensembles"]["minmax"]["max_regret"]["per_seed"] == [0.6, 0.6, 0.6]
    ari = s["clustering"]["em"]["ari"]
    assert ari["per_seed"] == pytest.approx([1.0, 0.9, 0.8]) and ari["min"] == pytest.approx(0.8)
    assert ari["mean"] == pytest.approx(0.9)
    assert s["bootstrap"]["per_row"] == [True, True, True] and s["timings_s"]["em"]["mean"] == 11.0
    report = (tmp_path / "summary" / "report.md").read_text()
    assert "| em/grammar |" in report and "em/type0" not in report.split("## Notes")[0]
    for f in ("margin_after_clustering.png", "margin_after_aggregation.png"):
        assert (tmp_path / "summary" / f).stat().st_size > 5000 and f in s["figures"]


def test_intervals_shrink_with_more_seeds(tmp_path):
    few = _summary(tmp_path / "few", [0, 1])
    many = _summary(tmp_path / "many", list(range(10)))
    for name in ("dpo", "em/grammar"):
        for m in ("accuracy", "margin"):
            a = few["policies"][name]["per_group"]["grammar"][m]
            b = many["policies"][name]["per_group"]["grammar"][m]
            assert _width(b) < 0.8 * _width(a), (name, m, _width(a), _width(b))


def test_prompt_level_resampling_matters_within_a_seed(tmp_path):
    """With seeds alike (no seed effect), the interval still reflects the finite test set: about
    +-1.96 sd/sqrt(n) for a margin, wider with fewer prompts."""
    small = _summary(tmp_path / "s", [0, 1], prompts=25, seed_sd=0.0)
    large = _summary(tmp_path / "l", [0, 1], prompts=400, seed_sd=0.0)
    w_small = _width(small["policies"]["dpo"]["per_group"]["grammar"]["margin"])
    w_large = _width(large["policies"]["dpo"]["per_group"]["grammar"]["margin"])
    assert w_large < 0.5 * w_small
    assert 2 * 1.96 / np.sqrt(800) * 0.6 < w_large < 2 * 1.96 / np.sqrt(800) * 2.0  # 2 seeds x 400 rows, sd 1


@pytest.mark.parametrize("matching", ["type_to_group", "recompute"])
def test_older_reports_fall_back_to_type_to_group_or_hungarian(tmp_path, matching):
    for s in (0, 1):
        _fake_seed(tmp_path, s, matching=matching)
    runs = [load_seed_run(seed_dir(tmp_path, s), s) for s in (0, 1)]
    assert runs[0].names["em/type0"] == "em/grammar" and runs[1].names["em/type1"] == "em/grammar"
    assert runs[1].names["em/type0"] == "em/sentiment"


def test_missing_per_row_and_unmatched_types_are_noted(tmp_path):
    _fake_seed(tmp_path, 0)
    run1 = _fake_seed(tmp_path, 1)
    (run1 / "report" / "per_row.npz").unlink()
    m = json.loads((run1 / "report" / "metrics.json").read_text())
    m["clustering"]["em"]["matched_group"] = {"em/type1": "grammar"}  # type0 unmatched (K > groups)
    (run1 / "report" / "metrics.json").write_text(json.dumps(m))
    s = json.loads((write_summary(tmp_path, [0, 1], n_boot=200) / "metrics.json").read_text())
    assert s["bootstrap"]["per_row"] == [True, False]
    assert "em/type0" in s["policies"] and s["policies"]["em/type0"]["per_group"]["grammar"]["accuracy"]["per_seed"][0] is None
    assert s["policies"]["em/sentiment"]["seeds_present"] == 1
    notes = " ".join(s["notes"])
    assert "seed 1: no per_row.npz" in notes and "seed 1: em/type0 matched no group" in notes


def test_summarize_policy_regret_uses_the_reports_standard_error():
    """Regret has one value per seed; with a standard error its interval widens accordingly."""
    def seed(v, se):
        return PolicySeed(values={"g": {"accuracy": None, "margin": None, "regret": v}}, regret_se={"g": se})

    tight = summarize_policy([seed(1.0, 0.0), seed(1.0, 0.0)], ["g"], n_boot=500)["per_group"]["g"]["regret"]
    loose = summarize_policy([seed(1.0, 0.5), seed(1.0, 0.5)], ["g"], n_boot=500)["per_group"]["g"]["regret"]
    assert tight["ci95"] == [1.0, 1.0] and _width(loose) == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(2), rel=0.15)
    assert loose["per_seed"] == [1.0, 1.0] and tight["mean"] == 1.0


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("3-5, 9") == [3, 4, 5, 9]
    for bad, msg in (("1,1", "listed twice"), ("a", "got 'a'"), ("", "got ''"), ("5-2", "got '5-2'")):
        with pytest.raises(RecipeError, match=msg):
            parse_seeds(bad)


class _StubBackend:
    """Scores are fixed per policy; enough to check the per-row file against preference_metrics."""

    beta = 0.5

    def ref_score(self, data):
        return np.zeros((len(data), 2))

    def score(self, policy, prompts, responses):
        return policy[: len(prompts)]


def test_per_row_file_reproduces_the_reports_accuracy_and_margin(tmp_path):
    rng = np.random.default_rng(0)
    rows = [Comparison(f"test-{g}", f"p{i}", ["x", "y"], [0, 1] if rng.random() < 0.5 else [1, 0], f"c{i}-{g}", group=g)
            for i in range(20) for g in GROUPS] + [Comparison("u", "p0", ["x", "y"], [0, 1], "nolabel")]
    data = ComparisonSet(rows)
    pol = rng.normal(size=(len(rows), 2))
    path = write_per_row(tmp_path / "per_row.npz", _StubBackend(), data, {"a": [(1.0, pol)]})
    z = read_per_row(path)
    assert z["policies"] == ["a"] and z["diff"].shape == (1, 40) and set(z["group"]) == set(GROUPS)
    assert z["prompt_index"].max() == 19 and z["prompt_index"][0] == z["prompt_index"][1]  # one prompt, two groups
    for g in GROUPS:
        rows_g = np.array([r.group == g for r in rows])
        expected = preference_metrics(0.5 * pol[rows_g], data.rankings[rows_g])
        d = z["diff"][0][z["group"] == g]
        assert np.mean(d > 0) == pytest.approx(expected["accuracy"]) and np.mean(d) == pytest.approx(expected["margin"])
    assert reward_differences(np.array([[1.0, 3.0]]), np.array([[1, 0]])).tolist() == [2.0]
    assert write_per_row(tmp_path / "none.npz", _StubBackend(), None, {"a": [(1.0, pol)]}) is None


# --------------------------------------------------------------------------- end to end

REDUCED = ["--set", "model.epochs=60", "--set", "model.warm_epochs=10", "--set", "stages.em.config.iterations=3",
           "--set", "stages.em.config.restarts=1"]


@pytest.mark.slow
def test_bandit_two_seeds_end_to_end(tmp_path, capsys):
    out = tmp_path / "seeds"
    rc = cli.main(["run", "recipes/bandit.yaml", "--seeds", "0,1", "-o", str(out), *REDUCED])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    assert "seed 0 (1/2)" in captured.out and "seed 1 done" in captured.out
    for s in (0, 1):
        run = json.loads((out / f"seed-{s}" / "run.json").read_text())
        assert run["seed"] == s and all(st["status"] == "done" for st in run["stages"].values())
        assert (out / f"seed-{s}" / "report" / "per_row.npz").is_file()
        assert (out / f"seed-{s}" / "data" / "val.jsonl").is_file()
    s = json.loads((out / "summary" / "metrics.json").read_text())
    assert s["seeds"] == [0, 1] and s["groups"] == ["group0", "group1", "group2"]
    assert {"dpo", "em/group0", "em/group1", "em/group2", "minmax/ensemble"} <= set(s["policies"])
    assert not any(n.startswith("em/type") for n in s["policies"])
    for p in s["policies"].values():
        for g in s["groups"]:
            for m in ("accuracy", "margin", "regret"):
                st = p["per_group"][g][m]
                assert set(st) == {"mean", "ci95", "per_seed"} and len(st["per_seed"]) == 2
                assert st["ci95"][0] <= st["mean"] <= st["ci95"][1]
    assert set(s["clustering"]["em"]["ari"]) == {"mean", "min", "per_seed"}
    assert set(s["ensembles"]["minmax"]["weights"]) == {"em/group0", "em/group1", "em/group2"}
    for f in ("report.md", "margin_after_clustering.png", "margin_after_aggregation.png"):
        assert (out / "summary" / f).is_file()
    # each seed is a normal run: it refuses to overwrite, resumes with --resume (nothing re-runs)
    assert cli.main(["run", "recipes/bandit.yaml", "--seeds", "0,1", "-o", str(out), *REDUCED]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert cli.main(["run", "recipes/bandit.yaml", "--seeds", "0,1", "-o", str(out), "--resume", *REDUCED]) == 0
    assert capsys.readouterr().out.count("skip ") == 2 * 5
    # hyperparameters are chosen on val: the policies of a run scored on its val split
    from emdpo_plugin.eval.validation import evaluate_run

    val = evaluate_run(out / "seed-0")
    assert val["split"] == "val" and val["rows"] == 1500
    assert set(val["policies"]) == {"dpo", "em/type0", "em/type1", "em/type2", "minmax/ensemble"}
    assert 0.0 <= val["policies"]["dpo"]["per_group"]["group0"]["accuracy"] <= 1.0
