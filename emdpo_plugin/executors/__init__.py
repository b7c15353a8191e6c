"""Where the K type fits of a stage run: in this process (`local`) or side by side on Ray (`ray`)."""

from .base import Executor, ExecutorConfig, FitJob, LocalExecutor, loglik_rows, make_executor

__all__ = ["Executor", "ExecutorConfig", "FitJob", "LocalExecutor", "loglik_rows", "make_executor"]
