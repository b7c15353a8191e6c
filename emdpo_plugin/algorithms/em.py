"""E-step and mixing-weight update of EM-DPO (paper Algorithm 1), in log space only.

A product of 50 sigmoids per annotator underflows float32 and even float64 for long
histories, so everything here sums log-likelihoods and normalises with logsumexp.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp


@dataclass(frozen=True)
class EStep:
    log_resp: np.ndarray  # (n_annotators, K) log posterior of each type
    log_likelihood: float  # observed-data log-likelihood sum_i log sum_k eta_k prod_j sigma_k(ij)

    @property
    def responsibilities(self) -> np.ndarray:
        return np.exp(self.log_resp)


def annotator_loglik(comparison_ll: np.ndarray, annotator_index: np.ndarray, n_annotators: int) -> np.ndarray:
    """Sum per-comparison log-likelihoods (n, K) into per-annotator totals (n_annotators, K)."""
    ll = np.asarray(comparison_ll, dtype=np.float64)
    out = np.zeros((n_annotators, ll.shape[1]), dtype=np.float64)
    np.add.at(out, np.asarray(annotator_index), ll)
    return out


def e_step(comparison_ll: np.ndarray, annotator_index: np.ndarray, n_annotators: int, eta: np.ndarray) -> EStep:
    """Posterior over types per annotator: `log g_ik = log eta_k + sum_j ll_k(ij) - logsumexp_l(...)`."""
    per_annotator = annotator_loglik(comparison_ll, annotator_index, n_annotators)
    with np.errstate(divide="ignore"):
        joint = np.log(np.asarray(eta, dtype=np.float64))[None, :] + per_annotator
    norm = logsumexp(joint, axis=1, keepdims=True)
    return EStep(log_resp=joint - norm, log_likelihood=float(norm.sum()))


def update_eta(log_resp: np.ndarray) -> np.ndarray:
    """`eta_k = mean_i g_ik` (closed-form M-step for the type prior)."""
    eta = np.exp(log_resp).mean(axis=0)
    return eta / eta.sum()


def comparison_weights(
    responsibilities: np.ndarray, annotator_index: np.ndarray, min_responsibility: float = 0.0
) -> np.ndarray:
    """Per-comparison M-step weights for every type, (n, K): each comparison gets its annotator's g_ik.

    Responsibility sparsity: weights below `min_responsibility` are zeroed so the backend can
    skip those rows; the loss normalises by the remaining weight, so no rescaling is needed here.
    """
    w = np.asarray(responsibilities, dtype=np.float64)[np.asarray(annotator_index)]
    if min_responsibility > 0:
        w = np.where(w >= min_responsibility, w, 0.0)
    return w


def dirichlet_responsibilities(n_annotators: int, k: int, seed: int, concentration: float = 1.0) -> np.ndarray:
    """Seeded random soft assignments: breaks the symmetric fixed point of EM."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(k, concentration), size=n_annotators)
