"""Strict pydantic base for every config schema (recipes, stages, backends, builders)."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a recipe must not be silently ignored. NaN and
    infinities are refused where a float is expected (`.nan`/`.inf` in YAML)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
