"""The run's PolicyBackend from a recipe: shared by the runner, Ray workers and re-evaluation.

It lives here, below the runner, so that the executors and evaluation that need a backend do not
import the recipe runner (which imports them).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .. import registry
from ..errors import EmdpoError, RecipeError


def default_backend_factory(recipe: dict[str, Any], run_dir: Path) -> Any:
    """Build the PolicyBackend named by `model.backend` (default 'bandit') from the `model` section.

    Backends get the run directory for their caches and to resolve `stage:NAME` model paths.
    """
    model = dict(recipe.get("model") or {})
    name = model.pop("backend", "bandit")
    try:
        cls = registry.get(registry.POLICY_BACKENDS, name)
    except EmdpoError as exc:
        raise RecipeError(f"model.backend: {exc}") from None
    return cls(copy.deepcopy(model), seed=recipe.get("seed", 0), run_dir=run_dir)
