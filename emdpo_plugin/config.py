"""Strict pydantic base for every config schema (recipes, stages, backends, builders)."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a recipe must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")
