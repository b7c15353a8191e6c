"""Per-group accuracy, margin and regret for single policies and mixtures, one code path.

A policy here is a mixture `[(weight, policy), ...]`; a single policy is the one-element
mixture, so ensembles are evaluated exactly (mixture log-prob), never via a merged model.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..algorithms.metrics import clustering_scores, match_types_to_groups, preference_metrics
from ..algorithms.mixture import mixture_logprob
from ..data.schema import ComparisonSet

Mixture = list[tuple[float, Any]]


def evaluate_mixtures(
    backend: Any,
    test: ComparisonSet,
    mixtures: dict[str, Mixture],
    regret_fn: Callable[[Mixture, str], float] | None,
) -> dict[str, dict[str, Any]]:
    """{name: {"per_group": {group: {accuracy, margin, regret}}}} on the labelled test rows."""
    ref = backend.ref_score(test)
    cache: dict[int, np.ndarray] = {}

    def scores(policy: Any) -> np.ndarray:
        if id(policy) not in cache:
            cache[id(policy)] = backend.score(policy, test.prompts, test.responses)
        return cache[id(policy)]

    groups = np.array([r.group for r in test.rows], dtype=object)
    out: dict[str, dict[str, Any]] = {}
    for name, mix in mixtures.items():
        s = mixture_logprob(np.stack([scores(p) for _, p in mix]), np.array([w for w, _ in mix]))
        rewards = backend.beta * (s - ref)
        per_group = {}
        for g in sorted(set(groups) - {None}):
            rows = groups == g
            m = preference_metrics(rewards[rows], test.rankings[rows])
            m["regret"] = regret_fn(mix, g) if regret_fn else None
            per_group[g] = m
        out[name] = {"per_group": per_group}
    return out


def clustering_report(
    annotator_ids: list[str], responsibilities: np.ndarray, groups_by_annotator: dict[str, str]
) -> dict[str, Any]:
    """ARI/NMI of argmax types against true groups, and the Hungarian type-to-group matching."""
    truth = [groups_by_annotator[a] for a in annotator_ids]
    assigned = np.asarray(responsibilities).argmax(axis=1)
    k = np.asarray(responsibilities).shape[1]
    return {**clustering_scores(truth, assigned), "type_to_group": match_types_to_groups(truth, assigned, k)}
