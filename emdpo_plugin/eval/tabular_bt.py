"""A plain tabular mixture of Bradley-Terry (Plackett-Luce) models, fitted by EM: the baseline.

When a dataset has one prompt (or a few) and a handful of distinct responses, an LM policy is
effectively a table of log-probabilities, and the question "do the annotators differ?" has an
answer that needs no language model: K utility vectors over the items, one per latent type,
and the posterior of each annotator's type. EM-DPO's clustering on such data should agree with
this one (tests/test_unlabelled.py); `gain over one type` says whether there is anything to find.

Items are distinct (prompt, response) pairs. The E-step and the eta update are the ones EM-DPO
uses (`algorithms.em`); the M-step is a weighted maximum-likelihood fit of each type's utilities
(L-BFGS, a small L2 penalty fixes the free additive constant).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from ..algorithms.em import dirichlet_responsibilities, e_step, update_eta
from ..data.schema import ComparisonSet


@dataclass
class BTMixture:
    items: list[tuple[str, str]]  # (prompt, response) per utility column
    utilities: np.ndarray  # (K, items)
    eta: np.ndarray  # (K,)
    responsibilities: np.ndarray  # (annotators, K), rows in ComparisonSet.annotator_ids order
    log_likelihood: float  # observed-data log-likelihood of the returned fit
    trace: list[float]  # per EM iteration, of the chosen restart


class _Rows:
    """Item ids per row, the ranked prefix, and the response mask, as dense arrays."""

    def __init__(self, data: ComparisonSet) -> None:
        keys: dict[tuple[str, str], int] = {}
        for r in data.rows:
            for resp in r.responses:
                keys.setdefault((r.prompt, resp), len(keys))
        self.items = list(keys)
        self.ids = np.zeros((len(data), data.max_responses), dtype=np.int64)
        for n, r in enumerate(data.rows):
            self.ids[n, : len(r.responses)] = [keys[(r.prompt, resp)] for resp in r.responses]
        self.mask = data.response_mask
        self.rankings = data.rankings

    def loglik(self, u: np.ndarray) -> np.ndarray:
        """(rows,) Plackett-Luce log-likelihood of each row's ranked prefix under utilities u."""
        s = np.where(self.mask, u[self.ids], -np.inf)
        remaining = self.mask.copy()
        rows = np.arange(len(s))
        out = np.zeros(len(s))
        for pos in range(self.rankings.shape[1]):
            w = self.rankings[:, pos]
            valid = w >= 0
            if not valid.any():
                break
            wi = np.where(valid, w, 0)
            norm = logsumexp(np.where(remaining, s, -np.inf), axis=1)
            out += np.where(valid, s[rows, wi] - norm, 0.0)
            remaining[rows[valid], wi[valid]] = False
        return out

    def weighted_nll(self, u: np.ndarray, weights: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
        """-sum_j w_j ll(j) + l2/2 |u|^2 and its gradient."""
        s = np.where(self.mask, u[self.ids], -np.inf)
        remaining = self.mask.copy()
        rows = np.arange(len(s))
        ll = 0.0
        grad = np.zeros_like(u)
        for pos in range(self.rankings.shape[1]):
            w = self.rankings[:, pos]
            valid = (w >= 0) & (remaining.sum(axis=1) > 1)
            if not valid.any():
                break
            wi = np.where(valid, w, 0)
            masked = np.where(remaining, s, -np.inf)
            norm = logsumexp(masked, axis=1)
            wv = np.where(valid, weights, 0.0)
            ll += float((wv * (s[rows, wi] - norm))[valid].sum())
            np.add.at(grad, self.ids[rows, wi], wv)
            p = np.where(remaining, np.exp(masked - norm[:, None]), 0.0)
            np.add.at(grad, self.ids, -wv[:, None] * p)
            remaining[rows[valid], wi[valid]] = False
        return -ll + 0.5 * l2 * float(u @ u), -grad + l2 * u


def _fit_type(rows: _Rows, weights: np.ndarray, u0: np.ndarray, l2: float) -> np.ndarray:
    res = minimize(rows.weighted_nll, u0, args=(weights, l2), jac=True, method="L-BFGS-B")
    return res.x


def fit_bt_mixture(data: ComparisonSet, K: int, *, iterations: int = 100, restarts: int = 5, seed: int = 0,
                   l2: float = 1e-2, tol: float = 1e-7) -> BTMixture:
    """EM for a K-type mixture of Bradley-Terry models over annotators; best of `restarts`."""
    rows = _Rows(data)
    idx, n = data.annotator_index, data.n_annotators
    best: BTMixture | None = None
    for r in range(restarts):
        resp = dirichlet_responsibilities(n, K, seed + r, 1.0) if K > 1 else np.ones((n, 1))
        log_resp = np.log(np.clip(resp, 1e-300, None))
        u = np.zeros((K, len(rows.items)))
        trace: list[float] = []
        for _ in range(iterations):
            eta = update_eta(log_resp)
            g = np.exp(log_resp)[idx]  # (rows, K) comparison weights
            u = np.stack([_fit_type(rows, g[:, k], u[k], l2) for k in range(K)])
            ll = np.stack([rows.loglik(u[k]) for k in range(K)], axis=1)
            est = e_step(ll, idx, n, eta)
            log_resp = est.log_resp
            trace.append(est.log_likelihood)
            if len(trace) > 1 and abs(trace[-1] - trace[-2]) <= tol * abs(trace[-1]):
                break
        fit = BTMixture(rows.items, u, update_eta(log_resp), np.exp(log_resp), trace[-1], trace)
        if best is None or fit.log_likelihood > best.log_likelihood:
            best = fit
    assert best is not None
    return best
