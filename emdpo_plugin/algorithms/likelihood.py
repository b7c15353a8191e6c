"""Per-comparison log-likelihoods under the implicit DPO reward.

`r(x, y) = beta * (s_policy(x, y) - s_ref(x, y))`. A ranking row contributes the Plackett-Luce
log-likelihood of its ranked prefix; a pairwise row is the 2-response case, where it equals
DPO's `log sigmoid(r_w - r_l)`. Works on numpy arrays (E-step, float64) and torch tensors
(M-step losses, differentiable) through the same function.
"""

from __future__ import annotations

import numpy as np
import torch


def plackett_luce_loglik(rewards: torch.Tensor, rankings: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of each row's ranked prefix.

    rewards: (n, m) float; rankings: (n, m) long, best first, -1 padded (a top-k prefix is
    allowed); response_mask: (n, m) bool, which response slots exist. Returns (n,).
    `ll = sum_j [ r(y_(j)) - logsumexp over responses not yet placed ]`.
    """
    n, m = rewards.shape
    if m == 2:  # every row is a pair (format v1 needs >= 2 responses): DPO's log sigmoid
        winner = rankings[:, :1]
        diff = rewards.gather(1, winner) - rewards.gather(1, 1 - winner)
        return torch.nn.functional.logsigmoid(diff.squeeze(1))
    neg_inf = torch.finfo(rewards.dtype).min
    remaining = response_mask.clone()
    total = torch.zeros(n, dtype=rewards.dtype, device=rewards.device)
    rows = torch.arange(n, device=rewards.device)
    for j in range(rankings.shape[1]):
        idx = rankings[:, j]
        active = idx >= 0
        if not bool(active.any()):
            break
        safe_idx = idx.clamp(min=0)
        chosen = rewards[rows, safe_idx]
        denom = torch.logsumexp(rewards.masked_fill(~remaining, neg_inf), dim=1)
        total = total + torch.where(active, chosen - denom, torch.zeros_like(chosen))
        remaining = remaining.clone()
        remaining[rows[active], safe_idx[active]] = False
    return total


def comparison_loglik(
    policy_scores: torch.Tensor | np.ndarray,
    ref_scores: torch.Tensor | np.ndarray,
    rankings: torch.Tensor | np.ndarray,
    response_mask: torch.Tensor | np.ndarray,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor | np.ndarray:
    """Per-row log-likelihood from sequence log-probs; returns the input's array type.

    `label_smoothing` eps is conservative DPO (OpenRLHF's `label_smoothing`):
    `(1 - eps) ll(ranking) + eps ll(reversed ranking)`, which for a pair is
    `(1-eps) log sigmoid(m) + eps log sigmoid(-m)`. It gives deterministic annotators a finite
    optimum. EM stays monotone with it: the E-step and M-step use this same function.
    """
    as_numpy = isinstance(policy_scores, np.ndarray)
    p = torch.as_tensor(policy_scores, dtype=torch.float64) if as_numpy else policy_scores
    r = torch.as_tensor(ref_scores, dtype=p.dtype, device=p.device)
    mask = torch.as_tensor(response_mask, dtype=torch.bool, device=p.device)
    rewards = beta * torch.nan_to_num(p - r, nan=0.0)
    ranks = torch.as_tensor(rankings, dtype=torch.long, device=p.device)
    ll = plackett_luce_loglik(rewards, ranks, mask)
    if label_smoothing > 0:
        ll = (1 - label_smoothing) * ll + label_smoothing * plackett_luce_loglik(rewards, reverse_rankings(ranks, mask), mask)
    return ll.numpy() if as_numpy else ll


def reverse_rankings(rankings: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """The ranked prefix in reverse order (worst first), keeping -1 padding at the end."""
    n, width = rankings.shape
    lengths = (rankings >= 0).sum(1, keepdim=True)
    pos = torch.arange(width, device=rankings.device).expand(n, width)
    src = (lengths - 1 - pos).clamp(min=0)
    rev = rankings.gather(1, src)
    return torch.where(pos < lengths, rev, torch.full_like(rankings, -1))


def weighted_nll(loglik: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The M-step objective: `-sum_j w_j ll_j / sum_j w_j` (a weighted DPO / PL loss)."""
    return -(weights * loglik).sum() / weights.sum().clamp_min(1e-12)
