"""The paper's contextual bandit (section 5.1): its config and true rewards.

Three arms; context x ~ U[0,1]^3; group i's reward r_i(y, x) = x . theta_i(y) + N(0, sigma)
with theta_i(i) = [10, 10, 10] and 0 for the other arms. `group_rankings` gives each group a
full reward order instead (see data_builders/bandit.py for every option and the data it builds).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from ..config import StrictModel

ENVIRONMENT = "bandit"  # the manifest's `environment` value for data built on this environment


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


def group_name(i: int) -> str:
    return f"group{i}"


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


def from_manifest(manifest: dict[str, Any]) -> BanditEnvironment | None:
    """The environment a dataset was built on, or None when it was not built on the bandit.

    Read from what the builder recorded (`environment`, `builder.config`), not from the
    builder's name, so data built through a `module:function` reference keeps its truth. A
    manifest assembled without the builder's extra fields (by hand, as tests do) is still
    recognised by the registered name `bandit`. `openrlhf data build` also records its `seed`
    in the config; it is not an environment field.
    """
    builder = manifest.get("builder", {})
    recorded = manifest.get("environment", ENVIRONMENT if builder.get("name") == "bandit" else None)
    if recorded != ENVIRONMENT:
        return None
    config = {k: v for k, v in builder.get("config", {}).items() if k != "seed"}
    return BanditEnvironment(BanditConfig.model_validate(config))
