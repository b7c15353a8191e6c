"""`dpo` stage: the plain DPO baseline, one policy on every comparison with weight 1."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import StageConfig, StageContext, Trainer
from .common import dataset_from, rel_path


class DPOConfig(StageConfig):
    seed: int | None = None  # defaults to the recipe seed


class DPOStage(Trainer):
    name = "dpo"
    description = "Plain DPO (Plackett-Luce for rankings) on the whole population: the baseline."
    Config = DPOConfig
    input_slots = {"dataset": "a stage that produced a dataset (data)"}
    required_inputs = ("dataset",)

    def run(self, ctx: StageContext, config: DPOConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        train = dataset_from(ctx, inputs["dataset"]).train
        backend = ctx.backend
        policy = backend.new_policy(ctx.seed if config.seed is None else config.seed)
        stats = backend.fit(policy, train, np.ones(len(train)), warm=False, desc=ctx.stage_name)
        path = ctx.out_dir / "policy"
        backend.save(policy, path)
        return {"policies": {ctx.stage_name: rel_path(ctx, path)}, "fit": stats}
