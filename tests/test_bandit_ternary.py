"""Rankings over 3 responses identify the preference mixture, binary comparisons do not
(recipes/bandit_ternary.yaml; the later version of the paper)."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data_builders.bandit import BanditConfig, BanditEnvironment, build
from emdpo_plugin.algorithms.likelihood import plackett_luce_loglik
from emdpo_plugin.data.io import write_dataset_dir
from emdpo_plugin.data.manifest import build_manifest
from emdpo_plugin.data.validate import validate_path
from emdpo_plugin.eval.identifiability import plackett_luce_rankings
from emdpo_plugin.trainers.report import ReportConfig

ROOT = Path(__file__).resolve().parents[1]
OPENRLHF = str(Path(sys.executable).parent / "openrlhf")
RECIPE = ROOT / "recipes" / "bandit_ternary.yaml"

TRUTH = {"group_probs": [0.5, 0.3, 0.2], "group_rankings": [[0, 1, 2], [2, 1, 0], [1, 2, 0]]}
# A different mixture with the same pairwise choice probabilities (see the recipe's header).
ALTERNATIVE = {"group_probs": [0.2, 0.3, 0.5], "group_rankings": [[0, 1, 2], [0, 2, 1], [1, 2, 0]]}
PAIRS = [(0, 1), (1, 2), (0, 2)]


def _records_hash(cfg: dict, seed: int) -> tuple[str, dict]:
    ds = build(cfg, seed=seed)
    recs = [r.to_record() for r in ds.train + ds.test]
    return hashlib.sha256(json.dumps(recs, sort_keys=True).encode()).hexdigest(), ds.config


@pytest.mark.parametrize("cfg, seed, digest", [
    # sha256 of the train + test records of the builder before `responses_per_comparison` and
    # `group_rankings` existed
    ({}, 123, "a2803382bc8b83943642d900bdaf91d0f33fcbad44d80472508f541e616c653b"),
    ({"annotators": 50, "pairs_per_annotator": 3, "group_probs": [0.5, 0.5], "test_contexts": 20}, 7,
     "dbd5946dd242d840a05655e79ea01a0080668be5d5cd8a8567d4458919a7f21e"),
])
def test_pairwise_output_is_unchanged(cfg, seed, digest):
    got, config = _records_hash(cfg, seed)
    assert got == digest
    assert _records_hash({**cfg, "responses_per_comparison": 2, "group_rankings": None}, seed)[0] == digest
    assert _records_hash({**cfg, "group_rankings": [[i] for i in range(len(cfg.get("group_probs", [1] * 3)))]},
                         seed)[0] == digest
    # the recorded config (manifest) of an existing config has no new keys either
    assert set(config) == {"arms", "dim", "theta_scale", "group_probs", "annotators", "pairs_per_annotator",
                           "noise_std", "test_contexts"}


def test_ternary_rows_are_valid_full_rankings(tmp_path):
    cfg = {**TRUTH, "annotators": 100, "pairs_per_annotator": 2, "responses_per_comparison": 3, "test_contexts": 20}
    ds = build(cfg, seed=4)
    write_dataset_dir(tmp_path / "d", ds.train, ds.test,
                      build_manifest(ds.train, ds.test, builder="bandit", config=ds.config))
    report = validate_path(tmp_path / "d")
    assert report.manifest and report.ranking_rows == len(ds.train) + len(ds.test) and report.pairwise_rows == 0
    assert ds.config["responses_per_comparison"] == 3 and ds.config["group_rankings"] == TRUTH["group_rankings"]
    orders = Counter()
    for r in ds.train + ds.test:
        arms = [int(a.removeprefix("arm")) for a in r.responses]
        assert sorted(arms) == [0, 1, 2] and sorted(r.ranking) == [0, 1, 2]
        g = int(r.group.removeprefix("group"))
        best_first = [arms[i] for i in r.ranking]
        assert best_first == TRUTH["group_rankings"][g]  # noise 0.01 never beats a gap of 5 * sum(x)
        orders[tuple(arms)] += 1
    assert len(orders) == 6  # responses are shown in random order
    assert len(ds.test) == 20 * 3  # every test context ranked by every group


def test_builder_options_are_checked():
    with pytest.raises(ValueError, match="group_rankings"):
        BanditEnvironment(BanditConfig(group_probs=[0.5, 0.5], group_rankings=[[0, 1, 2]]))
    with pytest.raises(ValueError, match="distinct"):
        BanditEnvironment(BanditConfig(group_rankings=[[0, 0], [1], [2]]))
    with pytest.raises(ValueError, match="exceeds"):
        BanditEnvironment(BanditConfig(responses_per_comparison=4))
    env = BanditEnvironment(BanditConfig(**TRUTH))
    np.testing.assert_allclose(env.theta[1, :, 0], [0.0, 5.0, 10.0])  # 2 > 1 > 0: 10 / 5 / 0


def _pairwise_freq(ds) -> np.ndarray:
    """P(a beats b) for each pair in PAIRS, from pairwise rows."""
    wins, seen = Counter(), Counter()
    for r in ds.train:
        w, l = (int(r.responses[i].removeprefix("arm")) for i in r.ranking)
        key = tuple(sorted((w, l)))
        seen[key] += 1
        wins[key] += w == key[0]
    return np.array([wins[p] / seen[p] for p in PAIRS])


def _ranking_freq(ds) -> np.ndarray:
    counts = Counter(tuple(int(r.responses[i].removeprefix("arm")) for i in r.ranking) for r in ds.train)
    return np.array([counts[p] for p in itertools.permutations(range(3))]) / len(ds.train)


def test_binary_data_cannot_tell_the_truth_from_another_mixture_rankings_can():
    """The numeric argument behind the recipe, exactly and on the builder's own samples."""
    perms = list(itertools.permutations(range(3)))

    def population(spec):  # distribution of full rankings: each group ranks deterministically
        p = np.zeros(len(perms))
        for prob, order in zip(spec["group_probs"], spec["group_rankings"]):
            p[perms.index(tuple(order))] += prob
        return p

    def pairwise(p):
        return np.array([sum(q for q, perm in zip(p, perms) if perm.index(a) < perm.index(b)) for a, b in PAIRS])

    truth, alt = population(TRUTH), population(ALTERNATIVE)
    np.testing.assert_allclose(pairwise(truth), [0.5, 0.7, 0.5])
    np.testing.assert_allclose(pairwise(alt), pairwise(truth))  # same binary likelihood
    assert 0.5 * np.abs(truth - alt).sum() == pytest.approx(0.6)  # rankings differ a lot

    n = 6000
    common = {"annotators": n, "pairs_per_annotator": 1, "test_contexts": 1}
    bin_t = _pairwise_freq(build({**TRUTH, **common}, seed=1))
    bin_a = _pairwise_freq(build({**ALTERNATIVE, **common}, seed=2))
    np.testing.assert_allclose(bin_t, [0.5, 0.7, 0.5], atol=0.04)
    np.testing.assert_allclose(bin_a, bin_t, atol=0.05)
    ter_t = _ranking_freq(build({**TRUTH, **common, "responses_per_comparison": 3}, seed=1))
    ter_a = _ranking_freq(build({**ALTERNATIVE, **common, "responses_per_comparison": 3}, seed=2))
    np.testing.assert_allclose(ter_t, truth, atol=0.03)
    np.testing.assert_allclose(ter_a, alt, atol=0.03)


def test_plackett_luce_ranking_distribution_matches_the_likelihood():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3))
    perms = list(itertools.permutations(range(3)))
    probs = plackett_luce_rankings(logits, perms)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    ll = plackett_luce_loglik(torch.tensor(logits), torch.tensor([perms[2]] * 5), torch.ones(5, 3, dtype=torch.bool))
    np.testing.assert_allclose(np.log(probs[:, 2]), ll.numpy())


def test_report_config_of_existing_recipes_is_unchanged():
    assert "identifiability" not in ReportConfig().model_dump(mode="json")  # stage hashes, --resume
    cfg = ReportConfig(identifiability={"binary": {"em": "em_binary", "dataset": "data_binary"}})
    assert cfg.model_dump()["identifiability"]["binary"] == {"em": "em_binary", "dataset": "data_binary"}


def test_recipe_plans(tmp_path):
    proc = subprocess.run([OPENRLHF, "run", str(RECIPE), "--dry-run", "--output-dir", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for stage in ("data_binary", "data_ternary", "em_binary", "em_ternary", "report"):
        assert stage in proc.stdout
    raw = yaml.safe_load(RECIPE.read_text())
    stages = {s["name"]: s for s in raw["stages"]}
    b, t = stages["data_binary"]["config"]["config"], stages["data_ternary"]["config"]["config"]
    assert {k: v for k, v in b.items() if k != "responses_per_comparison"} == \
        {k: v for k, v in t.items() if k != "responses_per_comparison"}
    assert (b["responses_per_comparison"], t["responses_per_comparison"]) == (2, 3)
    assert b["pairs_per_annotator"] == 1
    assert stages["em_binary"]["config"] == stages["em_ternary"]["config"]


@pytest.mark.slow
def test_rankings_recover_the_mixture_binary_comparisons_do_not(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([OPENRLHF, "run", str(RECIPE), "--output-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "report" / "metrics.json").read_text())
    ident = m["identifiability"]
    tern, binary = ident["ternary"], ident["binary"]
    assert tern["responses_per_comparison"] == 3 and binary["responses_per_comparison"] == 2
    assert tern["comparisons_per_annotator"] == binary["comparisons_per_annotator"] == 1
    assert tern["true_eta"] == binary["true_eta"]  # same annotators, same groups

    # rankings: eta and every type recovered
    assert tern["eta_error"] <= 0.05, tern
    assert max(tern["policy_tv"].values()) <= 0.05, tern
    assert max(tern["ranking_tv"].values()) <= 0.05, tern
    assert m["clustering"]["em_ternary"]["ari"] >= 0.95

    # binary: a wrong mixture, which fits the binary data about as well as the truth does
    assert binary["eta_error"] >= 0.15, binary
    assert binary["eta_error"] >= 3 * tern["eta_error"] + 0.1
    assert binary["ranking_tv_mean"] >= 0.2 and max(binary["ranking_tv"].values()) >= 0.3, binary
    assert binary["log_likelihood"] >= binary["truth_log_likelihood"] - 0.01 * abs(binary["truth_log_likelihood"])
    assert m["clustering"]["em_binary"]["ari"] <= 0.5

    md = (out / "report" / "report.md").read_text()
    assert "## Identifiability" in md and "| binary | 2 |" in md and "| ternary | 3 |" in md
