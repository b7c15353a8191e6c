"""Clustering and preference metrics shared by every backend."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, confusion_matrix, normalized_mutual_info_score


def clustering_scores(true_groups: list[str], assigned_types: np.ndarray) -> dict[str, float]:
    """ARI and NMI of hard type assignments against ground-truth groups."""
    return {
        "ari": float(adjusted_rand_score(true_groups, assigned_types)),
        "nmi": float(normalized_mutual_info_score(true_groups, assigned_types)),
    }


def match_types_to_groups(true_groups: list[str], assigned_types: np.ndarray, k: int) -> dict[str, int]:
    """Hungarian matching on the annotator confusion matrix: group name -> type index.

    With more groups than types some groups stay unmatched (absent from the result).
    """
    groups = sorted(set(true_groups))
    gi = np.array([groups.index(g) for g in true_groups])
    conf = confusion_matrix(gi, np.asarray(assigned_types), labels=list(range(max(len(groups), k))))
    rows, cols = linear_sum_assignment(-conf[: len(groups), :k])
    return {groups[r]: int(c) for r, c in zip(rows, cols)}


def top_pair(rankings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(winner, loser) per row: the two best-ranked responses; for a top-1 row, the loser is
    the first response that is not the winner."""
    winner = rankings[:, 0]
    loser = rankings[:, 1].copy() if rankings.shape[1] > 1 else np.full(len(winner), -1)
    missing = loser < 0
    loser[missing] = np.where(winner[missing] == 0, 1, 0)
    return winner, loser


def preference_metrics(rewards: np.ndarray, rankings: np.ndarray) -> dict[str, float]:
    """Accuracy and margin of implicit rewards (n, m) on each row's top pair.

    accuracy: fraction of rows where the preferred response gets the higher reward;
    margin: mean reward difference (preferred minus other), as in the paper's Figures 4-7.
    """
    winner, loser = top_pair(rankings)
    rows = np.arange(len(rewards))
    diff = rewards[rows, winner] - rewards[rows, loser]
    return {"accuracy": float(np.mean(diff > 0)), "margin": float(np.mean(diff))}
