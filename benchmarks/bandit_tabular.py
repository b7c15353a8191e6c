"""The bandit's min-max game solved on tabular policies: what `recipes/bandit.yaml` should find.

The recipe trains MLP type policies, builds L, and solves the regret game. This script plays the
same game (same `regret_matrix`, same `optimistic_hedge`, the LP cross-check in
`emdpo_plugin/algorithms/minmax.py`) on exact per-context policies, so a trained run can be
compared with the ideal answer instead of with a guess:

- `optimum`: each group's beta-regularised optimum `pi*_z = softmax(r_z(x, .) / beta)` against the
  uniform reference (the paper's pi*_z, the policy regret is measured against);
- `dpo`: the population optimum of (conservative) DPO on one group's comparisons, i.e. what a
  type policy can learn from this data. Pairs (z, j) are won by arm z with probability
  `p = Phi(10 sum(x) / (sqrt(2) sigma))`, pairs of two zero-reward arms are coin flips, so the
  optimum puts logit `logit((1-eps) p + eps (1-p))` on arm z and 0 on the others
  (`log 99` at eps = 0.01 wherever p = 1). At eps = 0 it lies at infinity: no finite game.

L is exact in y (a sum over the 3 arms) and averaged over a fixed sample of contexts; regret per
group is the true-reward regret of the mixture, as the report computes it.

    .venv/bin/python benchmarks/bandit_tabular.py [--run runs/bandit] [--contexts 200000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.special import log_softmax, ndtr

from emdpo_plugin.envs.bandit import BanditConfig, BanditEnvironment
from emdpo_plugin.algorithms.defaults import HEDGE_ETA
from emdpo_plugin.algorithms.minmax import game_value_lp, optimistic_hedge, regret_matrix


def tabular_logprobs(env: BanditEnvironment, contexts: np.ndarray, kind: Literal["optimum", "dpo"], beta: float,
                     eps: float) -> np.ndarray:
    """(groups, n, arms) log-probabilities of each group's tabular policy at every context."""
    groups = len(env.groups)
    if kind == "optimum":
        return np.stack([log_softmax(env.mean_rewards(z, contexts) / beta, axis=1) for z in range(groups)])
    if env.cfg.group_rankings is not None:
        raise ValueError("the closed-form DPO optimum assumes the paper's 'group i prefers arm i' rewards")
    if eps <= 0:
        raise ValueError("without label smoothing the DPO optimum on deterministic annotators lies at infinity")
    gap = env.cfg.theta_scale * contexts.sum(1)  # r_z(z) - r_z(j), j != z
    p = ndtr(gap / (np.sqrt(2) * env.cfg.noise_std))
    q = (1 - eps) * p + eps * (1 - p)
    out = []
    for z in range(groups):
        logits = np.zeros((len(contexts), env.cfg.arms))
        logits[:, z] = np.log(q) - np.log1p(-q)
        out.append(log_softmax(logits / beta, axis=1))  # implicit reward beta * log-ratio = logit
    return np.stack(out)


def exact_L(logp: np.ndarray) -> np.ndarray:
    """`L[z, z'] = E_x sum_y pi_z'(y|x) (log pi_z(y|x) - log(1/arms))`, the uniform reference."""
    arms = logp.shape[-1]
    return np.einsum("jna,kna->kj", np.exp(logp), logp + np.log(arms)) / logp.shape[1]


def play(env: BanditEnvironment, contexts: np.ndarray, logp: np.ndarray, beta: float, eta: float,
         steps: int) -> dict[str, Any]:
    """The recipe's game on the given policies: weights (Hedge and LP), game value, true regrets."""
    L = exact_L(logp)
    R = regret_matrix(L)
    hedge = optimistic_hedge(R, eta=eta, steps=steps)
    lp_value, lp_w = game_value_lp(R)
    probs = np.exp(logp)

    def true_regret(w: np.ndarray) -> list[float]:
        mix = np.einsum("k,kna->na", w, probs)
        return [env.regret(z, contexts, mix, beta) for z in range(len(env.groups))]

    return {"L": L.tolist(), "hedge_weights": hedge.weights.tolist(), "hedge_value": hedge.value,
            "lp_weights": lp_w.tolist(), "lp_value": lp_value,
            "regret_hedge": true_regret(hedge.weights), "regret_lp": true_regret(lp_w)}


def spread(values: list[float]) -> float:
    """Largest relative deviation from the mean: the acceptance's "within x% of their mean"."""
    v = np.asarray(values)
    return float(np.max(np.abs(v - v.mean())) / v.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="a finished bandit run folder to compare with")
    ap.add_argument("--contexts", type=int, default=200_000)
    ap.add_argument("--eps", type=float, default=0.01, help="label smoothing of the `dpo` policies")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--eta", type=float, default=HEDGE_ETA)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write both games (L, weights, regrets) here")
    args = ap.parse_args()
    env = BanditEnvironment(BanditConfig())
    contexts = np.random.default_rng(args.seed).uniform(0, 1, size=(args.contexts, env.cfg.dim))
    out: dict[str, Any] = {}
    for kind in ("optimum", "dpo"):
        res = play(env, contexts, tabular_logprobs(env, contexts, kind, args.beta, args.eps), args.beta,
                   args.eta, args.steps)
        out[kind] = res
        print(f"{kind:8s} weights (Hedge) {np.round(res['hedge_weights'], 4).tolist()}  LP "
              f"{np.round(res['lp_weights'], 4).tolist()}  true regret {np.round(res['regret_hedge'], 3).tolist()} "
              f"(spread {spread(res['regret_hedge']):.2%})")
    if args.run:
        m = json.loads((args.run / "report" / "metrics.json").read_text())
        ens = m["ensembles"]["minmax"]
        regrets = list(ens["per_group_regret"].values())
        print(f"run      weights (Hedge) {np.round(ens['weights'], 4).tolist()}  true regret "
              f"{np.round(regrets, 3).tolist()} (spread {spread(regrets):.2%})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
