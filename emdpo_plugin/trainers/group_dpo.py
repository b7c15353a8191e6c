"""`group_dpo` stage: one DPO policy per labelled group, on that group's own comparisons.

The known-groups upper bound, and the independent oracle `pi*_g` the report measures regret
against (appendix E): a policy of the method being evaluated (an EM type, an ensemble member)
can never serve as its own yardstick. Needs the dataset's `group` labels on every training row
and refuses data without them. Each fit starts from the reference (cold), so every oracle sees
the same number of passes over its group's rows: the backend's full schedule, `epochs`, or, with
`inputs: {budget: <stage>}`, the largest `epochs_seen` of that stage (as `dpo_matched` does). An
oracle trained for fewer passes than the policies it judges is no upper bound: the recipes give
it EM's budget. The fits go through the run's executor, so a Ray executor trains them side by side.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from pydantic import Field

from ..artifacts import Slot
from ..backends.base import FitSchedule
from ..errors import RecipeError
from ..executors import FitJob
from .base import StageConfig, StageContext, Trainer, seed_field
from .common import dataset_from, rel_path, stage_seed
from .dpo import budget_from


class GroupDPOConfig(StageConfig):
    seed: int | None = seed_field("the per-group fits")
    epochs: float | None = Field(None, gt=0, description="passes over each group's rows (default: the backend's "
                                                         "cold-fit budget); inputs.budget overrides it")


def _folder(group: str, taken: set[str]) -> str:
    """A filesystem-safe, unique folder name for a group label."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", group).strip("._") or "group"
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


class GroupDPOStage(Trainer):
    name = "group_dpo"
    description = "Known-groups oracle: one DPO policy per labelled group on its own comparisons (regret yardstick)."
    Config = GroupDPOConfig
    input_slots = {"dataset": Slot(("dataset",), "comparisons whose annotators carry group labels"),
                   "budget": Slot(("policies",), "optional: a stage whose epochs_seen (largest over its policies) "
                                                 "sets each oracle's passes")}
    produces = ("policies",)
    required_inputs = ("dataset",)

    def run(self, ctx: StageContext, config: GroupDPOConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        train = dataset_from(ctx, inputs["dataset"]).train
        labels = np.array([r.group for r in train.rows], dtype=object)
        missing = int(sum(g is None for g in labels))
        if len(train) == 0 or missing:
            raise RecipeError(f"stages.{ctx.stage_name}: group_dpo needs a group label on every training row "
                              f"({missing} of {len(train)} rows have none); drop this stage for unlabelled data")
        groups = sorted(set(labels))
        backend, seed = ctx.backend, stage_seed(ctx, config)
        epochs = budget_from(ctx, inputs["budget"]) if "budget" in inputs else config.epochs
        schedule = FitSchedule(epochs=epochs) if epochs is not None else None
        jobs = [FitJob(backend.new_policy(seed + 1000 * i), (labels == g).astype(np.float64), False,
                       f"{ctx.stage_name} {g}", schedule) for i, g in enumerate(groups)]
        fits = ctx.executor.fit_many(backend, train, jobs)
        names: dict[str, str] = {}
        oracle: dict[str, str] = {}
        taken: set[str] = set()
        for g, job in zip(groups, jobs):
            path = ctx.out_dir / _folder(g, taken)
            backend.save(job.policy, path)
            name = f"{ctx.stage_name}/{g}"
            names[name] = rel_path(ctx, path)
            oracle[g] = name
        seen = [float(f["epochs"]) for f in fits]  # PolicyBackend.fit reports the passes it trained
        return {"policies": names, "oracle_groups": oracle,
                "epochs_seen": dict(zip(names, seen)),
                "rows": {g: int((labels == g).sum()) for g in groups}, "fit": fits}
