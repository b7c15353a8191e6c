"""The PolicyBackend protocol: the seam between the algorithms and a policy family.

The EM loop, the DPO baseline and the min-max stage are written once against these verbs.
`bandit` implements them with a small torch MLP (paper section 5.1); `openrlhf` with causal
language models trained through OpenRLHF's DeepSpeed strategy.

Scores are sequence log-probabilities `s(x, y)` as float64 arrays of shape
(n_rows, max_responses), NaN where a row has fewer responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..data.schema import ComparisonSet


@dataclass(frozen=True)
class FitSchedule:
    """A fit's own budget, replacing the backend's default (`max_epochs` / `warm_epochs`).

    `steps`: exactly this many optimiser steps (rows cycled as often as needed); `epochs`: this
    many passes over the kept rows, fractions allowed (dpo_matched trains for EM's budget);
    `constant_lr`: the configured learning rate at every step, no warm-up and no decay. EM's
    seeding fits use `FitSchedule(steps=seed_steps, constant_lr=True)`: one annotator's rows
    are a single optimiser step per pass, and a warm-up schedule would give that step lr 0.
    """

    steps: int | None = None
    epochs: float | None = None
    constant_lr: bool = False

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("FitSchedule: give steps or epochs, not both")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise ValueError(f"FitSchedule: steps/epochs must be positive, got {self}")


@runtime_checkable
class PolicyBackend(Protocol):
    beta: float
    label_smoothing: float  # conservative-DPO eps used by fit and by the E-step alike

    def new_policy(self, seed: int) -> Any:
        """A fresh policy initialised from the reference (the start of every type policy)."""

    def ref_score(self, data: ComparisonSet) -> np.ndarray:
        """Reference log-probs of every response, computed once and cached by comparison id."""

    def score(self, policy: Any | None, prompts: list[str], responses: list[list[str]]) -> np.ndarray:
        """Log-probs of arbitrary responses (inference only, batched, no grad); None = reference."""

    def fit(self, policy: Any, data: ComparisonSet, weights: np.ndarray, *, warm: bool = True,
            desc: str = "", schedule: FitSchedule | None = None) -> dict[str, Any]:
        """Weighted DPO / Plackett-Luce M-step in place; weights are per row (0 rows may be skipped).

        `warm=True` continues from the policy's current parameters (a shorter schedule may do);
        `warm=False` restarts from the reference with the full schedule. `schedule` overrides the
        budget and learning-rate schedule. A fit whose schedule gives learning rate 0 at every
        optimiser step raises `EmdpoError` naming the config keys (it would train nothing).
        Returns stats with at least `rows` (rows trained) and `epochs` (passes over them)."""

    def sample(self, policy: Any, prompts: list[str], n: int, seed: int) -> list[list[str]]:
        """n responses per prompt from the policy."""

    def sample_prompts(self, n: int, seed: int) -> list[str]:
        """n prompts x ~ D for the regret matrix (from the data or the environment)."""

    def save(self, policy: Any, path: Path) -> None: ...

    def load(self, path: Path) -> Any: ...

    # Optional: `regret_oracle(manifest) -> callable(mixture, group) -> float | None` where the
    # environment knows the true rewards (the bandit); otherwise regret is estimated from L.
    # Optional: `exact_L(policies, prompts) -> (K, K) ndarray`, the min-max stage's L with the
    # expectation over y taken exactly (a sum over a small response set, e.g. the bandit's arms).
