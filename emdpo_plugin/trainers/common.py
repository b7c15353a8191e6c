"""Helpers shared by stages: resolving earlier stages' outputs into datasets and policies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..data.io import DatasetDir, load_dataset_dir
from ..errors import RecipeError
from .base import StageContext


def run_path(ctx: StageContext, rel: str) -> Path:
    """Stage outputs record paths relative to the run directory, so runs can be moved."""
    return ctx.run_dir / rel


def rel_path(ctx: StageContext, path: Path) -> str:
    return str(path.relative_to(ctx.run_dir))


def stage_seed(ctx: StageContext, config: Any) -> int:
    """The stage config's `seed` when set, else the recipe's."""
    return ctx.seed if config.seed is None else config.seed


def dataset_from(ctx: StageContext, outputs: dict[str, Any], slot: str = "dataset") -> DatasetDir:
    """The dataset an earlier stage wrote, loaded (and its hashes checked) once per run.

    Stages only read it, so the stages of one run share one copy."""
    if "dir" not in outputs or "manifest" not in outputs:
        raise RecipeError(f"stages.{ctx.stage_name}.inputs.{slot}: that stage produced no dataset")
    path = run_path(ctx, outputs["dir"])
    key = str(path.resolve())
    if key not in ctx._datasets:
        ctx._datasets[key] = load_dataset_dir(path)
    return ctx._datasets[key]


def policies_from(ctx: StageContext, outputs: dict[str, Any], slot: str = "policies") -> dict[str, Any]:
    """Load every policy an earlier stage recorded, in its order: name -> policy object."""
    if not outputs.get("policies"):
        raise RecipeError(f"stages.{ctx.stage_name}.inputs.{slot}: that stage produced no policies")
    return {name: ctx.backend.load(run_path(ctx, rel)) for name, rel in outputs["policies"].items()}


def prompts_from(data, n: int, seed: int) -> list[str]:
    """n distinct prompts of a dataset split, drawn with a seed (all of them if fewer)."""
    distinct = sorted(set(data.prompts))
    rng = np.random.default_rng(seed)
    return [distinct[i] for i in sorted(rng.choice(len(distinct), size=min(n, len(distinct)), replace=False))]
