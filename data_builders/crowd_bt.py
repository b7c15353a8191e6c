"""Unlabelled crowd pairwise choices from a hidden mixture of Bradley-Terry types.

The shape of real crowd-sourced preference data: one prompt (or very few), a handful of short
responses (items), hundreds of annotators with a few comparisons each, and no group column.
Each annotator belongs to one of a few latent types (drawn with `type_probs`); a type has a
utility per item, and an annotator shown items i and j picks i with probability
sigmoid(u_type[i] - u_type[j]) (Bradley-Terry). With one prompt and a few items an LM policy is
effectively tabular, so a plain mixture of Bradley-Terry models fitted by EM
(`emdpo_plugin.algorithms.bt_mixture`) is the yardstick EM-DPO's clustering can be compared with.

The rows carry no `group`: nothing downstream can peek at the truth. `latent_types(config,
seed)` regenerates each annotator's type for tests only. The test split holds further
comparisons by the same annotators (held-out accuracy without labels).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, model_validator

from emdpo_plugin.config import StrictModel
from emdpo_plugin.data.builders import BuiltDataset
from emdpo_plugin.data.schema import Comparison

DEFAULT_ITEMS = [" a warm and funny story.", " a slow and sad drama.", " a loud action ride.",
                 " a clever little mystery.", " a long and dull film.", " a sweet family movie."]
# two tastes that agree on some pairs and disagree on most: type 0 likes light, warm films;
# type 1 likes tension and plot
DEFAULT_UTILITIES = [[2.0, -1.0, -1.5, 0.5, -2.0, 1.5],
                     [-1.0, 1.0, 2.0, 1.5, -2.0, -1.5]]


class CrowdBTConfig(StrictModel):
    prompts: list[str] = Field(default_factory=lambda: ["Tonight I watched"], min_length=1,
                               description="every comparison uses one of these prompts (drawn uniformly)")
    items: list[str] = Field(default_factory=lambda: list(DEFAULT_ITEMS), min_length=2,
                             description="the responses compared, the same for every prompt")
    utilities: list[list[float]] = Field(default_factory=lambda: [list(u) for u in DEFAULT_UTILITIES],
                                         description="per latent type, one utility per item")
    type_probs: list[float] | None = Field(None, description="probability of each type (default: uniform)")
    annotators: int = Field(300, ge=1)
    comparisons_per_annotator: int = Field(6, ge=1)
    test_comparisons_per_annotator: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _shapes(self) -> "CrowdBTConfig":
        if not self.utilities or any(len(u) != len(self.items) for u in self.utilities):
            raise ValueError(f"utilities: expected one list of {len(self.items)} numbers (one per item) per type")
        if len(set(self.items)) != len(self.items) or any(not i for i in self.items):
            raise ValueError("items: expected distinct, non-empty responses")
        if self.type_probs is not None:
            if len(self.type_probs) != len(self.utilities) or any(p < 0 for p in self.type_probs) \
                    or abs(sum(self.type_probs) - 1) > 1e-6:
                raise ValueError(f"type_probs: expected {len(self.utilities)} non-negative numbers summing to 1")
        return self


def _generate(cfg: CrowdBTConfig, seed: int) -> tuple[list[Comparison], list[Comparison], np.ndarray]:
    rng = np.random.default_rng(seed)
    u = np.asarray(cfg.utilities, dtype=np.float64)
    probs = np.full(len(u), 1.0 / len(u)) if cfg.type_probs is None else np.asarray(cfg.type_probs)
    types = rng.choice(len(u), size=cfg.annotators, p=probs)
    m = len(cfg.items)
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    rows: dict[str, list[Comparison]] = {"train": [], "test": []}
    per_split = {"train": cfg.comparisons_per_annotator, "test": cfg.test_comparisons_per_annotator}
    for a, t in enumerate(types):
        for split, count in per_split.items():
            for c in range(count):
                i, j = pairs[rng.integers(len(pairs))]
                if rng.random() < 0.5:  # shown in random order
                    i, j = j, i
                first_wins = rng.random() < 1.0 / (1.0 + np.exp(-(u[t, i] - u[t, j])))
                rows[split].append(Comparison(
                    annotator_id=f"w{a:04d}", prompt=cfg.prompts[rng.integers(len(cfg.prompts))],
                    responses=[cfg.items[i], cfg.items[j]], ranking=[0, 1] if first_wins else [1, 0],
                    comparison_id=f"{split}-{a:04d}-{c:03d}", split=split))
    return rows["train"], rows["test"], types


def latent_types(config: dict[str, Any], *, seed: int) -> dict[str, int]:
    """annotator_id -> hidden type, regenerated from the config (tests only; never in the data)."""
    cfg = CrowdBTConfig.model_validate(config)
    _, _, types = _generate(cfg, seed)
    return {f"w{a:04d}": int(t) for a, t in enumerate(types)}


def build(config: dict[str, Any], *, seed: int) -> BuiltDataset:
    cfg = CrowdBTConfig.model_validate(config)
    train, test, _ = _generate(cfg, seed)
    return BuiltDataset(train=train, test=test, config=cfg.model_dump(),
                        extra={"synthetic": {"text": "fixed items", "labels": "hidden Bradley-Terry types, not recorded"}})


build.Config = CrowdBTConfig  # validated at plan time: a typo in `data.config` fails `--dry-run`
