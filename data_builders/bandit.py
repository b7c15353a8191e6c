"""The paper's contextual bandit (section 5.1), as format-v1 comparisons.

Three arms; context x ~ U[0,1]^3; group i's reward r_i(y, x) = x . theta_i(y) + N(0, sigma)
with theta_i(i) = [10, 10, 10] and 0 for the other arms. Annotators are drawn from the groups
with probabilities 0.6 / 0.3 / 0.1 and label 10 pairs each; the reference policy is uniform.

Choices the paper leaves open, made here:
- A pair is two *distinct* arms drawn uniformly (a pair repeating an arm carries no preference).
- The annotator prefers the arm with the larger noisy reward, noise drawn per response.
- Groups are drawn i.i.d. per annotator (so counts vary around 120/60/20 for 200 annotators).
- The test split labels every test context by every group (one row per group), for
  per-group accuracy and margin. The val split (`val_contexts`, default `test_contexts`) is
  built the same way from fresh contexts drawn after the test ones, so train and test are the
  same as without it; hyperparameters are chosen on val, test is read only by the report.
Prompts carry the context as a JSON list, responses are `arm0`, `arm1`, ...

Options beyond the paper's section 5.1 (defaults reproduce it exactly):
- `responses_per_comparison: n` (default 2): each comparison shows n distinct arms in random
  order and records the annotator's full ranking by noisy reward, best first (n = 3 with 3 arms
  ranks every arm; the Plackett-Luce likelihood consumes these rows).
- `group_rankings`: each group's reward order, best first, instead of "group i prefers arm i":
  the arm at position j gets `theta_scale * (1 - j / (arms - 1))` (10 / 5 / 0 for three arms),
  arms not listed get 0. `[[0], [1], [2]]` is the default. Full orders make the groups' rankings
  differ below the top, which is what the later identifiability result needs (see
  recipes/bandit_ternary.yaml).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import Field

from emdpo_plugin.data.builders import BuiltDataset
from emdpo_plugin.data.schema import Comparison
from emdpo_plugin.config import StrictModel


class BanditConfig(StrictModel):
    arms: int = 3
    dim: int = 3
    theta_scale: float = 10.0
    group_probs: list[float] = Field(default_factory=lambda: [0.6, 0.3, 0.1])
    annotators: int = 200
    pairs_per_annotator: int = 10
    noise_std: float = 0.01
    test_contexts: int = 500
    val_contexts: int | None = Field(None, ge=0, description="validation contexts (default: test_contexts; 0: no val)")
    responses_per_comparison: int = Field(2, ge=2, description="arms shown and ranked per comparison")
    group_rankings: list[list[int]] | None = Field(
        None, description="per group, arms best first (default: group i prefers arm i, others tie at 0)")


# Options added after the paper's setup: left out of the recorded config while at their default,
# so manifests of existing configs stay byte-identical.
_OPTIONAL_DEFAULTS = {"responses_per_comparison": 2, "group_rankings": None, "val_contexts": None}


def recorded_config(cfg: BanditConfig) -> dict[str, Any]:
    out = cfg.model_dump()
    for key, default in _OPTIONAL_DEFAULTS.items():
        if out[key] == default:
            del out[key]
    return out


def group_name(i: int) -> str:
    return f"group{i}"


def arm_name(i: int) -> str:
    return f"arm{i}"


def encode_context(x: np.ndarray) -> str:
    return json.dumps([float(v) for v in x])


class BanditEnvironment:
    """True rewards of the bandit: what exact regret is measured against."""

    def __init__(self, cfg: BanditConfig) -> None:
        g = len(cfg.group_probs)
        if cfg.responses_per_comparison > cfg.arms:
            raise ValueError(f"responses_per_comparison {cfg.responses_per_comparison} exceeds arms {cfg.arms}")
        if cfg.group_rankings is None:
            if g > cfg.arms:
                raise ValueError("the bandit has one preferred arm per group: need groups <= arms")
            rankings = [[i] for i in range(g)]
        else:
            rankings = cfg.group_rankings
            if len(rankings) != g:
                raise ValueError(f"group_rankings has {len(rankings)} entries, group_probs {g}")
            for r in rankings:
                if not r or len(set(r)) != len(r) or not all(0 <= a < cfg.arms for a in r):
                    raise ValueError(f"group_rankings entry {r}: need distinct arms in 0..{cfg.arms - 1}")
        self.cfg = cfg
        self.theta = np.zeros((g, cfg.arms, cfg.dim))
        for i, order in enumerate(rankings):
            for pos, arm in enumerate(order):
                self.theta[i, arm, :] = cfg.theta_scale * (1 - pos / max(cfg.arms - 1, 1))

    @property
    def groups(self) -> list[str]:
        return [group_name(i) for i in range(len(self.cfg.group_probs))]

    def mean_rewards(self, group: int, contexts: np.ndarray) -> np.ndarray:
        """(n, arms) noise-free rewards x . theta_group(y)."""
        return contexts @ self.theta[group].T

    def optimal_probs(self, group: int, contexts: np.ndarray, beta: float) -> np.ndarray:
        """The beta-regularised optimum against the uniform reference: softmax(r / beta)."""
        logits = self.mean_rewards(group, contexts) / beta
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def regret(self, group: int, contexts: np.ndarray, probs: np.ndarray, beta: float) -> float:
        """The paper's regret R_z(pi*_z) - R_z(pi): expected true reward lost against the optimum."""
        r = self.mean_rewards(group, contexts)
        return float(np.mean(np.sum((self.optimal_probs(group, contexts, beta) - probs) * r, axis=1)))


def build(config: dict[str, Any], *, seed: int) -> BuiltDataset:
    cfg = BanditConfig.model_validate(config)
    env = BanditEnvironment(cfg)
    rng = np.random.default_rng(seed)
    probs = np.asarray(cfg.group_probs) / np.sum(cfg.group_probs)
    groups = rng.choice(len(probs), size=cfg.annotators, p=probs)

    n = cfg.responses_per_comparison

    def label(group: int, x: np.ndarray, pair: np.ndarray) -> list[int]:
        noisy = env.mean_rewards(group, x[None])[0, pair] + rng.normal(0.0, cfg.noise_std, size=n)
        if n == 2:
            return [0, 1] if noisy[0] >= noisy[1] else [1, 0]
        return [int(i) for i in np.argsort(-noisy, kind="stable")]  # full ranking, best first

    train: list[Comparison] = []
    for a, g in enumerate(groups):
        for j in range(cfg.pairs_per_annotator):
            x = rng.uniform(0.0, 1.0, size=cfg.dim)
            pair = rng.choice(cfg.arms, size=n, replace=False)
            train.append(Comparison(
                annotator_id=f"a{a:04d}", prompt=encode_context(x),
                responses=[arm_name(i) for i in pair], ranking=label(g, x, pair),
                comparison_id=f"train-{a:04d}-{j:03d}", group=group_name(g), split="train"))
    def labelled_by_every_group(split: str, contexts: int) -> list[Comparison]:
        rows: list[Comparison] = []
        for t in range(contexts):
            x = rng.uniform(0.0, 1.0, size=cfg.dim)
            pair = rng.choice(cfg.arms, size=n, replace=False)
            for g in range(len(probs)):
                rows.append(Comparison(
                    annotator_id=f"{split}-{group_name(g)}", prompt=encode_context(x),
                    responses=[arm_name(i) for i in pair], ranking=label(g, x, pair),
                    comparison_id=f"{split}-{t:04d}-{group_name(g)}", group=group_name(g), split=split))
        return rows

    test = labelled_by_every_group("test", cfg.test_contexts)
    val_contexts = cfg.test_contexts if cfg.val_contexts is None else cfg.val_contexts
    val = labelled_by_every_group("val", val_contexts) if val_contexts else None
    # contexts are continuous draws: splits share no prompt (with probability 1, and checked on load)
    return BuiltDataset(train=train, test=test, val=val, config=recorded_config(cfg),
                        extra={"environment": "bandit", "synthetic": True},
                        disjoint_prompts=("train", "val", "test"))


build.Config = BanditConfig  # validated at plan time: a typo in `data.config` fails `--dry-run`
