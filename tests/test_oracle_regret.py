"""Regret against an independent oracle (group_dpo), and the report on data with and without labels.

Fast: the bandit backend and a tabular fake stand in for language models; the same report code
runs on the LM path (tests/test_lm_pipeline.py, tests/test_unlabelled.py).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from data_builders.bandit import build as build_bandit
from emdpo_plugin.backends.bandit import BanditBackend
from emdpo_plugin.data.io import write_dataset_dir
from emdpo_plugin.data.manifest import build_manifest
from emdpo_plugin.errors import RecipeError
from emdpo_plugin.eval.evaluate import clustering_report, estimate_regrets, responsibility_stats, restart_agreement
from emdpo_plugin.trainers.base import StageContext
from emdpo_plugin.trainers.dpo import DPOConfig, DPOStage
from emdpo_plugin.trainers.em_dpo import EMConfig, EMDPOStage
from emdpo_plugin.trainers.group_dpo import GroupDPOConfig, GroupDPOStage
from emdpo_plugin.trainers.minmax_ensemble import MinMaxConfig, MinMaxEnsembleStage
from emdpo_plugin.trainers.report import ReportConfig, ReportStage


# --------------------------------------------------------------------------- the estimator itself

class TabularBackend:
    """One prompt, a few items, policies are log-prob vectors: appendix E in closed form."""

    def __init__(self, ref: np.ndarray, beta: float) -> None:
        self.ref, self.beta = np.log(ref), beta

    def score(self, policy, prompts, responses):
        logp = self.ref if policy is None else policy
        return np.array([[logp[int(y)] for y in row] for row in responses])

    def sample(self, policy, prompts, n, seed):
        rng = np.random.default_rng(seed)
        p = np.exp(self.ref if policy is None else policy)
        return [[str(rng.choice(len(p), p=p)) for _ in range(n)] for _ in prompts]


def _exact(backend, oracle, mix):
    r = oracle - backend.ref
    return backend.beta * (np.exp(oracle) @ r - sum(w * np.exp(p) @ r for w, p in mix))


def test_appendix_e_estimate_matches_closed_form_and_mixtures_are_weighted_sums():
    rng = np.random.default_rng(0)
    ref = np.full(4, 0.25)
    pols = [np.log(rng.dirichlet(np.ones(4))) for _ in range(3)]
    backend = TabularBackend(ref, beta=0.5)
    oracle = {"a": pols[0], "b": pols[1]}
    mixtures = {"p2": [(1.0, pols[2])], "oracle_a": [(1.0, pols[0])], "mix": [(0.3, pols[1]), (0.7, pols[2])]}
    prompts = [f"x{i}" for i in range(400)]
    est, kl = estimate_regrets(backend, oracle, mixtures, prompts, n=4, seed=1)
    for g, pz in oracle.items():  # E_{pi*}[log pi*/ref] is KL(pi* || ref)
        assert kl[g] == pytest.approx(np.exp(pz) @ (pz - backend.ref), abs=0.05)
    for name, mix in mixtures.items():
        for g, pz in oracle.items():
            e = est[name][g]
            truth = _exact(backend, pz, mix)
            assert e["se"] is not None
            if name == "oracle_a" and g == "a":
                assert e["regret"] == 0.0 and e["se"] == 0.0
            else:  # unbiased, and the standard error is the right size
                assert 0 < e["se"] < 0.1
                assert abs(e["regret"] - truth) < 4 * e["se"], (name, g, e, truth)
    # a mixture's regret is the w-weighted sum of its members' regrets (same samples per member)
    one, _ = estimate_regrets(backend, oracle, {"m1": [(1.0, pols[1])], "m2": [(1.0, pols[2])]}, prompts, 4, 1)
    for g in oracle:
        assert est["mix"][g]["regret"] == pytest.approx(0.3 * one["m1"][g]["regret"] + 0.7 * one["m2"][g]["regret"])


def test_single_prompt_falls_back_to_a_sample_level_standard_error():
    ref = np.full(3, 1 / 3)
    backend = TabularBackend(ref, beta=1.0)
    oracle = {"g": np.log(np.array([0.7, 0.2, 0.1]))}
    est, _ = estimate_regrets(backend, oracle, {"ref": [(1.0, np.log(ref))]}, ["only"], n=2000, seed=0)
    e = est["ref"]["g"]
    assert 0 < e["se"] < 0.05
    assert abs(e["regret"] - _exact(backend, oracle["g"], [(1.0, np.log(ref))])) < 4 * e["se"]


# --------------------------------------------------------------------------- label-free summaries

def test_clustering_report_without_labels_has_no_scores_instead_of_crashing():
    resp = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    rep = clustering_report(["a", "b", "c"], resp, {"a": None, "b": None, "c": None})
    assert rep == {"ari": None, "nmi": None, "type_to_group": {}}
    stats = responsibility_stats(resp)
    assert stats["type_sizes"] == [2, 1]
    assert stats["sharpness"] == pytest.approx((0.9 + 0.8 + 0.6) / 3)
    assert stats["entropy"] < stats["max_entropy"] == pytest.approx(np.log(2))
    assert restart_agreement([np.array([0, 1, 1, 0])]) is None
    agree = restart_agreement([np.array([0, 1, 1, 0]), np.array([1, 0, 0, 1]), np.array([0, 0, 1, 1])])
    assert agree["restarts"] == 3 and agree["min_ari"] < agree["mean_ari"] < 1


# --------------------------------------------------------------------------- stages on the bandit

def _bandit_run(tmp_path: Path, *, labelled: bool, annotators: int = 60):
    ds = build_bandit({"annotators": annotators, "group_probs": [0.6, 0.4], "test_contexts": 100}, seed=4)
    train, test = ds.train, ds.test
    if not labelled:
        train = [replace(r, group=None) for r in train]
        test = [replace(r, group=None) for r in test]
    write_dataset_dir(tmp_path / "data", train, test,
                      build_manifest(train, test, builder="bandit", config=ds.config))
    backend = BanditBackend({"epochs": 150, "warm_epochs": 40, "label_smoothing": 0.01}, seed=4)
    return backend, {"dir": "data", "manifest": "data/manifest.json"}


def _ctx(tmp_path, name, backend):
    return StageContext(run_dir=tmp_path, stage_name=name, seed=4, recipe={"name": "t", "model": {}}, _backend=backend)


def test_group_dpo_refuses_unlabelled_data(tmp_path):
    backend, data = _bandit_run(tmp_path, labelled=False, annotators=10)
    with pytest.raises(RecipeError, match="group_dpo needs a group label on every training row"):
        GroupDPOStage().run(_ctx(tmp_path, "oracle", backend), GroupDPOConfig(), {"dataset": data})


def test_oracle_regret_on_the_bandit_tracks_the_exact_regret(tmp_path):
    backend, data = _bandit_run(tmp_path, labelled=True)
    outs = {"dataset": data}
    outs["oracle"] = GroupDPOStage().run(_ctx(tmp_path, "oracle", backend), GroupDPOConfig(), {"dataset": data})
    assert outs["oracle"]["oracle_groups"] == {"group0": "oracle/group0", "group1": "oracle/group1"}
    assert set(outs["oracle"]["policies"]) == {"oracle/group0", "oracle/group1"}
    assert outs["oracle"]["epochs_seen"] == {"oracle/group0": 150.0, "oracle/group1": 150.0}
    outs["dpo"] = DPOStage().run(_ctx(tmp_path, "dpo", backend), DPOConfig(), {"dataset": data})
    outs["em"] = EMDPOStage().run(_ctx(tmp_path, "em", backend), EMConfig(K=2, iterations=3), {"dataset": data})
    outs["minmax"] = MinMaxEnsembleStage().run(_ctx(tmp_path, "minmax", backend),
                                               MinMaxConfig(steps=500, prompts=256), {"policies": outs["em"]})
    results = {}
    for source in ("oracle", "exact"):
        ReportStage().run(_ctx(tmp_path, f"report_{source}", backend),
                          ReportConfig(regret=source, regret_prompts=400, samples_per_prompt=4), outs)
        results[source] = json.loads((tmp_path / f"report_{source}" / "metrics.json").read_text())
    m = results["oracle"]
    assert m["regret"]["method"] == "appendix_e" and m["regret"]["oracle_stage"] == "oracle"
    assert m["regret"]["oracle_policies"] == {"group0": "oracle/group0", "group1": "oracle/group1"}
    assert results["exact"]["regret"]["method"] == "exact"
    pol = m["policies"]
    for g in ("group0", "group1"):  # the oracle against itself
        assert pol[f"oracle/{g}"]["per_group"][g]["regret"] == 0.0
    # DPO serves the majority (group0): the oracle estimate sees it, as the exact regret does
    dpo, exact_dpo = pol["dpo"]["per_group"], results["exact"]["policies"]["dpo"]["per_group"]
    assert dpo["group1"]["regret"] > dpo["group0"]["regret"] + 2 * dpo["group1"]["regret_se"]
    assert exact_dpo["group1"]["regret"] > exact_dpo["group0"]["regret"]
    # the ensemble's reported regret is the oracle's, never its own game's value
    ens = m["ensembles"]["minmax"]
    assert ens["per_group_regret"] == {g: pol["minmax/ensemble"]["per_group"][g]["regret"] for g in ("group0", "group1")}
    assert ens["max_regret"] == max(ens["per_group_regret"].values())
    # every EM type got a measured (not zero-by-construction) regret on the group it was not matched to
    matched = m["clustering"]["em"]["matched_group"]
    assert set(matched) == {"em/type0", "em/type1"} and set(matched.values()) == {"group0", "group1"}
    assert m["clustering"]["em"]["type_to_group"] == {g: int(n[-1]) for n, g in matched.items()}
    for name, g in matched.items():
        other = "group1" if g == "group0" else "group0"
        assert pol[name]["per_group"][other]["regret"] > 0
    assert pol["oracle/group0"]["epochs_seen"] == 150.0
    assert all(kl > 0.1 for kl in m["regret"]["oracle_kl"].values())  # the oracles left the reference
    assert not any("indistinguishable" in n for n in m["notes"])
    md = (tmp_path / "report_oracle" / "report.md").read_text()
    assert "against the oracle stage `oracle`" in md and "±" in md


def test_report_without_oracle_gives_no_regret(tmp_path):
    backend, data = _bandit_run(tmp_path, labelled=True, annotators=20)
    outs = {"dataset": data, "dpo": DPOStage().run(_ctx(tmp_path, "dpo", backend), DPOConfig(), {"dataset": data})}
    ReportStage().run(_ctx(tmp_path, "report", backend), ReportConfig(regret="none"), outs)
    m = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert m["regret"]["method"] is None and "oracle" in m["regret"]["note"]
    assert all(v["regret"] is None for v in m["policies"]["dpo"]["per_group"].values())
    with pytest.raises(RecipeError, match="inputs.oracle"):
        ReportStage().run(_ctx(tmp_path, "report2", backend), ReportConfig(regret="oracle"), outs)


def test_every_stage_runs_without_labels_and_the_report_says_what_it_skipped(tmp_path):
    backend, data = _bandit_run(tmp_path, labelled=False)
    outs = {"dataset": data}
    outs["dpo"] = DPOStage().run(_ctx(tmp_path, "dpo", backend), DPOConfig(), {"dataset": data})
    outs["em"] = EMDPOStage().run(_ctx(tmp_path, "em", backend), EMConfig(K=2, iterations=2, restarts=2),
                                  {"dataset": data})
    outs["minmax"] = MinMaxEnsembleStage().run(_ctx(tmp_path, "minmax", backend), MinMaxConfig(steps=300, prompts=128),
                                               {"policies": outs["em"]})
    ReportStage().run(_ctx(tmp_path, "report", backend), ReportConfig(), outs)
    m = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert m["dataset"]["labelled"] is False and m["dataset"]["groups"] == {}
    c = m["clustering"]["em"]
    assert c["ari"] is None and c["nmi"] is None and c["type_to_group"] == {} and c["matched_group"] == {}
    assert sum(c["type_sizes"]) == 60 and 0.5 <= c["sharpness"] <= 1 and 0 <= c["entropy"] <= c["max_entropy"]
    assert len(c["log_likelihood"]) == 2
    assert c["restart_agreement"]["restarts"] == 2 and -1 <= c["restart_agreement"]["mean_ari"] <= 1
    assert m["regret"]["method"] is None
    for name in ("dpo", "em/type0", "minmax/ensemble"):
        assert m["policies"][name]["per_group"] == {} and 0 <= m["policies"][name]["overall"]["accuracy"] <= 1
    e = m["ensembles"]["minmax"]
    assert abs(sum(e["weights"]) - 1) < 1e-9 and e["lp_value"] is not None and e["max_regret"] is None
    md = (tmp_path / "report" / "report.md").read_text()
    assert "no group labels" in md and "skipped" in md and "mean largest responsibility" in md
    assert (tmp_path / "report" / "responsibility_sharpness.png").stat().st_size > 0


def test_group_dpo_takes_another_stages_budget(tmp_path):
    """An oracle trained for fewer passes than the policies it judges is no upper bound: with
    `inputs: {budget: em}` each group's fit gets EM's largest epochs_seen."""
    backend, data = _bandit_run(tmp_path, labelled=True, annotators=12)
    budget = {"policies": {"em/type0": "em/type0"}, "epochs_seen": {"em/type0": 37.0, "em/type1": 12.0}}
    out = GroupDPOStage().run(_ctx(tmp_path, "oracle", backend), GroupDPOConfig(),
                              {"dataset": data, "budget": budget})
    assert out["epochs_seen"] == {"oracle/group0": 37.0, "oracle/group1": 37.0}
    assert [f["steps"] for f in out["fit"]] == [37, 37]
    out = GroupDPOStage().run(_ctx(tmp_path, "oracle2", backend), GroupDPOConfig(epochs=5), {"dataset": data})
    assert out["epochs_seen"] == {"oracle2/group0": 5.0, "oracle2/group1": 5.0}
