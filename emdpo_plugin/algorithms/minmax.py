"""Min-max regret mixture weights (paper Algorithm 2) and its exact cross-check.

The game: the minimising player picks mixture weights w over K type policies, the maximising
player picks a group among K real ones plus a fake zero-regret group 0 (which implements the
positive part `[regret]^+`). Optimistic Hedge for both players; the answer is the average w.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog

from .defaults import HEDGE_ETA, HEDGE_STEPS


def regret_matrix(L: np.ndarray, priority: np.ndarray | None = None) -> np.ndarray:
    """(K+1, K) game matrix: row 0 zeros, `R[k, k'] = c_k (L[k,k] - L[k,k'])` for real groups.

    L[z, z'] = E_{x, y ~ pi_z'}[s_z(x,y) - s_ref(x,y)]; c_k are per-group priority weights of
    the paper's weighted variant (default 1).
    """
    L = np.asarray(L, dtype=np.float64)
    k = L.shape[0]
    if L.shape != (k, k):
        raise ValueError(f"L must be square, got shape {L.shape}")
    c = np.ones(k) if priority is None else np.asarray(priority, dtype=np.float64)
    if c.shape != (k,) or np.any(c < 0):
        raise ValueError(f"priority weights must be {k} non-negative numbers, got {priority!r}")
    R = np.zeros((k + 1, k))
    R[1:] = c[:, None] * (np.diag(L)[:, None] - L)
    return R


@dataclass(frozen=True)
class HedgeResult:
    weights: np.ndarray  # average of w_t: the min-max mixture
    adversary: np.ndarray  # average of p_t
    trajectory: np.ndarray  # (T, K) running average of w_t, for the convergence plot
    value: float  # max_z (R w)_z at the returned weights: the worst-case (weighted) regret


def _normalise_exp(log_w: np.ndarray) -> np.ndarray:
    z = np.exp(log_w - log_w.max())
    return z / z.sum()


def optimistic_hedge(R: np.ndarray, eta: float = HEDGE_ETA, steps: int = HEDGE_STEPS) -> HedgeResult:
    """Optimistic Hedge vs optimistic Hedge on `min_w max_p p^T R w`, averaged iterates.

    `w_t ~ w_{t-1} exp(-eta (2 R^T p_{t-1} - R^T p_{t-2}))`,
    `p_t ~ p_{t-1} exp(+eta (2 R w_{t-1} - R w_{t-2}))`, with the t-2 terms equal to the t-1
    ones on the first step. Kept in log space so large regrets cannot overflow.
    """
    R = np.asarray(R, dtype=np.float64)
    m, k = R.shape
    log_w = np.full(k, -np.log(k))
    log_p = np.full(m, -np.log(m))
    w_prev = w = np.exp(log_w)
    p_prev = p = np.exp(log_p)
    avg = np.zeros(k)
    avg_p = np.zeros(m)
    trajectory = np.empty((steps, k))
    for t in range(steps):
        log_w = log_w - eta * (2 * R.T @ p - R.T @ p_prev)
        log_p = log_p + eta * (2 * R @ w - R @ w_prev)
        log_w -= log_w.max()
        log_p -= log_p.max()
        w_prev, p_prev = w, p
        w, p = _normalise_exp(log_w), _normalise_exp(log_p)
        avg += w
        avg_p += p
        trajectory[t] = avg / (t + 1)
    weights = avg / steps
    return HedgeResult(weights=weights, adversary=avg_p / steps, trajectory=trajectory, value=float((R @ weights).max()))


def game_value_lp(R: np.ndarray) -> tuple[float, np.ndarray]:
    """Exact `min_w max_z (R w)_z` over the simplex by linear programming (cross-check)."""
    R = np.asarray(R, dtype=np.float64)
    m, k = R.shape
    # variables [w_1..w_k, v]; minimise v s.t. R w - v <= 0, sum w = 1, w >= 0
    c = np.zeros(k + 1)
    c[-1] = 1.0
    A_ub = np.hstack([R, -np.ones((m, 1))])
    A_eq = np.hstack([np.ones((1, k)), np.zeros((1, 1))])
    res = linprog(c, A_ub=A_ub, b_ub=np.zeros(m), A_eq=A_eq, b_eq=[1.0],
                  bounds=[(0, None)] * k + [(None, None)], method="highs")
    if not res.success:
        raise RuntimeError(f"LP for the game value failed: {res.message}")
    return float(res.x[-1]), res.x[:k]
