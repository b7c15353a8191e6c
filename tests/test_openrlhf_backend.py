"""The language-model PolicyBackend on OpenRLHF/DeepSpeed, for real, on CPU with a tiny local model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emdpo_plugin.algorithms.likelihood import comparison_loglik
from emdpo_plugin.data.schema import Comparison, ComparisonSet

ROOT = Path(__file__).resolve().parents[1]


def _backend(model: Path, run_dir: Path, **overrides):
    from emdpo_plugin.backends.openrlhf_backend import OpenRLHFBackend

    cfg = {"pretrain": str(model), "max_len": 64, "beta": 0.1, "eval_batch_size": 32,
           "lora": {"rank": 0}, "train": {"lr": 1e-3, "micro_batch_size": 8, "batch_size": 8, "lr_warmup_steps": 1}}
    for k, v in overrides.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return OpenRLHFBackend(cfg, seed=0, run_dir=run_dir)


def _pairs(n=32) -> ComparisonSet:
    rows = []
    for i in range(n):
        good, bad = (" a great and moving film", " a dull and boring film")
        rows.append(Comparison(f"a{i % 4}", f"review {i % 8}: it was", [good, bad] if i % 2 else [bad, good],
                               [0, 1] if i % 2 else [1, 0], f"c{i}"))
    return ComparisonSet(rows)


def _margin(backend, policy, data) -> float:
    s = backend.score(policy, data.prompts, data.responses)
    rows = np.arange(len(data))
    return float(np.mean(s[rows, data.rankings[:, 0]] - s[rows, data.rankings[:, 1]]))


@pytest.mark.parametrize("lora", [0, 8])
def test_fit_moves_policy_toward_preferences_and_roundtrips(tiny_model, tmp_path, lora):
    be = _backend(tiny_model, tmp_path, lora={"rank": lora})
    data = _pairs()
    policy = be.new_policy(1)
    np.testing.assert_allclose(be.score(policy, data.prompts, data.responses), be.ref_score(data), atol=1e-5)
    before = _margin(be, policy, data)
    stats = be.fit(policy, data, np.ones(len(data)), warm=False)
    assert stats["rows"] == len(data) and stats["steps"] == 4
    assert _margin(be, policy, data) > before + 1.0
    # the reference is untouched (LoRA: adapters disabled; full: base weights)
    np.testing.assert_allclose(be.score(None, data.prompts, data.responses), be.ref_score(data), atol=1e-5)
    be.save(policy, tmp_path / "p")
    assert (tmp_path / "p" / ("adapter_config.json" if lora else "config.json")).exists()
    again = be.load(tmp_path / "p")
    np.testing.assert_allclose(be.score(again, data.prompts, data.responses),
                               be.score(policy, data.prompts, data.responses), atol=1e-6)


def test_a_fit_with_dropout_does_not_depend_on_what_the_process_drew_before(tiny_model, tmp_path):
    """Dropout masks come from a seed of the fit itself (`fit_seed`), not from the process's RNG
    state: a resumed run, a new process, trains each fit as the uninterrupted run did."""
    import torch

    be = _backend(tiny_model, tmp_path, lora={"rank": 8, "dropout": 0.5})
    data, weights = _pairs(), np.ones(32)

    def fitted(draws: int):
        policy = be.new_policy(1)
        torch.rand(draws)  # whatever this process did before the fit
        be.fit(policy, data, weights, warm=False)
        torch.rand(draws)  # ...and between a stage's fits
        be.fit(policy, data, weights, warm=True)
        return be.score(policy, data.prompts, data.responses)

    first = fitted(1)
    np.testing.assert_array_equal(fitted(1000), first)
    be.cfg.train.seed += 1  # the train seed does change the masks: dropout is really on
    assert not np.array_equal(fitted(1), first)


def test_weighted_loss_is_the_weighted_likelihood(tiny_model, tmp_path):
    """One full batch: the trainer's first loss (before its step) equals -sum w ll / sum w from
    independent scoring."""
    be = _backend(tiny_model, tmp_path, train={"lr": 1e-3, "micro_batch_size": 32, "batch_size": 32,
                                               "lr_warmup_steps": 0})
    data = _pairs()
    policy = be.new_policy(0)
    be.fit(policy, data, np.ones(len(data)), warm=False)  # move away from the reference first
    w = np.random.default_rng(0).uniform(0.1, 2.0, len(data))
    w[::4] = 0.0  # sparsity: these rows are skipped
    ll = comparison_loglik(be.score(policy, data.prompts, data.responses), be.ref_score(data),
                           data.rankings, data.response_mask, be.beta)
    expected = -(w * ll).sum() / w.sum()
    stats = be.fit(policy, data, w, warm=True)
    assert stats["rows"] == int((w > 0).sum())
    assert stats["loss_first"] == pytest.approx(expected, rel=1e-4)


def test_rankings_use_plackett_luce(tiny_model, tmp_path):
    be = _backend(tiny_model, tmp_path, train={"micro_batch_size": 4, "batch_size": 4, "max_epochs": 3})
    rows = [Comparison("a", "it was", [" great", " fine", " awful"], [0, 1, 2], f"r{i}") for i in range(16)]
    data = ComparisonSet(rows)
    policy = be.new_policy(0)
    ll0 = comparison_loglik(be.score(policy, data.prompts, data.responses), be.ref_score(data),
                            data.rankings, data.response_mask, be.beta).mean()
    be.fit(policy, data, np.ones(len(data)), warm=False)
    ll1 = comparison_loglik(be.score(policy, data.prompts, data.responses), be.ref_score(data),
                            data.rankings, data.response_mask, be.beta).mean()
    assert ll0 == pytest.approx(-np.log(6), abs=1e-4)  # policy = reference: uniform over 3! orders
    assert ll1 > ll0 + 0.5


def test_reference_logps_are_cached_on_disk(tiny_model, tmp_path):
    data = _pairs(16)
    first = _backend(tiny_model, tmp_path)
    ref = first.ref_score(data)
    assert first.stats["ref_rows_computed"] == 16
    second = _backend(tiny_model, tmp_path)  # a resumed run: nothing recomputed
    np.testing.assert_array_equal(second.ref_score(data), ref)
    assert second.stats["ref_rows_computed"] == 0 and second.stats["ref_rows_cached"] == 16
    # other prompts under the same comparison ids (a resumed run with another seed): scored afresh
    moved = ComparisonSet([Comparison(r.annotator_id, "another " + r.prompt, r.responses, r.ranking, r.comparison_id)
                           for r in data.rows])
    np.testing.assert_allclose(second.ref_score(moved), second.score(None, moved.prompts, moved.responses), atol=1e-6)
    assert second.stats["ref_rows_computed"] == 16
    # another reference (max_len cuts sequences differently): another cache file
    third = _backend(tiny_model, tmp_path, max_len=48)
    third.ref_score(data)
    assert third.stats["ref_rows_computed"] == 16 and len(list((tmp_path / "cache").glob("ref-logps-*.npz"))) == 2


@pytest.mark.parametrize("lora", [0, 8])
def test_reference_features_come_from_the_reference_pass_and_are_cached(tiny_model, tmp_path, lora):
    data = _pairs(16)
    be = _backend(tiny_model, tmp_path, lora={"rank": lora})
    be.ref_score(data)
    computed = be.stats["ref_rows_computed"]
    feats = be.ref_features(data)  # filled by the log-prob pass: nothing scored again
    assert be.stats["ref_rows_computed"] == computed == 16
    hidden = be.module.get_output_embeddings().in_features
    assert feats.shape == (16, 2, min(hidden, 256)) and np.isfinite(feats).all()
    # rows 0 and 8: the same prompt and responses, the same features; the two responses differ
    assert data.rows[0].prompt == data.rows[8].prompt and data.rows[0].responses == data.rows[8].responses
    np.testing.assert_allclose(feats[0], feats[8], rtol=1e-6)
    assert np.abs(feats[0, 0] - feats[0, 1]).max() > 1e-3
    # a trained policy does not change them (they are the reference's), and a new backend reads the file
    policy = be.new_policy(1)
    be.fit(policy, data, np.ones(len(data)), warm=False)
    again = _backend(tiny_model, tmp_path, lora={"rank": lora})
    np.testing.assert_allclose(again.ref_features(data), feats, rtol=1e-6)
    assert again.stats["ref_rows_computed"] == 0 and len(list((tmp_path / "cache").glob("ref-features-*.npz"))) == 1
    # features first: the log-probs come from that same pass
    third = _backend(tiny_model, tmp_path / "other", lora={"rank": lora})
    np.testing.assert_allclose(third.ref_features(data), feats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(third.ref_score(data), be.ref_score(data), atol=1e-5)
    assert third.stats["ref_rows_computed"] == 16


def test_damaged_reference_cache_is_scored_again_with_a_warning(tiny_model, tmp_path, caplog):
    from emdpo_plugin.backends.ref_cache import load_entries

    data = _pairs(8)
    ref = _backend(tiny_model, tmp_path).ref_score(data)
    (cache,) = (tmp_path / "cache").glob("ref-logps-*.npz")
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])  # a kill mid-copy, a full disk
    again = _backend(tiny_model, tmp_path)
    with caplog.at_level("WARNING", logger="emdpo_plugin"):
        np.testing.assert_allclose(again.ref_score(data), ref, rtol=1e-6)
    assert again.stats["ref_rows_computed"] == 8 and "damaged reference log-prob cache dropped" in caplog.text
    assert len(load_entries(cache)) == 8  # written whole again
    (feats,) = (tmp_path / "cache").glob("ref-features-*.npz")  # the feature cache likewise
    good = again.ref_features(data)
    feats.write_bytes(feats.read_bytes()[: feats.stat().st_size // 2])
    third = _backend(tiny_model, tmp_path)
    with caplog.at_level("WARNING", logger="emdpo_plugin"):
        np.testing.assert_allclose(third.ref_features(data), good, rtol=1e-5, atol=1e-6)
    assert third.stats["ref_rows_computed"] == 8 and "damaged reference feature cache dropped" in caplog.text


def test_sample_returns_n_completions_per_prompt(tiny_model, tmp_path):
    be = _backend(tiny_model, tmp_path, generation={"max_new_tokens": 8})
    out = be.sample(be.new_policy(0), ["the film was", "i think"], 3, seed=0)
    assert len(out) == 2 and all(len(o) == 3 for o in out)
    assert all(isinstance(t, str) for o in out for t in o)


@pytest.mark.slow
def test_data_parallel_fit_two_processes_train_the_same_model(tiny_model, tmp_path):
    script = ROOT / "tests" / "dp_fit_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", "29533", str(script), str(tiny_model),
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["world_size"] == results[1]["world_size"] == 2
    assert results[0]["digest"] == results[1]["digest"]  # identical parameters on both ranks
    assert results[0]["margin_after"] > results[0]["margin_before"] + 0.5


def test_training_pass_log_likelihoods_match_independent_scoring(tiny_model, tmp_path):
    """`row_ll` (EM's incremental E-step) is each trained row's likelihood from its training
    forward, mapped back to the right rows: with one full batch it is the pre-step policy's
    score of every kept row, and NaN for the skipped ones."""
    from emdpo_plugin.backends.base import FitSchedule

    be = _backend(tiny_model, tmp_path, train={"lr": 1e-3, "micro_batch_size": 32, "batch_size": 32,
                                               "lr_warmup_steps": 0})
    data = _pairs()
    policy = be.new_policy(0)
    be.fit(policy, data, np.ones(len(data)), warm=False)
    w = np.ones(len(data))
    w[::4] = 0.0
    ll = comparison_loglik(be.score(policy, data.prompts, data.responses), be.ref_score(data),
                           data.rankings, data.response_mask, be.beta)
    stats = be.fit(policy, data, w, warm=True, schedule=FitSchedule(epochs=1, return_row_ll=True))
    row_ll = stats["row_ll"]
    assert np.isnan(row_ll[w == 0]).all()
    np.testing.assert_allclose(row_ll[w > 0], ll[w > 0], atol=1e-4)
    assert "row_ll" not in be.fit(policy, data, w, warm=True)  # only when asked: stats go to run.json


def test_length_grouped_order_covers_every_row_and_pads_little():
    from emdpo_plugin.backends.weighted_dpo import LengthGroupedShard

    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 100, size=1000).tolist()
    world, micro = 2, 8
    shards = [list(LengthGroupedShard(lengths, micro * world, seed=3, world=world, rank=r)) for r in range(world)]
    assert len(shards[0]) == len(shards[1]) == 500 and sorted(shards[0] + shards[1]) == list(range(1000))
    assert list(LengthGroupedShard(lengths, micro * world, seed=3, world=world, rank=0)) == shards[0]  # seeded
    other = LengthGroupedShard(lengths, micro * world, seed=3, world=world, rank=0)
    other.set_epoch(1)
    assert list(other) != shards[0]  # each epoch its own order
    pad = lambda order: np.mean([max(lengths[i] for i in order[s:s + micro]) - np.mean([lengths[i] for i in order[s:s + micro]])
                                 for s in range(0, len(order), micro)])
    assert pad(shards[0]) < 0.25 * pad(rng.permutation(1000)[:500].tolist())
