"""Where the K type fits of a stage run: in this process (`local`) or side by side on Ray (`ray`)."""

from typing import Any

from .base import Executor, ExecutorConfig, FitJob, LocalExecutor, loglik_rows

__all__ = ["Executor", "ExecutorConfig", "FitJob", "LocalExecutor", "loglik_rows", "make_executor"]


def make_executor(config: ExecutorConfig, recipe: dict[str, Any], run_dir: Any) -> Executor:
    """The executor a recipe asks for (Ray is imported only when used).

    Here rather than in `base`, which `ray_executor` imports: the factory sits above both."""
    if config.kind == "local":
        return LocalExecutor()
    from .ray_executor import RayExecutor

    return RayExecutor(config, recipe, run_dir)
