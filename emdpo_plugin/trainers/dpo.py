"""`dpo` stage: the plain DPO baseline, one policy on every comparison with weight 1.

Budget: `model.train.max_epochs` passes by default (the paper's one epoch). `epochs` sets
another number of passes (fractions allowed); `inputs: {budget: <stage>}` takes it from
another stage's `epochs_seen` (the largest over its policies), which is how `dpo_matched`
gets the training passes EM's types received. The fit keeps the model's learning-rate schedule
(warm-up then the configured decay) stretched over the whole budget.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from ..artifacts import Slot
from ..backends.base import FitSchedule
from ..errors import RecipeError
from .base import StageConfig, StageContext, Trainer, seed_field
from .common import dataset_from, rel_path, stage_seed


class DPOConfig(StageConfig):
    seed: int | None = seed_field("the fit: initialisation and data order")
    epochs: float | None = Field(None, gt=0, description="passes over the data (default: model.train.max_epochs, or the "
                                                         "bandit's epochs); inputs.budget overrides it")


def budget_from(ctx: StageContext, outputs: dict[str, Any]) -> float:
    """The largest `epochs_seen` another stage recorded for its policies."""
    seen = outputs.get("epochs_seen") or {}
    if not seen or max(seen.values()) <= 0:
        raise RecipeError(f"stages.{ctx.stage_name}.inputs.budget: that stage recorded no epochs_seen")
    return float(max(seen.values()))


class DPOStage(Trainer):
    name = "dpo"
    description = "Plain DPO (Plackett-Luce for rankings) on the whole population: the baseline."
    Config = DPOConfig
    input_slots = {"dataset": Slot(("dataset",), "the comparisons to train on"),
                   "budget": Slot(("policies",), "optional: a stage whose epochs_seen (largest over its policies) "
                                                 "sets this fit's passes")}
    produces = ("policies",)
    required_inputs = ("dataset",)

    def run(self, ctx: StageContext, config: DPOConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        train = dataset_from(ctx, inputs["dataset"]).train
        backend = ctx.backend
        epochs = budget_from(ctx, inputs["budget"]) if "budget" in inputs else config.epochs
        schedule = FitSchedule(epochs=epochs) if epochs is not None else None
        policy = backend.new_policy(stage_seed(ctx, config))
        stats = backend.fit(policy, train, np.ones(len(train)), warm=False, desc=ctx.stage_name, schedule=schedule)
        path = ctx.out_dir / "policy"
        backend.save(policy, path)
        return {"policies": {ctx.stage_name: rel_path(ctx, path)}, "fit": stats,
                "epochs_seen": {ctx.stage_name: float(stats.get("epochs", 0.0))}}
