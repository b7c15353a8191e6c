"""Experiment tracking: one TensorBoard / wandb run per recipe run, stages as namespaces.

OpenRLHF's trainer logs to wandb or TensorBoard itself, but it opens one run per trainer, and an
EM stage builds K trainers per iteration. Here the recipe's `logger:` section (OpenRLHF's own
keys: `tensorboard_dir`, `wandb.{key, org, project, group, run_name}`) opens one tracker for the
whole run, on the driver rank only; the host trainer's per-step logging is pointed at it
(`host_writer`, installed by `backends/weighted_dpo.py`), so M-step losses and learning rates
land under `<stage>/train/...` on one continuous step axis per stage. Stages log their own
series through `scalars` (`em/log_likelihood` per iteration, `minmax/weight_0`, ...) and tables
through `table`. `WANDB_MODE=offline` is respected (wandb reads it itself).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field

from .config import StrictModel
from .errors import EmdpoError


class WandbConfig(StrictModel):
    key: str | None = Field(None, description="API key (else WANDB_API_KEY or a prior `wandb login`)")
    org: str | None = Field(None, description="wandb entity (team or user)")
    project: str = Field("openrlhf_emdpo", description="wandb project")
    group: str | None = Field(None, description="wandb group, e.g. one per sweep or per --seeds run")
    run_name: str | None = Field(None, description="run name (default: the recipe name and run folder)")


class LoggerConfig(StrictModel):
    """The recipe's `logger:` section, named as OpenRLHF's `--logger.*` options."""

    tensorboard_dir: str | None = Field(None, description="write TensorBoard event files under DIR/<run name>")
    wandb: WandbConfig | None = Field(None, description="log to Weights & Biases")

    @property
    def enabled(self) -> bool:
        return bool(self.tensorboard_dir or self.wandb)


class Tracker:
    """Scalars and tables of one run, fanned out to TensorBoard and/or wandb."""

    def __init__(self, cfg: LoggerConfig, *, run_name: str, config: dict[str, Any], run_dir: Path) -> None:
        self.stage = "run"
        self._host_steps: dict[str, int] = {}
        self._tb = self._wandb = None
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(cfg.tensorboard_dir) / run_name))
        if cfg.wandb is not None:
            try:
                import wandb
            except ImportError:
                raise EmdpoError("logger.wandb: the wandb package is not installed "
                                 "(pip install 'emdpo-plugin[wandb]')") from None
            if cfg.wandb.key:
                os.environ.setdefault("WANDB_API_KEY", cfg.wandb.key)
            self._wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.org, group=cfg.wandb.group,
                                     name=cfg.wandb.run_name or run_name, config=config, dir=str(run_dir),
                                     reinit=True)

    def scalars(self, namespace: str, values: dict[str, float | None], step: int) -> None:
        """`namespace/key` = value at `step`; None values are skipped."""
        values = {f"{namespace}/{k}": float(v) for k, v in values.items() if v is not None}
        if self._tb is not None:
            for tag, v in values.items():
                self._tb.add_scalar(tag, v, step)
        if self._wandb is not None:
            self._wandb.log({**values, f"{namespace}/step": step})

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A small table (e.g. the report's per-group metrics): markdown text in TensorBoard, a
        wandb.Table in wandb."""
        if self._tb is not None:
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
            self._tb.add_text(name, "\n".join(lines), 0)
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Table(columns=columns, data=rows)})

    def host_writer(self) -> "_HostWriter":
        """What the host trainer calls `_tensorboard`: its `train/<key>` scalars, re-stepped so
        every fit of the current stage continues one series."""
        return _HostWriter(self)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._tb = self._wandb = None


class _HostWriter:
    """Quacks like the SummaryWriter OpenRLHF's trainer writes to; `close` is the run's, not a fit's."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def add_scalar(self, tag: str, value: float, step: int | None = None) -> None:
        key = f"{self.tracker.stage}/{tag}"
        n = self.tracker._host_steps[key] = self.tracker._host_steps.get(key, 0) + 1
        namespace, _, name = key.rpartition("/")
        self.tracker.scalars(namespace, {name: value}, n)

    def close(self) -> None:
        pass


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_ACTIVE: Tracker | None = None


def active() -> Tracker | None:
    """The tracker of the run this process drives (None: tracking off, or not the driver)."""
    return _ACTIVE


def set_active(tracker: Tracker | None) -> None:
    global _ACTIVE
    _ACTIVE = tracker
