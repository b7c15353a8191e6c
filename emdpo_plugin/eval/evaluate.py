"""Held-out preference metrics, clustering summaries and the oracle regret estimate, one code path.

A policy here is a mixture `[(weight, policy), ...]`; a single policy is the one-element
mixture, so ensembles are evaluated exactly (mixture log-prob), never via a merged model.

Labels are optional everywhere: what needs ground-truth groups (per-group metrics, ARI, the
type-to-group matching, regret against per-group oracles) is computed only when every
annotator has one; the rest (overall accuracy, type sizes, responsibility sharpness and
entropy, agreement between EM restarts) needs no labels.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np
from sklearn.metrics import adjusted_rand_score

from ..algorithms.metrics import clustering_scores, match_types_to_groups, preference_metrics
from ..algorithms.mixture import mixture_logprob
from ..data.schema import ComparisonSet

Mixture = list[tuple[float, Any]]


def evaluate_mixtures(backend: Any, test: ComparisonSet, mixtures: dict[str, Mixture]) -> dict[str, dict[str, Any]]:
    """{name: {"overall": {accuracy, margin}, "per_group": {group: {accuracy, margin, regret}}}}.

    `overall` uses every held-out row (no labels needed); `per_group` only rows with a group.
    `regret` is left None here: the report fills it from whichever regret source it uses.
    """
    ref = backend.ref_score(test)
    cache: dict[int, np.ndarray] = {}

    def scores(policy: Any) -> np.ndarray:
        if id(policy) not in cache:
            cache[id(policy)] = backend.score(policy, test.prompts, test.responses)
        return cache[id(policy)]

    groups = np.array([r.group for r in test.rows], dtype=object)
    labelled = sorted({g for g in groups if g is not None})
    out: dict[str, dict[str, Any]] = {}
    for name, mix in mixtures.items():
        s = mixture_logprob(np.stack([scores(p) for _, p in mix]), np.array([w for w, _ in mix]))
        rewards = backend.beta * (s - ref)
        per_group = {}
        for g in labelled:
            rows = groups == g
            per_group[g] = {**preference_metrics(rewards[rows], test.rankings[rows]), "regret": None, "regret_se": None}
        out[name] = {"overall": preference_metrics(rewards, test.rankings), "per_group": per_group}
    return out


def clustering_report(
    annotator_ids: list[str], responsibilities: np.ndarray, groups_by_annotator: dict[str, str | None]
) -> dict[str, Any]:
    """ARI/NMI of argmax types against true groups, and the Hungarian type-to-group matching.

    Without a label for every annotator there is nothing to compare with: ari/nmi are None and
    the matching is empty (never a score against `None` labels).
    """
    truth = [groups_by_annotator.get(a) for a in annotator_ids]
    if not truth or any(g is None for g in truth):
        return {"ari": None, "nmi": None, "type_to_group": {}}
    assigned = np.asarray(responsibilities).argmax(axis=1)
    k = np.asarray(responsibilities).shape[1]
    return {**clustering_scores(truth, assigned), "type_to_group": match_types_to_groups(truth, assigned, k)}


def responsibility_stats(responsibilities: np.ndarray) -> dict[str, Any]:
    """Label-free summary of a soft clustering (annotators x K).

    `sharpness` is the mean largest responsibility (1/K: EM never left its symmetric start; 1:
    every annotator assigned with certainty); `entropy` the mean posterior entropy in nats.
    """
    g = np.clip(np.asarray(responsibilities, dtype=np.float64), 0.0, 1.0)
    k = g.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(g > 0, g * np.log(g), 0.0).sum(axis=1)
    return {
        "type_sizes": np.bincount(g.argmax(axis=1), minlength=k).astype(int).tolist(),
        "sharpness": float(g.max(axis=1).mean()),
        "entropy": float(ent.mean()),
        "max_entropy": float(np.log(k)),
    }


def restart_agreement(assignments: list[np.ndarray]) -> dict[str, Any] | None:
    """ARI between every pair of restarts' hard assignments (None with fewer than two restarts).

    Label-free stability check: restarts that end in the same partition agree at ARI 1.
    """
    if len(assignments) < 2:
        return None
    pairs = [float(adjusted_rand_score(a, b)) for a, b in combinations(assignments, 2)]
    return {"restarts": len(assignments), "mean_ari": float(np.mean(pairs)), "min_ari": float(np.min(pairs))}


def estimate_regrets(
    backend: Any,
    oracle: dict[str, Any],
    mixtures: dict[str, Mixture],
    prompts: list[str],
    n: int,
    seed: int,
) -> tuple[dict[str, dict[str, dict[str, float | None]]], dict[str, float]]:
    """Appendix E's regret of every mixture for every group, against independent per-group oracles.

    `regret_g(pi) = beta * (E_{y ~ pi*_g}[s_g - s_ref] - E_{y ~ pi}[s_g - s_ref])` on `prompts`,
    with `pi*_g = oracle[g]` (a policy trained on group g's own comparisons) and `s` the
    sequence log-probs. For a mixture the second expectation is the w-weighted sum over its
    members (exact). Each distinct policy is sampled once (`n` completions per prompt).

    The standard error comes from per-prompt averages: d(x) = a_g(x) - sum_k w_k b_k(x), SE =
    beta * sd(d) / sqrt(#prompts). With a single prompt it falls back to the sample level
    (independent draws: var(a)/n + sum_k w_k^2 var(b_k)/n).
    Returns ({name: {group: {"regret": float, "se": float | None}}}, {group: KL estimate}), the
    second being E_{y ~ pi*_g}[log pi*_g/pi_SFT] = KL(pi*_g || pi_SFT): near 0, the oracle never
    left the reference and every regret against it is 0 whatever the policy (uninformative).
    """
    bases: dict[int, Any] = {id(p): p for p in oracle.values()}
    bases.update({id(p): p for mix in mixtures.values() for _, p in mix})
    # per policy and group: (prompts, n) matrix of s_g - s_ref on that policy's own samples
    diffs: dict[int, dict[str, np.ndarray]] = {}
    for j, (key, policy) in enumerate(bases.items()):
        samples = backend.sample(policy, prompts, n, seed + j)
        ref = np.asarray(backend.score(None, prompts, samples), dtype=np.float64)
        diffs[key] = {g: np.asarray(backend.score(pz, prompts, samples), dtype=np.float64) - ref
                      for g, pz in oracle.items()}
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, mix in mixtures.items():
        out[name] = {}
        for g, pz in oracle.items():
            a = diffs[id(pz)][g]
            per_prompt = a.mean(axis=1) - sum(w * diffs[id(p)][g].mean(axis=1) for w, p in mix)
            regret = backend.beta * float(per_prompt.mean())
            if len(prompts) >= 2:
                se = backend.beta * float(per_prompt.std(ddof=1) / np.sqrt(len(prompts)))
            elif n >= 2:
                var = a.var(ddof=1) / a.size + sum(w**2 * diffs[id(p)][g].var(ddof=1) / a.size for w, p in mix)
                se = backend.beta * float(np.sqrt(var))
            else:
                se = None
            if all(p is pz for _, p in mix):  # the oracle against itself: zero by definition
                regret, se = 0.0, 0.0
            out[name][g] = {"regret": regret, "se": se}
    return out, {g: float(diffs[id(pz)][g].mean()) for g, pz in oracle.items()}
