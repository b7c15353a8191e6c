"""Unlabelled crowd data, the normal case: the builder, the tabular yardstick, and the whole LM pipeline.

`crowd_bt` makes the kind of data users bring (one prompt, six items, hundreds of annotators
with a few choices each, no group column). A plain 2-type mixture of Bradley-Terry models
separates those annotators; EM-DPO on the tiny LM must agree with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_builders.crowd_bt import build, latent_types
from emdpo_plugin.algorithms.metrics import clustering_scores
from emdpo_plugin.data.io import load_dataset_dir
from emdpo_plugin.data.schema import ComparisonSet
from emdpo_plugin.algorithms.bt_mixture import fit_bt_mixture

ROOT = Path(__file__).resolve().parents[1]
OPENRLHF = str(Path(sys.executable).parent / "openrlhf")

CROWD = {"annotators": 100, "comparisons_per_annotator": 6, "test_comparisons_per_annotator": 2}


def test_crowd_builder_writes_no_labels_and_follows_its_types():
    ds = build({"annotators": 400, "comparisons_per_annotator": 5}, seed=3)
    assert len(ds.train) == 2000 and len(ds.test) == 800
    assert all(r.group is None for r in ds.train + ds.test)
    assert {r.prompt for r in ds.train} == {"Tonight I watched"} and len({r.responses[0] for r in ds.train}) == 6
    types = latent_types({"annotators": 400, "comparisons_per_annotator": 5}, seed=3)
    assert set(types.values()) == {0, 1} and set(types) == {r.annotator_id for r in ds.train}
    # type 0 prefers item 0 (utility 2.0) over item 4 (-2.0): sigmoid(4) = 0.98; type 1 too (-1 vs -2)
    # item 2 vs item 0: type 0 picks item 0 (0.97), type 1 picks item 2 (0.95)
    a, c = " a warm and funny story.", " a loud action ride."
    wins = {0: [], 1: []}
    for r in ds.train:
        if set(r.responses) == {a, c}:
            wins[types[r.annotator_id]].append(r.responses[r.ranking[0]] == a)
    assert np.mean(wins[0]) > 0.85 and np.mean(wins[1]) < 0.15
    with pytest.raises(ValueError, match="utilities"):
        build({"utilities": [[1.0, 2.0]]}, seed=0)


def test_tabular_bt_mixture_recovers_the_hidden_types():
    ds = build(CROWD, seed=0)
    data = ComparisonSet(ds.train)
    two, one = fit_bt_mixture(data, 2, seed=0), fit_bt_mixture(data, 1, restarts=1)
    truth = latent_types(CROWD, seed=0)
    assert clustering_scores([truth[a] for a in data.annotator_ids], two.responsibilities.argmax(1))["ari"] >= 0.75
    assert two.log_likelihood - one.log_likelihood > 30  # there is heterogeneity to find
    assert two.responsibilities.max(axis=1).mean() >= 0.9
    assert np.all(np.diff(two.trace) >= -1e-6 * np.abs(two.trace[:-1]))  # EM never goes down


RECIPE = """
# Unlabelled crowd choices on the tiny LM: data, sft, dpo, em_dpo, minmax_ensemble, report.
name: crowd_bt_cpu
seed: 0
model:
  backend: openrlhf
  pretrain: stage:sft
  beta: 0.5
  max_len: 32
  eval_batch_size: 256
  lora: {rank: 16, alpha: 32}
  train: {micro_batch_size: 32, batch_size: 64, max_epochs: 1, lr: 4.0e-3, lr_warmup_steps: 5}
  ds: {zero_stage: 0, param_dtype: fp32}
  generation: {max_new_tokens: 8}
data:
  builder: crowd_bt
  config: %s
stages:
  - {name: data, trainer: data}
  - {name: sft, trainer: sft, inputs: {dataset: data}, config: {model: tiny, sft_steps: 30}}
  - {name: dpo, trainer: dpo, inputs: {dataset: data}}
  - {name: em, trainer: em_dpo, inputs: {dataset: data}, config: {K: 2, iterations: 3}}
  - name: minmax
    trainer: minmax_ensemble
    inputs: {policies: em, dataset: data}
    config: {prompts: 1, samples_per_prompt: 32, steps: 2000}
  - {name: report, trainer: report, inputs: {dataset: data, dpo: dpo, em: em, minmax: minmax}}
""" % json.dumps(CROWD)


@pytest.mark.slow
def test_pipeline_on_unlabelled_crowd_data_agrees_with_the_tabular_mixture(tmp_path):
    recipe = tmp_path / "crowd.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    proc = subprocess.run([OPENRLHF, "run", str(recipe), "--output-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads((out / "run.json").read_text())
    assert [s for s, v in run["stages"].items() if v["status"] != "done"] == []

    m = json.loads((out / "report" / "metrics.json").read_text())
    assert m["dataset"]["labelled"] is False and m["regret"]["method"] is None
    em = m["clustering"]["em"]
    assert em["ari"] is None and em["matched_group"] == {}
    assert "skipped" in (out / "report" / "report.md").read_text()
    for name in ("dpo", "em/type0", "em/type1", "minmax/ensemble"):
        assert 0 <= m["policies"][name]["overall"]["accuracy"] <= 1
    assert abs(sum(m["ensembles"]["minmax"]["weights"]) - 1) < 1e-9

    # EM-DPO's clustering against the tabular mixture fitted to the same comparisons
    train = load_dataset_dir(out / "data").train
    tab = fit_bt_mixture(train, 2, seed=0)
    cl = json.loads((out / "em" / "clustering.json").read_text())
    assert cl["annotator_ids"] == train.annotator_ids
    em_hard = np.asarray(cl["responsibilities"]).argmax(axis=1)
    ari = clustering_scores(tab.responsibilities.argmax(axis=1).tolist(), em_hard)["ari"]
    sharpness = em["sharpness"]
    print(f"EM-DPO vs tabular mixture: ARI {ari:.3f}; EM sharpness {sharpness:.3f}, tabular "
          f"{tab.responsibilities.max(axis=1).mean():.3f}; eta {em['eta']}")
    assert ari >= 0.5, (ari, sharpness, em["eta"])
    assert sharpness >= 0.75, (ari, sharpness, em["eta"])
