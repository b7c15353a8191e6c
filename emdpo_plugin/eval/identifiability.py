"""Recovered mixture against the true one, for synthetic sets whose truth is known (the bandit).

The later version of the paper proves that binary comparisons cannot identify a preference
mixture in general while rankings over >= 3 responses can. This module measures what an EM
stage recovered against the builder's truth:

- `eta`: recovered type proportions, each type matched to a group, against the group
  proportions of the training annotators (`true_eta`); `eta_error` is the largest absolute gap.
- `policy_tv`: per group, the mean over contexts of the total-variation distance between the
  matched type policy and the group's beta-regularised optimum `softmax(r_group / beta)`.
- `ranking_tv`: per group, the mean over contexts of the total-variation distance between the
  distribution of full rankings of all arms that the matched type implies (Plackett-Luce on its
  implicit rewards) and the group's true ranking distribution (its noisy-reward order, sampled).
  A near-deterministic optimum puts almost all mass on its top arm, so `policy_tv` sees little
  beyond the top arm; `ranking_tv` sees the whole preference order, which is what tells the
  groups of an identifiability experiment apart.
- `log_likelihood` (the EM run's) next to `truth_log_likelihood`: the same observed-data
  log-likelihood with the true proportions and the groups' optimal policies. A wrong mixture
  that fits the data as well as the truth is the non-identifiability itself.

Types are matched to groups by the Hungarian algorithm on `ranking_tv`.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..algorithms.em import e_step
from ..algorithms.likelihood import comparison_loglik
from ..backends.base import SupportsExactExpectation
from ..data.schema import ComparisonSet
from ..envs import bandit as bandit_env


def plackett_luce_rankings(log_probs: np.ndarray, perms: list[tuple[int, ...]]) -> np.ndarray:
    """(n, len(perms)) probability of each full ranking under PL with rewards `log_probs` (n, m)."""
    out = np.zeros((len(log_probs), len(perms)))
    for j, perm in enumerate(perms):
        ll = np.zeros(len(log_probs))
        for pos in range(len(perm)):
            rest = log_probs[:, list(perm[pos:])]
            top = rest.max(axis=1, keepdims=True)
            ll += rest[:, 0] - (top[:, 0] + np.log(np.exp(rest - top).sum(axis=1)))
        out[:, j] = np.exp(ll)
    return out


def true_ranking_distribution(env: Any, group: int, contexts: np.ndarray, perms: list[tuple[int, ...]],
                              rng: np.random.Generator, samples: int) -> np.ndarray:
    """(n, len(perms)) frequency of each full ranking by the group's noisy rewards (Monte Carlo)."""
    r = env.mean_rewards(group, contexts)
    index = {p: j for j, p in enumerate(perms)}
    out = np.zeros((len(contexts), len(perms)))
    for _ in range(samples):
        noisy = r + rng.normal(0.0, env.cfg.noise_std, size=r.shape)
        order = np.argsort(-noisy, axis=1, kind="stable")
        cols = np.array([index[tuple(o)] for o in order])
        out[np.arange(len(contexts)), cols] += 1.0
    return out / samples


def truth_log_likelihood(env: Any, backend: Any, data: ComparisonSet, true_eta: np.ndarray) -> float:
    """Observed-data log-likelihood of `data` under the true mixture (optimal group policies)."""
    contexts = np.array([np.asarray(json.loads(p), dtype=float) for p in data.prompts])
    arms = np.full((len(data), data.max_responses), 0, dtype=np.int64)
    for i, row in enumerate(data.responses):
        arms[i, : len(row)] = [int(a.removeprefix("arm")) for a in row]
    ref = backend.ref_score(data)
    cols = []
    for g in range(len(true_eta)):
        logp = np.log(np.clip(env.optimal_probs(g, contexts, backend.beta), 1e-300, None))
        s = np.where(data.response_mask, np.take_along_axis(logp, arms, axis=1), np.nan)
        cols.append(comparison_loglik(s, ref, data.rankings, data.response_mask, backend.beta, backend.label_smoothing))
    ll = np.stack(cols, axis=1)
    eta = np.clip(np.asarray(true_eta, dtype=float), 1e-12, None)
    return float(e_step(ll, data.annotator_index, data.n_annotators, eta / eta.sum()).log_likelihood)


def identifiability_report(backend: Any, manifest: dict[str, Any], data: ComparisonSet, eta: list[float],
                           policies: list[Any], log_likelihood: float | None = None, *, contexts: int = 2000,
                           seed: int = 0, ranking_samples: int = 64) -> dict[str, Any] | None:
    """Recovered eta and type policies against the truth; None when the data has no known truth."""
    env = bandit_env.from_manifest(manifest)
    if env is None or not isinstance(backend, SupportsExactExpectation):
        return None
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(contexts, env.cfg.dim))
    groups = env.groups
    perms = list(itertools.permutations(range(env.cfg.arms)))
    type_probs = [backend.probs(p, x) for p in policies]
    type_rank = [plackett_luce_rankings(np.log(np.clip(p, 1e-300, None)) * backend.beta, perms) for p in type_probs]
    policy_tv = np.zeros((len(groups), len(policies)))
    ranking_tv = np.zeros((len(groups), len(policies)))
    for g in range(len(groups)):
        opt = env.optimal_probs(g, x, backend.beta)
        truth = true_ranking_distribution(env, g, x, perms, rng, ranking_samples)
        for k in range(len(policies)):
            policy_tv[g, k] = 0.5 * np.abs(type_probs[k] - opt).sum(axis=1).mean()
            ranking_tv[g, k] = 0.5 * np.abs(type_rank[k] - truth).sum(axis=1).mean()
    rows, cols = linear_sum_assignment(ranking_tv)
    type_of = {groups[r]: int(c) for r, c in zip(rows, cols)}

    counts = {g: 0 for g in groups}
    for g in data.annotator_groups():
        counts[g] += 1
    true_eta = np.array([counts[g] for g in groups], dtype=float) / max(data.n_annotators, 1)
    recovered = np.array([eta[type_of[g]] if g in type_of else 0.0 for g in groups])
    out: dict[str, Any] = {
        "groups": groups,
        "true_eta": dict(zip(groups, true_eta.round(6).tolist())),
        "eta": dict(zip(groups, recovered.round(6).tolist())),
        "eta_error": float(np.abs(recovered - true_eta).max()),
        "type_to_group": {f"type{k}": g for g, k in type_of.items()},
        "policy_tv": {g: float(policy_tv[gi, type_of[g]]) for gi, g in enumerate(groups) if g in type_of},
        "ranking_tv": {g: float(ranking_tv[gi, type_of[g]]) for gi, g in enumerate(groups) if g in type_of},
        "responses_per_comparison": int(data.max_responses),
        "comparisons_per_annotator": float(len(data) / max(data.n_annotators, 1)),
        "log_likelihood": log_likelihood,
        "truth_log_likelihood": truth_log_likelihood(env, backend, data, true_eta),
    }
    out["policy_tv_mean"] = float(np.mean(list(out["policy_tv"].values())))
    out["ranking_tv_mean"] = float(np.mean(list(out["ranking_tv"].values())))
    return out


def identifiability_markdown(results: dict[str, dict[str, Any]]) -> str:
    """report.md section: one row per setting, then per-group detail."""
    lines = ["## Identifiability (recovered mixture vs truth)", "",
             "| setting | responses / comparison | eta (recovered / true) | max eta error | mean policy TV "
             "| mean ranking TV | log-lik (EM / truth) |", "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        eta = ", ".join(f"{g}: {r['eta'][g]:.3f} / {r['true_eta'][g]:.3f}" for g in r["groups"])
        ll = "-" if r["log_likelihood"] is None else f"{r['log_likelihood']:.1f}"
        lines.append(f"| {label} | {r['responses_per_comparison']} | {eta} | {r['eta_error']:.3f} "
                     f"| {r['policy_tv_mean']:.3f} | {r['ranking_tv_mean']:.3f} | {ll} / {r['truth_log_likelihood']:.1f} |")
    lines += ["", "Per group (matched type: policy TV / ranking TV):", ""]
    for label, r in results.items():
        t_of = {g: t for t, g in r["type_to_group"].items()}
        cells = ", ".join(f"{g} <- {t_of.get(g, '-')}: {r['policy_tv'].get(g, float('nan')):.3f} / "
                          f"{r['ranking_tv'].get(g, float('nan')):.3f}" for g in r["groups"])
        lines.append(f"- {label}: {cells}")
    return "\n".join(lines) + "\n"
