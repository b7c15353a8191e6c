"""The PolicyBackend protocol: the seam between the algorithms and a policy family.

The EM loop, the DPO baseline and the min-max stage are written once against these verbs.
`bandit` implements them with a small torch MLP (paper section 5.1); `openrlhf` with causal
language models trained through OpenRLHF's DeepSpeed strategy.

Scores are sequence log-probabilities `s(x, y)` as float64 arrays of shape
(n_rows, max_responses), NaN where a row has fewer responses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..data.schema import ComparisonSet


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
            desc: str = "") -> dict[str, Any]:
        """Weighted DPO / Plackett-Luce M-step in place; weights are per row (0 rows may be skipped).

        `warm=True` continues from the policy's current parameters (a shorter schedule may do);
        `warm=False` restarts from the reference with the full schedule."""

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
