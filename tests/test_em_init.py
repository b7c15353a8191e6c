"""EM's start, fit budgets and K selection: seeding really trains, no fit runs at learning rate 0,
budgets are recorded (`epochs_seen`), and `K: [..]` picks the number of types on held-out data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_builders.bandit import build
from emdpo_plugin.algorithms.metrics import clustering_scores
from emdpo_plugin.backends.bandit import BanditBackend
from emdpo_plugin.backends.base import FitSchedule
from emdpo_plugin.data.io import write_dataset_dir
from emdpo_plugin.data.manifest import build_manifest
from emdpo_plugin.data.schema import Comparison, ComparisonSet
from emdpo_plugin.errors import EmdpoError, RecipeError
from emdpo_plugin.trainers.base import StageContext
from emdpo_plugin.trainers.em_dpo import EMConfig, EMDPOStage, _Checkpoint, heldout_split, run_em



def _lm(model: Path, run_dir: Path, **train):
    from emdpo_plugin.backends.openrlhf_backend import OpenRLHFBackend

    cfg = {"pretrain": str(model), "max_len": 64, "beta": 0.1, "eval_batch_size": 32, "lora": {"rank": 0},
           "train": {"lr": 1e-3, "micro_batch_size": 8, "batch_size": 8, "lr_warmup_steps": 1, **train}}
    return OpenRLHFBackend(cfg, seed=0, run_dir=run_dir)


def _two_tastes(annotators: int = 9, per: int = 6) -> ComparisonSet:
    """Two thirds of the annotators prefer the warm review, a third the cold one: two tabular types."""
    good, bad = " a great and moving film", " a dull and boring film"
    rows = []
    for a in range(annotators):
        likes_good = a < annotators - annotators // 3
        for j in range(per):
            first_good = j % 2 == 0
            responses = [good, bad] if first_good else [bad, good]
            ranking = [0, 1] if first_good == likes_good else [1, 0]
            rows.append(Comparison(f"a{a}", f"review {j}: it was", responses, ranking, f"c{a}-{j}",
                                   group="warm" if likes_good else "cold"))
    return ComparisonSet(rows)


def _margin(backend, policy, data) -> float:
    s = backend.score(policy, data.prompts, data.responses)
    rows = np.arange(len(data))
    return float(np.mean(s[rows, data.rankings[:, 0]] - s[rows, data.rankings[:, 1]]))


def test_a_fit_whose_every_step_has_lr_zero_is_refused(tiny_model, tmp_path):
    """The old seeding bug: one optimiser step under a warm-up schedule runs at lr 0."""
    data = _two_tastes(2, 8)  # 16 rows, one batch: one optimiser step
    be = _lm(tiny_model, tmp_path, micro_batch_size=16, batch_size=16, lr_warmup_steps=150)
    policy = be.new_policy(0)
    with pytest.raises(EmdpoError, match=r"learning rate 0 .*model\.train\.lr_warmup_steps=150"):
        be.fit(policy, data, np.ones(len(data)), warm=False, desc="seed type0")
    # the seeding schedule: constant lr, its own step budget; every step trains
    before = _margin(be, policy, data.subset(data.annotator_index == 0))
    stats = be.fit(policy, data, (data.annotator_index == 0).astype(float), warm=False,
                   schedule=FitSchedule(steps=3, constant_lr=True))
    assert stats["optimizer_steps"] == 3 and stats["lr"]["zero_steps"] == 0
    assert stats["lr"]["mean"] == pytest.approx(1e-3)
    assert _margin(be, policy, data.subset(data.annotator_index == 0)) > before + 0.5


def test_rmsprop_with_constant_warmup_and_an_epoch_budget(tiny_model, tmp_path):
    data = _two_tastes(4, 8)  # 32 rows, 4 micro-batches of 8 per epoch
    be = _lm(tiny_model, tmp_path, optimizer="rmsprop", lr_scheduler="constant_with_warmup",
             lr_warmup_steps=2, lr=1e-4)
    warm_rows = (data.annotator_index < 2).astype(float)
    policy = be.new_policy(0)
    before = _margin(be, policy, data.subset(warm_rows > 0))
    stats = be.fit(policy, data, warm_rows, warm=False, schedule=FitSchedule(epochs=2.5))
    assert stats["lr"]["optimizer"] == "RMSprop"  # torch.optim.RMSprop inside the DeepSpeed engine
    assert stats["epochs"] == pytest.approx(2.5) and stats["optimizer_steps"] == 5  # 16 rows = 2 batches/epoch
    assert stats["lr"]["zero_steps"] == 1  # warm-up step 0 only, then constant
    assert stats["lr"]["mean"] == pytest.approx(1e-4 * (0 + 0.5 + 1 + 1 + 1) / 5)
    assert _margin(be, policy, data.subset(warm_rows > 0)) > before + 0.2


def test_seeded_em_separates_tastes_with_full_fine_tuning(tiny_model, tmp_path):
    """lora.rank 0: no random adapter can break EM's symmetry; only the seeding fits can."""
    data = _two_tastes(9, 6)  # 6 warm, 3 cold annotators
    be = _lm(tiny_model, tmp_path, micro_batch_size=6, batch_size=6, lr_warmup_steps=150)
    cfg = EMConfig(K=2, iterations=1)
    state, policies = run_em(be, data, cfg, seed=0, ckpt=_Checkpoint(tmp_path / "ck", "fp"), desc="em")
    seeding = state["seeding"]["fits"]
    assert [f["annotators"] for f in seeding] == [9, 3]  # everyone, then the worse-explained cold third
    for fit in seeding:  # constant lr: every step trains although warm-up (150) outlasts the fit
        assert fit["lr"]["zero_steps"] == 0 and fit["lr"]["scheduler"] == "constant"
    assert state["seeding"]["mean_max_responsibility"] > 0.9  # the first E-step is already decisive
    ref = be.ref_score(data)
    for p in policies:
        assert np.abs(be.score(p, data.prompts, data.responses) - ref).max() > 0.05
    resp = np.exp(np.array(state["log_resp"]))
    assert clustering_scores(data.annotator_groups(), resp.argmax(1))["ari"] == pytest.approx(1.0)
    # budget: one seeding pass plus one warm M-step pass over each type's own rows
    assert state["epochs_seen"] == pytest.approx([2.0, 2.0], abs=0.01)


def test_feature_start_fits_the_types_to_a_linear_reward_mixture(tiny_model, tmp_path):
    """init: features: the start's responsibilities already separate the tastes, the first M-step
    creates the type policies from the reference (seed_epochs at a constant lr, no seeding fits)."""
    data = _two_tastes(9, 6)
    be = _lm(tiny_model, tmp_path, micro_batch_size=6, batch_size=6, lr_warmup_steps=150)
    cfg = EMConfig(K=2, iterations=2, init="features", seed_epochs=1.0, warm_epochs=0.5)
    state, policies = run_em(be, data, cfg, seed=0, ckpt=_Checkpoint(tmp_path / "ck", "fp"), desc="em")
    start = state["feature_start"]
    assert state["start"] == "features" and "seeding" not in state
    assert start["ari"] == pytest.approx(1.0) and start["mean_max_responsibility"] > 0.9
    assert start["dim"] == be.module.get_output_embeddings().in_features
    first, second = state["fit"]
    for fit in first:  # created from the reference: seed_epochs, constant lr although warm-up outlasts it
        assert fit["epochs"] == pytest.approx(1.0, abs=0.01) and fit["lr"]["scheduler"] == "constant"
        assert fit["lr"]["zero_steps"] == 0
    resp = np.exp(np.array(state["log_resp"]))
    assert clustering_scores(data.annotator_groups(), resp.argmax(1))["ari"] == pytest.approx(1.0)
    # warm_epochs 0.5: one pass over rows drawn by responsibility, about half of each type's rows
    own = np.bincount(resp.argmax(1)[data.annotator_index], minlength=2)
    for f, k in zip(second, range(2)):
        assert f["epochs"] == pytest.approx(1.0) and 0.25 <= f["rows"] / own[k] <= 0.75, (f["rows"], own)
    assert state["final_estep"] == "exact"
    assert all(1.2 <= e <= 1.8 for e in state["epochs_seen"]), state["epochs_seen"]


def test_feature_start_needs_a_backend_with_features(tmp_path):
    data = _two_tastes(6, 4)
    with pytest.raises(RecipeError, match="init: features needs a backend with reference features.*use init: seeded"):
        run_em(BanditBackend({"epochs": 5}, seed=0), data, EMConfig(K=2, init="features"), seed=0,
               ckpt=_Checkpoint(tmp_path / "ck", "fp"), desc="em")


def test_every_m_step_of_a_warmup_schedule_trains(tiny_model, tmp_path):
    """An M-step under warm-up + decay: some steps may be at lr 0 (step 0), never all of them."""
    data = _two_tastes(9, 6)
    be = _lm(tiny_model, tmp_path, micro_batch_size=6, batch_size=6, lr_warmup_steps=2)
    state, _ = run_em(be, data, EMConfig(K=2, iterations=1, warm_start=False, min_responsibility=0), seed=0,
                      ckpt=_Checkpoint(tmp_path / "ck", "fp"), desc="em")
    for fit in [f for it in state["fit"] for f in it]:
        assert fit["lr"]["zero_steps"] <= 1 and fit["lr"]["mean"] > 0 and fit["optimizer_steps"] >= 3
    assert state["epochs_seen"] == pytest.approx([1.0, 1.0], abs=0.01)  # warm_start false: the last fit only


def _bandit_dir(tmp_path: Path, group_probs, annotators=60, seed=5) -> dict:
    ds = build({"annotators": annotators, "group_probs": group_probs}, seed=seed)
    write_dataset_dir(tmp_path / "data", ds.train, ds.test,
                      build_manifest(ds.train, ds.test, builder="bandit", config=ds.config))
    return {"dir": "data", "manifest": "data/manifest.json"}


def test_k_selection_prefers_two_types_on_two_groups_and_k1_is_dpo(tmp_path):
    data_out = _bandit_dir(tmp_path, [0.6, 0.4])
    backend = BanditBackend({"epochs": 150, "warm_epochs": 50, "label_smoothing": 0.01}, seed=5)
    ctx = StageContext(run_dir=tmp_path, stage_name="em", seed=5, recipe={"model": {}}, _backend=backend)
    out = EMDPOStage().run(ctx, EMConfig(K=[1, 2], iterations=3), {"dataset": data_out})
    scores = {int(k): v for k, v in out["model_selection"].items()}
    assert out["chosen_K"] == 2 and scores[2] > scores[1] + 5, scores
    cl = json.loads((tmp_path / "em" / "clustering.json").read_text())
    assert cl["chosen_K"] == 2 and cl["model_selection"] == out["model_selection"]
    assert sorted(out["policies"]) == ["em/type0", "em/type1"]
    assert (tmp_path / "em" / "select" / "K1").is_dir()  # each candidate ran on the training part

    ctx1 = StageContext(run_dir=tmp_path, stage_name="em1", seed=5, recipe={"model": {}}, _backend=backend)
    one = EMDPOStage().run(ctx1, EMConfig(K=1, iterations=2), {"dataset": data_out})
    assert one["eta"] == [1.0] and list(one["policies"]) == ["em1/type0"] and one["start"] == "single type"
    # K = 1 is DPO on every comparison: the first M-step is a from-reference fit of all rows
    assert one["rows_trained_per_iteration"] == [[600], [600]]  # 60 annotators x 10 comparisons


def test_epochs_seen_counts_the_passes_behind_each_final_policy(tmp_path):
    ds = build({"annotators": 30, "group_probs": [0.5, 0.5]}, seed=3)
    data = ComparisonSet(ds.train)
    backend = BanditBackend({"epochs": 60, "warm_epochs": 20}, seed=3)
    warm, _ = run_em(backend, data, EMConfig(K=2, iterations=2, seed_epochs=10), seed=3,
                     ckpt=_Checkpoint(tmp_path / "w", "fp"), desc="em")
    # seeding (10 passes: type 0 over every row, type 1 over its seed annotators' rows) + up to 2
    # warm M-steps of 20 passes (one may be rejected by the generalised-EM guard)
    assert all(20 <= e <= 40 + 10 + 1e-6 for e in warm["epochs_seen"]), warm["epochs_seen"]
    assert warm["epochs_seen"][0] > 20  # type 0's seeding pass over every row counts
    cold, _ = run_em(backend, data, EMConfig(K=2, iterations=2, warm_start=False), seed=3,
                     ckpt=_Checkpoint(tmp_path / "c", "fp"), desc="em")
    assert cold["epochs_seen"] == pytest.approx([60.0, 60.0])  # each M-step from the reference: one schedule


def test_heldout_split_keeps_training_rows_for_everyone():
    data = _two_tastes(5, 6)
    held = heldout_split(data, 0.2, seed=0)
    per = np.bincount(data.annotator_index[held], minlength=5)
    assert per.tolist() == [1] * 5  # round(0.2 x 6) = 1 per annotator
    assert np.all(np.bincount(data.annotator_index[~held], minlength=5) == 5)


def test_dpo_budget_input_trains_for_the_em_passes(tmp_path):
    from emdpo_plugin.trainers.dpo import DPOConfig, DPOStage

    data_out = _bandit_dir(tmp_path, [0.5, 0.5], annotators=20)
    backend = BanditBackend({"epochs": 30}, seed=1)
    ctx = StageContext(run_dir=tmp_path, stage_name="dpo_matched", seed=1, recipe={"model": {}}, _backend=backend)
    out = DPOStage().run(ctx, DPOConfig(), {"dataset": data_out,
                                            "budget": {"epochs_seen": {"em/type0": 41.6, "em/type1": 12.0}}})
    assert out["epochs_seen"] == {"dpo_matched": 42.0} and out["fit"]["steps"] == 42
    plain = DPOStage().run(StageContext(run_dir=tmp_path, stage_name="dpo", seed=1, recipe={"model": {}},
                                        _backend=backend), DPOConfig(), {"dataset": data_out})
    assert plain["epochs_seen"] == {"dpo": 30.0}


class _FolderBackend:
    """save/load of a policy (a string) as a folder: enough for _Checkpoint."""

    def save(self, policy: str, path: Path) -> None:
        path.mkdir(parents=True)
        (path / "policy.txt").write_text(policy)

    def load(self, path: Path) -> str:
        return (path / "policy.txt").read_text()


def _save(ckpt: _Checkpoint, iteration: int) -> None:
    ckpt.save(_FolderBackend(), {"iteration": iteration, "eta": [1.0]}, [f"policy {iteration}"], np.zeros((2, 1)),
              np.zeros((2, 1)))


def test_checkpoint_swap_survives_what_a_kill_leaves_behind(tmp_path):
    ckpt = _Checkpoint(tmp_path / "restarts" / "r0", "fp")
    _save(ckpt, 1)
    # killed after moving r0 aside and before deleting it: a full r0.old beside r0, and a half r0.tmp
    (tmp_path / "restarts" / "r0.old" / "type0").mkdir(parents=True)
    (tmp_path / "restarts" / "r0.tmp" / "junk").mkdir(parents=True)
    _save(ckpt, 2)  # the next swap still works
    state, policies, _, _ = ckpt.load(_FolderBackend())
    assert state["iteration"] == 2 and policies == ["policy 2"]
    assert sorted(p.name for p in (tmp_path / "restarts").iterdir()) == ["r0"]
    # killed between the two renames: only r0.old holds the last checkpoint; a resume finds it
    (tmp_path / "restarts" / "r0").rename(tmp_path / "restarts" / "r0.old")
    state, policies, _, _ = _Checkpoint(tmp_path / "restarts" / "r0", "fp").load(_FolderBackend())
    assert state["iteration"] == 2 and policies == ["policy 2"]
    assert sorted(p.name for p in (tmp_path / "restarts").iterdir()) == ["r0"]


def test_split_seeding_cuts_between_the_modes_not_at_the_mean():
    """Groups 2:1 (the CPU demo's): the minority explains worse under a type fitted to everyone.
    A cut at the mean NLL takes in part of the majority; the two-cluster cut takes the minority."""
    from emdpo_plugin.trainers.em_dpo import worse_explained

    rng = np.random.default_rng(0)
    majority, minority = rng.normal(0.55, 0.06, 133), rng.normal(0.80, 0.06, 67)
    nll = np.concatenate([majority, minority])
    truth = np.arange(200) >= 133
    at_mean = nll > nll.mean()
    assert (at_mean & ~truth).sum() >= 10  # what the old cut did
    chosen = worse_explained(nll, seed=0)
    assert (chosen != truth).sum() <= 3, ((chosen & ~truth).sum(), (~chosen & truth).sum())
    assert not worse_explained(np.full(50, 0.69), seed=0).any()  # nobody stands out
