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


def sample_by_responsibility(weights: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A fractional M-step's rows for one type: row j kept with probability `p_j = min(1, c w_j)`,
    `c` set so that `sum_j p_j = fraction * sum_j w_j`, and given weight `w_j / p_j`.

    Why: a fraction of an epoch over the rows above `min_responsibility` costs as many rows as
    the annotators who might belong to the type, so soft responsibilities (K above the number of
    real groups) double the M-step. Sampled by responsibility, a type trains `fraction` times its
    data mass `sum_j w_j` whatever the spread, all types together `fraction` x rows, and the
    weighted objective stays unbiased (Horvitz-Thompson weights; with w near 1 it is a uniform
    share at weight 1). Returns the new weights (0: not drawn)."""
    w = np.asarray(weights, dtype=np.float64)
    target = fraction * w.sum()
    if fraction >= 1 or target <= 0:
        return w.copy()
    lo, hi = 0.0, 1.0 / w[w > 0].min()  # sum_j min(1, c w_j) is increasing in c; hi keeps every row
    for _ in range(60):
        c = 0.5 * (lo + hi)
        lo, hi = (c, hi) if np.minimum(1.0, c * w).sum() < target else (lo, c)
    p = np.minimum(1.0, hi * w)
    drawn = (rng.random(len(w)) < p) & (p > 0)
    if not drawn.any():  # a type with little mass still trains a row
        drawn[rng.choice(len(w), p=w / w.sum())] = True
    return np.where(drawn, w / np.where(p > 0, p, 1.0), 0.0)
