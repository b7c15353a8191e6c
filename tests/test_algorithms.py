"""The math, checked against independent references (mpmath, brute force, linear programming)."""

from __future__ import annotations

import itertools

import mpmath
import numpy as np
import pytest
import torch

from emdpo_plugin.algorithms.em import (comparison_weights, dirichlet_responsibilities, e_step,
                                        sample_by_responsibility, update_eta)
from emdpo_plugin.algorithms.likelihood import comparison_loglik, plackett_luce_loglik
from emdpo_plugin.algorithms.metrics import clustering_scores, match_types_to_groups, preference_metrics
from emdpo_plugin.algorithms.minmax import game_value_lp, optimistic_hedge, regret_matrix
from emdpo_plugin.algorithms.mixture import mixture_logprob


# --- E-step -------------------------------------------------------------------------------

def _mp_posterior(margins: np.ndarray, eta: np.ndarray) -> list[list[float]]:
    """Reference: the paper's formula taken literally (products of sigmoids), in 60-digit arithmetic."""
    mpmath.mp.dps = 60
    out = []
    for a in range(margins.shape[0]):
        joint = []
        for k in range(margins.shape[2]):
            prod = mpmath.mpf(eta[k])
            for j in range(margins.shape[1]):
                prod *= 1 / (1 + mpmath.exp(-mpmath.mpf(float(margins[a, j, k]))))
            joint.append(prod)
        total = sum(joint)
        out.append([float(x / total) for x in joint])
    return out


def test_e_step_1000_comparisons_per_annotator_matches_high_precision_reference():
    rng = np.random.default_rng(0)
    n_ann, m, K = 6, 1000, 3
    margins = rng.normal(0.0, 2.0, size=(n_ann, m, K)).astype(np.float32)  # r_w - r_l per type
    ll = torch.nn.functional.logsigmoid(torch.as_tensor(margins)).numpy().reshape(n_ann * m, K)  # float32
    index = np.repeat(np.arange(n_ann), m)
    eta = np.array([0.5, 0.3, 0.2])

    naive = np.prod(1 / (1 + np.exp(-margins.astype(np.float64))), axis=1)  # the product underflows
    assert np.all(naive == 0.0), "the test needs an underflowing product to mean anything"

    est = e_step(ll, index, n_ann, eta)
    resp = est.responsibilities
    assert np.all(np.isfinite(est.log_resp[np.isfinite(est.log_resp)])) and np.isfinite(est.log_likelihood)
    np.testing.assert_allclose(resp.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(resp, np.array(_mp_posterior(margins, eta)), atol=1e-6)


def test_e_step_log_likelihood_and_eta_update():
    ll = np.log(np.array([[0.9, 0.2], [0.8, 0.3], [0.1, 0.7]]))
    index = np.array([0, 0, 1])
    eta = np.array([0.6, 0.4])
    est = e_step(ll, index, 2, eta)
    joint0 = eta * np.array([0.9 * 0.8, 0.2 * 0.3])
    joint1 = eta * np.array([0.1, 0.7])
    assert est.log_likelihood == pytest.approx(np.log(joint0.sum()) + np.log(joint1.sum()))
    np.testing.assert_allclose(est.responsibilities[0], joint0 / joint0.sum())
    np.testing.assert_allclose(update_eta(est.log_resp), (joint0 / joint0.sum() + joint1 / joint1.sum()) / 2)


def test_comparison_weights_sparsity_threshold_zeroes_small_responsibilities():
    resp = np.array([[0.995, 0.005], [0.4, 0.6]])
    w = comparison_weights(resp, np.array([0, 0, 1]), min_responsibility=0.01)
    np.testing.assert_allclose(w, [[0.995, 0.0], [0.995, 0.0], [0.4, 0.6]])


def test_dirichlet_init_breaks_symmetry_and_is_seeded():
    a = dirichlet_responsibilities(50, 3, seed=7)
    b = dirichlet_responsibilities(50, 3, seed=7)
    c = dirichlet_responsibilities(50, 3, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_allclose(a.sum(axis=1), 1.0)
    assert a.std(axis=0).min() > 0.05  # not the symmetric fixed point (all 1/K)


# --- likelihoods --------------------------------------------------------------------------

def test_plackett_luce_over_two_responses_equals_pairwise_dpo():
    torch.manual_seed(0)
    pol, ref = torch.randn(64, 2, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    rankings = torch.stack([torch.zeros(64), torch.ones(64)], 1).long()
    rankings[::2] = rankings[::2].flip(1)
    beta = 0.1
    ll = comparison_loglik(pol, ref, rankings, torch.ones(64, 2, dtype=torch.bool), beta)
    w, l = rankings[:, 0], rankings[:, 1]
    r = beta * (pol - ref)
    dpo = torch.nn.functional.logsigmoid(r.gather(1, w[:, None]) - r.gather(1, l[:, None])).squeeze(1)
    torch.testing.assert_close(ll, dpo)
    # the general (padded) path gives the same numbers: pairs inside a batch that also has triples
    padded = torch.cat([r, torch.zeros(64, 1, dtype=torch.float64)], 1)
    mask = torch.tensor([[True, True, False]]).repeat(64, 1)
    pr = torch.cat([rankings, torch.full((64, 1), -1)], 1)
    torch.testing.assert_close(plackett_luce_loglik(padded, pr, mask), dpo)


def test_plackett_luce_full_rankings_form_a_distribution():
    r = torch.tensor([[0.3, -1.2, 2.0, 0.1]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    total = sum(torch.exp(plackett_luce_loglik(r, torch.tensor([perm]), mask)).item()
                for perm in itertools.permutations(range(4)))
    assert total == pytest.approx(1.0, abs=1e-12)
    # a top-1 prefix is the softmax probability of the winner
    top1 = plackett_luce_loglik(r, torch.tensor([[2, -1, -1, -1]]), mask)
    assert top1.item() == pytest.approx(torch.log_softmax(r, 1)[0, 2].item())


def test_comparison_loglik_numpy_in_numpy_out_and_gradients_flow():
    pol = np.log(np.array([[0.7, 0.3]]))
    ll = comparison_loglik(pol, np.log([[0.5, 0.5]]), np.array([[0, 1]]), np.ones((1, 2), bool), 1.0)
    assert isinstance(ll, np.ndarray) and ll[0] == pytest.approx(np.log(0.7))
    p = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    comparison_loglik(p, torch.zeros(3, 2), torch.tensor([[0, 1]] * 3), torch.ones(3, 2, dtype=torch.bool), 1.0).sum().backward()
    assert p.grad is not None and torch.all(p.grad[:, 0] > 0)


# --- min-max game -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_optimistic_hedge_reaches_lp_value(seed):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(2, 6))
    L = rng.normal(0, 1, size=(K, K))
    R = regret_matrix(L)
    value, _ = game_value_lp(R)
    hedge = optimistic_hedge(R, eta=0.1, steps=20_000)
    assert hedge.value == pytest.approx(value, abs=1e-3)
    assert hedge.weights.sum() == pytest.approx(1.0) and np.all(hedge.weights >= 0)


def test_regret_matrix_has_zero_row_and_priority_weights():
    L = np.array([[2.0, -1.0], [-3.0, 1.0]])
    R = regret_matrix(L, priority=np.array([1.0, 4.0]))
    np.testing.assert_allclose(R, [[0, 0], [0, 3.0], [16.0, 0]])
    with pytest.raises(ValueError):
        regret_matrix(L, priority=np.array([1.0, -1.0]))


def test_symmetric_game_gives_uniform_weights():
    L = np.array([[0.0, -5, -5], [-5, 0, -5], [-5, -5, 0.0]])
    w = optimistic_hedge(regret_matrix(L), eta=0.05, steps=5000).weights
    np.testing.assert_allclose(w, 1 / 3, atol=1e-3)


# --- mixture and metrics ------------------------------------------------------------------

def test_mixture_logprob_is_exact():
    s = np.log(np.array([[0.2, 0.5], [0.6, 0.1]]))  # (K=2, n=2)
    w = np.array([0.25, 0.75])
    np.testing.assert_allclose(mixture_logprob(s, w), np.log(w @ np.exp(s)))
    np.testing.assert_allclose(mixture_logprob(s, np.array([1.0, 0.0])), s[0])


def test_hungarian_matching_and_clustering_scores():
    truth = ["g0"] * 5 + ["g1"] * 3 + ["g2"] * 2
    assigned = np.array([2] * 5 + [0] * 3 + [1] * 2)
    assert match_types_to_groups(truth, assigned, 3) == {"g0": 2, "g1": 0, "g2": 1}
    assert clustering_scores(truth, assigned)["ari"] == pytest.approx(1.0)
    noisy = assigned.copy()
    noisy[0] = 0
    assert clustering_scores(truth, noisy)["ari"] < 1.0
    # more groups than types: the largest groups get matched
    assert match_types_to_groups(truth, np.array([0] * 5 + [1] * 5), 2) == {"g0": 0, "g1": 1}


def test_preference_metrics_on_top_pair():
    rewards = np.array([[1.0, 0.0, 5.0], [0.0, 2.0, 0.0]])
    m = preference_metrics(rewards, np.array([[0, 1, 2], [0, 1, -1]]))
    assert m["accuracy"] == 0.5 and m["margin"] == pytest.approx((1.0 - 2.0) / 2)


def test_sampling_by_responsibility_trains_a_fraction_of_the_mass_without_bias():
    w = np.r_[np.ones(3000), np.full(2000, 0.2), np.zeros(1000)]  # sure rows, doubtful rows, none
    rng = np.random.default_rng(0)
    draws = np.stack([sample_by_responsibility(w, 0.5, rng) for _ in range(200)])
    kept = draws > 0
    assert kept[:, 5000:].sum() == 0  # a row of weight 0 is never drawn
    assert kept.sum(1).mean() == pytest.approx(0.5 * w.sum(), rel=0.02)  # fraction x data mass, not x rows
    assert draws.sum(1).mean() == pytest.approx(w.sum(), rel=0.01)  # unbiased: the weighted mass is kept
    assert kept[:, :3000].mean() == pytest.approx(kept[:, 3000:5000].mean() * 5, rel=0.05)  # p proportional to w
    np.testing.assert_array_equal(sample_by_responsibility(w, 1.0, rng), w)  # whole epochs: no draw
    tiny = np.r_[0.05, np.zeros(9)]
    assert (sample_by_responsibility(tiny, 0.5, rng) > 0).sum() == 1  # a type with little mass still trains a row
