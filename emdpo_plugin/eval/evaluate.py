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
    regret_fn: Callable[[str, Mixture, str], float | None] | None,
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
            m["regret"] = regret_fn(name, mix, g) if regret_fn else None
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


def estimate_regrets(
    backend: Any,
    group_policies: dict[str, Any],
    mixtures: dict[str, Mixture],
    prompts: list[str],
    n: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """The paper's regret estimate when true rewards are unknown (language models).

    `regret_z(pi) = beta * (L[z,z] - E_{x, y ~ pi}[s_z(x,y) - s_ref(x,y)])`, where the type
    policy matched to group z stands in for z's optimum pi_z. Each distinct policy is sampled
    once; a mixture's expectation is the weighted sum of its components' (exact for a mixture).
    """
    expect: dict[int, dict[str, float]] = {}
    bases = {id(p): p for mix in mixtures.values() for _, p in mix}
    bases.update({id(p): p for p in group_policies.values()})
    for j, (key, policy) in enumerate(bases.items()):
        samples = backend.sample(policy, prompts, n, seed + j)
        ref = backend.score(None, prompts, samples)
        expect[key] = {g: float(np.mean(backend.score(pz, prompts, samples) - ref)) for g, pz in group_policies.items()}
    own = {g: expect[id(pz)][g] for g, pz in group_policies.items()}
    return {name: {g: backend.beta * (own[g] - sum(w * expect[id(p)][g] for w, p in mix)) for g in group_policies}
            for name, mix in mixtures.items()}
