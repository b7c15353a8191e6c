"""The language-model recipe end to end through the CLI, scaled down to minutes on 2 CPU cores.

The demo (`make demo`) runs the full CPU recipe; this test checks that every stage of the same
recipe runs on the real stack and writes what the contracts promise (metrics.json keys,
routing.yaml with adapter folders, figures), not the quality numbers of the full run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emdpo_plugin.export.routing import load_routing

ROOT = Path(__file__).resolve().parents[1]
OPENRLHF = str(Path(sys.executable).parent / "openrlhf")

SMALL = ["data.config.users=24", "data.config.pairs_per_user=6", "data.config.test_size=8",
         "stages.sft.config.sft_steps=20", "model.train.lr_warmup_steps=0", "stages.sft.config.max_texts=300",
         "stages.em.config.iterations=2", "stages.minmax.config.prompts=8",
         "stages.minmax.config.steps=2000", "stages.minmax_w14.config.prompts=8",
         "stages.minmax_kmeans.config.prompts=8", "stages.report.config.regret_prompts=8",
         "stages.minmax_kmeans.config.sampler=vllm",
         "model.generation.max_new_tokens=8"]


@pytest.mark.slow
def test_cpu_recipe_runs_every_stage_and_exports(tmp_path):
    out = tmp_path / "run"
    args = [OPENRLHF, "run", "recipes/emdpo_imdb_cpu.yaml", "--output-dir", str(out)]
    for s in SMALL + [f"logger.tensorboard_dir={tmp_path / 'tb'}"]:
        args += ["--set", s]
    # a fresh process: no rendezvous variables inherited from in-process tests of this session
    # (their TCP store still holds that MASTER_PORT)
    env = {k: v for k, v in os.environ.items()
           if k not in {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads((out / "run.json").read_text())
    assert [s for s, v in run["stages"].items() if v["status"] != "done"] == []
    log = (out / "run.log").read_text()
    assert all(f"done {stage} in " in log for stage in run["stages"]), log[-2000:]
    # tracking: the EM log-likelihood once per iteration, the host trainer's M-step loss once per step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tb,) = (tmp_path / "tb").iterdir()
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("em/log_likelihood")] == [1, 2]
    loss = [e.step for e in acc.Scalars("em/train/loss")]
    assert loss == list(range(1, len(loss) + 1)) and len(loss) >= 4  # 2 x 2 M-steps (feature start), >= 1 step each
    assert len(acc.Scalars("em/train/lr")) == len(loss)
    assert len(acc.Scalars("dpo/train/loss")) >= 1
    m = json.loads((out / "report" / "metrics.json").read_text())
    assert set(m["dataset"]["groups"]) == {"sentiment", "grammar"}
    for stage in ("em", "kmeans"):
        c = m["clustering"][stage]
        assert -1 <= c["ari"] <= 1 and len(c["eta"]) == 2 and set(c["type_to_group"]) <= {"sentiment", "grammar"}
    assert len(m["clustering"]["em"]["log_likelihood"]) == 2
    assert json.loads((out / "em" / "clustering.json").read_text())["start"] == "features"
    for name in ("dpo", "em/type0", "em/type1", "kmeans/type0", "minmax/ensemble", "minmax_w14/ensemble",
                 "oracle/grammar", "oracle/sentiment"):
        for g, v in m["policies"][name]["per_group"].items():
            assert 0 <= v["accuracy"] <= 1 and v["regret"] is not None and v["regret_se"] is not None, (name, g, v)
    # regret is measured against the group_dpo oracle, never against EM's own types
    assert m["regret"]["method"] == "appendix_e"
    assert m["regret"]["oracle_policies"] == {"grammar": "oracle/grammar", "sentiment": "oracle/sentiment"}
    for g in ("grammar", "sentiment"):
        assert m["policies"][f"oracle/{g}"]["per_group"][g]["regret"] == 0.0
    assert set(m["clustering"]["em"]["matched_group"]) == {"em/type0", "em/type1"}
    for stage in ("minmax", "minmax_w14", "minmax_kmeans"):
        e = m["ensembles"][stage]
        assert abs(sum(e["weights"]) - 1) < 1e-9 and e["max_regret"] is not None
        routing = load_routing(out / stage / "routing.yaml")
        assert [a.name for a in routing.adapters] == ["type0", "type1"]
        assert abs(sum(a.weight for a in routing.adapters) - 1) < 1e-6
        assert routing.adapter_type == "lora"
        assert (out / stage / "adapters" / "type0" / "adapter_config.json").exists()  # PEFT adapter folders
    samplers = {s: json.loads((out / s / "ensemble.json").read_text())["sampler"] for s in ("minmax", "minmax_kmeans")}
    assert samplers == {"minmax": "hf", "minmax_kmeans": "vllm"}
    # re-exporting `minmax` with minmax_w14's priorities ({grammar: 1, sentiment: 4}, resolved per type
    # through the EM clustering) re-solves the same game (same prompts, seed and HF samples: same L)
    w14_stage = json.loads((out / "minmax_w14" / "ensemble.json").read_text())
    t2g = m["clustering"]["em"]["type_to_group"]
    assert w14_stage["priority"] == [4.0 if t2g["sentiment"] == k else 1.0 for k in range(2)]
    exported = tmp_path / "w14"
    proc = subprocess.run([OPENRLHF, "export", str(out / "minmax"), "--priority",
                           ",".join(str(c) for c in w14_stage["priority"]), "--out", str(exported)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    w14 = w14_stage["weights"]
    assert [a.weight for a in load_routing(exported / "routing.yaml").adapters] == pytest.approx(w14, abs=1e-6)
    figures = {p.name for p in (out / "report").glob("*.png")}
    assert {"accuracy_after_clustering.png", "margin_after_aggregation.png", "regret_after_aggregation.png"} <= figures
    assert m["timings_s"]["em"] > 0
    # one DeepSpeed engine per training stage, however many fits (EM: K x iterations), released after it
    order = list(run["stages"])
    trained_before = {"dpo", "kmeans", "oracle"} & set(order[:order.index("em")])
    assert run["stages"]["em"]["outputs"]["backend_stats"]["engine_builds"] == len(trained_before) + 1
    # model.train.optimizer_state: fresh (the default) keeps no optimiser state between fits
    assert not list(out.rglob("optimizer.pt"))
