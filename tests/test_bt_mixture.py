"""Mixtures of Bradley-Terry models on features: the start `em_dpo`'s `init: features` uses."""

from __future__ import annotations

import numpy as np
import pytest

from emdpo_plugin.algorithms.bt_mixture import fit_linear_bt_mixture
from emdpo_plugin.algorithms.metrics import clustering_scores


def _mixture_data(seed: int, annotators: int = 120, per: int = 20, d: int = 8, responses: int = 2):
    """Two latent types with opposite-ish linear rewards over random response features."""
    rng = np.random.default_rng(seed)
    theta = np.stack([rng.normal(size=d), rng.normal(size=d)]) * 1.5
    types = rng.integers(2, size=annotators)
    idx = np.repeat(np.arange(annotators), per)
    x = rng.normal(size=(len(idx), responses, d)) * 3.0 + 7.0  # an offset and scale the fit must not care about
    u = np.einsum("nrd,nd->nr", x - 7.0, theta[types[idx]]) / 3.0
    g = rng.gumbel(size=u.shape)
    rankings = np.argsort(-(u + g), axis=1)  # Plackett-Luce draws
    return x, rankings, np.ones(rankings.shape, dtype=bool), idx, annotators, types


@pytest.mark.parametrize("responses", [2, 3])
def test_linear_mixture_recovers_the_types_and_em_never_goes_down(responses):
    x, rankings, mask, idx, n, types = _mixture_data(0, responses=responses)
    two = fit_linear_bt_mixture(x, rankings, mask, idx, n, 2, seed=0)
    one = fit_linear_bt_mixture(x, rankings, mask, idx, n, 1, restarts=1)
    assert clustering_scores(types.tolist(), two.responsibilities.argmax(1))["ari"] >= 0.9
    assert two.log_likelihood > one.log_likelihood + 50
    assert abs(two.eta.sum() - 1) < 1e-9 and two.theta.shape == (2, x.shape[-1])
    assert np.all(np.diff(two.trace) >= -1e-6 * np.abs(two.trace[:-1]))


def test_linear_mixture_finds_nothing_where_annotators_agree():
    x, rankings, mask, idx, n, _ = _mixture_data(1)
    rankings = np.argsort(-(x[..., :1].sum(-1)), axis=1)  # everyone ranks by feature 0
    two = fit_linear_bt_mixture(x, rankings, mask, idx, n, 2, seed=0)
    one = fit_linear_bt_mixture(x, rankings, mask, idx, n, 1, restarts=1)
    assert two.log_likelihood - one.log_likelihood < 5  # a second type explains next to nothing


def test_linear_mixture_refuses_features_that_do_not_match_the_rows():
    x, rankings, mask, idx, n, _ = _mixture_data(2)
    with pytest.raises(ValueError, match=r"features must be \(rows, responses, d\)"):
        fit_linear_bt_mixture(x[:, :, 0], rankings, mask, idx, n, 2)
    x[3, 1, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        fit_linear_bt_mixture(x, rankings, mask, idx, n, 2)
