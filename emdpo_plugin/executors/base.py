"""The executor seam: what EM-DPO and Cluster-DPO hand off when they train or score K policies.

An EM iteration trains K independent weighted-DPO fits and then scores every comparison under
every type. `LocalExecutor` runs them one after another on the run's backend (under torchrun or
the DeepSpeed launcher every rank takes part in each fit: data parallel). `RayExecutor`
(`executors/ray_executor.py`) runs the K fits at once, one Ray actor group per type.
The algorithms never know which one they got.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field

from ..algorithms.likelihood import comparison_loglik
from ..backends.base import FitSchedule
from ..config import StrictModel
from ..data.schema import ComparisonSet


class ExecutorConfig(StrictModel):
    """The recipe's top-level `executor:` section."""

    kind: Literal["local", "ray"] = Field("local", description="local: this process (or every launcher rank); ray: K fits side by side on Ray")
    address: str | None = Field(None, description="Ray cluster address ('auto' joins a running cluster); none starts a local Ray")
    gpus_per_type: int = Field(0, ge=0, description="GPUs per type's actor group (its data-parallel size when > 0); 0 on CPU")
    cpus_per_type: float = Field(1.0, gt=0, description="CPUs reserved per actor")
    num_nodes_per_type: int = Field(1, ge=1, description="nodes per type's actor group")
    object_store_mb: int | None = Field(None, ge=64, description="local Ray only: object store size in MB (none: Ray's default, 30% of RAM)")


@dataclass
class FitJob:
    """One weighted-DPO fit: `policy` is trained in place on the rows with weight > 0."""

    policy: Any
    weights: np.ndarray
    warm: bool
    desc: str
    schedule: FitSchedule | None = None  # the fit's own budget/schedule (EM seeding, dpo_matched)


class Executor(Protocol):
    timeline: list[dict[str, Any]]  # one entry per fit: {desc, start, end, worker}; drained per stage

    def fit_many(self, backend: Any, data: ComparisonSet, jobs: list[FitJob]) -> list[dict[str, Any]]:
        """Run every job; policies are updated in place; returns each fit's stats in job order."""

    def loglik_many(self, backend: Any, policies: list[Any], data: ComparisonSet, ref: np.ndarray) -> np.ndarray:
        """(n, K) log-likelihood of every comparison under every policy (inference only)."""

    def release_engines(self) -> None:
        """A stage ended: training engines held for it (outside the run's own backend) are destroyed."""

    def close(self) -> None: ...


def loglik_rows(backend: Any, policies: list[Any], data: ComparisonSet, ref: np.ndarray) -> np.ndarray:
    """(n, K) log-likelihood of every row of `data` under every policy; `ref` holds the rows'
    reference scores. The one E-step scoring function: LocalExecutor calls it on the whole set,
    each Ray actor on its shard of rows."""
    ref = ref[:, : data.max_responses]  # a shard may be narrower than the set it came from
    cols = [comparison_loglik(backend.score(p, data.prompts, data.responses), ref, data.rankings,
                              data.response_mask, backend.beta, backend.label_smoothing) for p in policies]
    return np.stack(cols, axis=1) if cols else np.zeros((len(data), 0))


class LocalExecutor:
    """Every fit and score in this process, one after another, on the run's backend."""

    kind = "local"

    def __init__(self) -> None:
        self.timeline: list[dict[str, Any]] = []

    def fit_many(self, backend: Any, data: ComparisonSet, jobs: list[FitJob]) -> list[dict[str, Any]]:
        out = []
        for j in jobs:
            start = time.time()
            out.append(backend.fit(j.policy, data, j.weights, warm=j.warm, desc=j.desc, schedule=j.schedule))
            self.timeline.append({"desc": j.desc, "start": start, "end": time.time(), "worker": "local"})
        return out

    def loglik_many(self, backend: Any, policies: list[Any], data: ComparisonSet, ref: np.ndarray) -> np.ndarray:
        return loglik_rows(backend, policies, data, ref)

    def release_engines(self) -> None:
        pass  # the run's backend holds the only engine; the runner releases it

    def close(self) -> None:
        pass
