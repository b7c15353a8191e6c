"""The paper's contextual bandit (section 5.1), as format-v1 comparisons.

Three arms; context x ~ U[0,1]^3; group i's reward r_i(y, x) = x . theta_i(y) + N(0, sigma)
with theta_i(i) = [10, 10, 10] and 0 for the other arms. Annotators are drawn from the groups
with probabilities 0.6 / 0.3 / 0.1 and label 10 pairs each; the reference policy is uniform.

Choices the paper leaves open, made here:
- A pair is two *distinct* arms drawn uniformly (a pair repeating an arm carries no preference).
- The annotator prefers the arm with the larger noisy reward, noise drawn per response.
- Groups are drawn i.i.d. per annotator (so counts vary around 120/60/20 for 200 annotators).
- The test split labels every test context by every group (one row per group), for
  per-group accuracy and margin.
Prompts carry the context as a JSON list, responses are `arm0`, `arm1`, ...
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


def group_name(i: int) -> str:
    return f"group{i}"


def arm_name(i: int) -> str:
    return f"arm{i}"


def encode_context(x: np.ndarray) -> str:
    return json.dumps([float(v) for v in x])


class BanditEnvironment:
    """True rewards of the bandit: what exact regret is measured against."""

    def __init__(self, cfg: BanditConfig) -> None:
        if len(cfg.group_probs) > cfg.arms:
            raise ValueError("the bandit has one preferred arm per group: need groups <= arms")
        self.cfg = cfg
        g = len(cfg.group_probs)
        self.theta = np.zeros((g, cfg.arms, cfg.dim))
        for i in range(g):
            self.theta[i, i, :] = cfg.theta_scale

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

    def label(group: int, x: np.ndarray, pair: np.ndarray) -> list[int]:
        noisy = env.mean_rewards(group, x[None])[0, pair] + rng.normal(0.0, cfg.noise_std, size=2)
        return [0, 1] if noisy[0] >= noisy[1] else [1, 0]

    train: list[Comparison] = []
    for a, g in enumerate(groups):
        for j in range(cfg.pairs_per_annotator):
            x = rng.uniform(0.0, 1.0, size=cfg.dim)
            pair = rng.choice(cfg.arms, size=2, replace=False)
            train.append(Comparison(
                annotator_id=f"a{a:04d}", prompt=encode_context(x),
                responses=[arm_name(i) for i in pair], ranking=label(g, x, pair),
                comparison_id=f"train-{a:04d}-{j:03d}", group=group_name(g), split="train"))
    test: list[Comparison] = []
    for t in range(cfg.test_contexts):
        x = rng.uniform(0.0, 1.0, size=cfg.dim)
        pair = rng.choice(cfg.arms, size=2, replace=False)
        for g in range(len(probs)):
            test.append(Comparison(
                annotator_id=f"test-{group_name(g)}", prompt=encode_context(x),
                responses=[arm_name(i) for i in pair], ranking=label(g, x, pair),
                comparison_id=f"test-{t:04d}-{group_name(g)}", group=group_name(g), split="test"))
    return BuiltDataset(train=train, test=test, config=cfg.model_dump(),
                        extra={"environment": "bandit", "synthetic": True})
