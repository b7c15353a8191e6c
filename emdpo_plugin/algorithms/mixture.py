"""The ensemble as a sequence-level mixture `pi = sum_k w_k pi_k` (not a parameter merge)."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp


def mixture_logprob(type_scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Exact `log sum_k w_k pi_k(y|x) = logsumexp_k(log w_k + s_k)`; type_scores is (K, ...)."""
    scores = np.asarray(type_scores, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * (scores.ndim - 1))
    with np.errstate(divide="ignore"):
        return logsumexp(np.log(w) + scores, axis=0)
