"""The PolicyBackend protocol: the seam between the algorithms and a policy family.

The EM loop, the DPO baseline and the min-max stage are written once against these verbs.
`bandit` implements them with a small torch MLP (paper section 5.1); `openrlhf` with causal
language models trained through OpenRLHF's DeepSpeed strategy.

What only some backends can do is a capability protocol (in the manner of vLLM's
`SupportsLoRA`), checked with `isinstance(backend, SupportsX)`: the callers' branches then name
what they need, and a backend gains a branch by implementing its members.

Scores are sequence log-probabilities `s(x, y)` as float64 arrays of shape
(n_rows, max_responses), NaN where a row has fewer responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

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
    `order_seed`: the seed of the fit's row order (None: the backend's training seed). EM gives
    each iteration its own, so fits of a fraction of an epoch see different rows each time, and
    a resumed run sees the same rows as an uninterrupted one. `return_row_ll`: ask for the
    fit's `row_ll` (see `PolicyBackend.fit`); a backend may not provide it.
    """

    steps: int | None = None
    epochs: float | None = None
    constant_lr: bool = False
    order_seed: int | None = None
    return_row_ll: bool = False

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("FitSchedule: give steps or epochs, not both")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise ValueError(f"FitSchedule: steps/epochs must be positive, got {self}")


@runtime_checkable
class PolicyBackend(Protocol):
    """What every backend implements and the stages call.

    Optional: `reference_identity` (JSON-able), what the reference model is (e.g. the SFT stage's
    fingerprint); EM checkpoints key on it, so a changed reference never resumes an old one."""

    beta: float
    label_smoothing: float  # conservative-DPO eps used by fit and by the E-step alike
    stats: dict[str, float]  # counters a stage records in run.json (e.g. reference rows cached); may be empty

    def new_policy(self, seed: int) -> Any:
        """A fresh policy initialised from the reference (the start of every type policy)."""

    def ref_score(self, data: ComparisonSet) -> np.ndarray:
        """Reference log-probs of every response, computed once (a backend may cache them by content)."""

    def score(self, policy: Any | None, prompts: list[str], responses: list[list[str]]) -> np.ndarray:
        """Log-probs of arbitrary responses (inference only, batched, no grad); None = reference."""

    def fit(self, policy: Any, data: ComparisonSet, weights: np.ndarray, *, warm: bool = True,
            desc: str = "", schedule: FitSchedule | None = None) -> dict[str, Any]:
        """Weighted DPO / Plackett-Luce M-step in place; weights are per row (0 rows may be skipped).

        `warm=True` continues from the policy's current parameters (a shorter schedule may do);
        `warm=False` restarts from the reference with the full schedule. `schedule` overrides the
        budget and learning-rate schedule. A fit whose schedule gives learning rate 0 at every
        optimiser step raises `EmdpoError` naming the config keys (it would train nothing).
        Returns stats with at least `rows` (rows trained) and `epochs` (passes over them);
        with `schedule.return_row_ll` optionally `row_ll`, an (n,) array of each trained row's log-likelihood from the
        training pass's own forward (NaN for rows it did not reach), which EM's incremental
        E-step uses instead of scoring those rows again."""

    def sample(self, policy: Any, prompts: list[str], n: int, seed: int) -> list[list[str]]:
        """n responses per prompt from the policy."""

    def sample_prompts(self, n: int, seed: int) -> list[str]:
        """n prompts x ~ D for the regret matrix (from the data or the environment)."""

    def save(self, policy: Any, path: Path) -> None: ...

    def load(self, path: Path) -> Any: ...


@runtime_checkable
class SupportsExport(Protocol):
    """Policies are saved as model or adapter folders on a base model, so the min-max stage saves
    them and writes routing.yaml for `openrlhf serve` (language-model backends)."""

    base_model: str  # what routing.yaml names as the base: a local folder or a hub id
    adapter_type: str  # "lora" or "full"


@runtime_checkable
class SupportsVLLMSampling(Protocol):
    """Samples every saved policy at once on vLLM's offline engine (min-max `sampler: vllm`)."""

    def sample_vllm(self, dirs: dict[str, Path], prompts: list[str], n: int, seed: int, *,
                    log_path: Path) -> dict[str, list[list[str]]]:
        """n responses per prompt from each policy folder in `dirs`, keyed like `dirs`."""


@runtime_checkable
class SupportsExactExpectation(Protocol):
    """Policies are explicit distributions over a small response set (the bandit's arms), so
    expectations over y are sums, not sample means."""

    def probs(self, policy: Any, contexts: np.ndarray) -> np.ndarray:
        """(n, responses) probabilities of every response at each context."""

    def exact_L(self, policies: list[Any], prompts: list[str]) -> np.ndarray:
        """The min-max stage's (K, K) L with the expectation over y taken exactly."""


@runtime_checkable
class SupportsExactRegret(Protocol):
    """Knows the true rewards of data built on a synthetic environment (the bandit)."""

    def regret_oracle(self, manifest: dict[str, Any]) -> Callable[[list[tuple[float, Any]], str], float] | None:
        """`regret(mixture, group)` from the environment the manifest records, or None without one."""


@runtime_checkable
class SupportsFeatures(Protocol):
    """Has a feature vector per response under the reference (an LM's pooled hidden state), so
    `em_dpo` can start from a linear reward mixture on them (`init: features`)."""

    def ref_features(self, data: ComparisonSet) -> np.ndarray:
        """(rows, responses, d) reference features of every response, NaN where a row has none."""


@runtime_checkable
class SupportsTrainingState(Protocol):
    """Keeps per-policy training state beyond the policy's weights (the LM backend's carried
    optimiser state), which EM checkpoints and clustering starts save so training continues
    exactly; `load` reads it back when present. Exported folders leave it out."""

    def save_training_state(self, policy: Any, path: Path) -> None:
        """Write the policy's training state into its saved folder `path` (nothing if it has none)."""


CAPABILITIES: tuple[type, ...] = (SupportsExport, SupportsVLLMSampling, SupportsExactExpectation, SupportsExactRegret,
                                  SupportsFeatures, SupportsTrainingState)


def protocol_members(protocol: type) -> tuple[str, ...]:
    """The attribute names a protocol requires: its annotated fields and its methods."""
    names = dict.fromkeys(vars(protocol).get("__annotations__", {}))
    names.update(dict.fromkeys(n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")))
    return tuple(names)
