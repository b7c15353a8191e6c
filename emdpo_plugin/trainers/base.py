"""The stage contract every trainer type implements (built-in or from a plugin).

A recipe stage `{name, trainer, inputs, config}` becomes `Trainer().run(ctx, config, inputs)`:
`config` is an instance of the trainer's pydantic `Config` (unknown keys rejected), `inputs`
maps each input slot to the outputs an earlier stage recorded in run.json. `run` writes its
files under `ctx.out_dir` and returns a JSON-serialisable dict, recorded as the stage's outputs;
the stage counts as done (and its files as readable) only once those outputs are recorded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from ..artifacts import Slot
from ..config import StrictModel


class StageConfig(StrictModel):
    """Base for per-trainer config schemas: unknown keys are errors, not silently ignored."""


def seed_field(what: str) -> Any:
    """A stage's optional `seed` field; unset means the recipe's seed."""
    return Field(None, description=f"seed of {what} (default: the recipe's seed)")


@dataclass
class StageContext:
    """What a stage may use besides its config and inputs."""

    run_dir: Path
    stage_name: str
    seed: int
    recipe: dict[str, Any]  # the fully resolved recipe (after extends and --set)
    # the stage's key (recipe.reuse.stage_hash: config, seed, model, data, its inputs' fingerprints);
    # a trainer keys what it reads back on resume by it, so a changed upstream never reuses it
    key: str = ""
    _backend: Any = field(default=None, repr=False)
    _backend_factory: Any = field(default=None, repr=False)
    _executor: Any = field(default=None, repr=False)
    _executor_factory: Any = field(default=None, repr=False)
    _datasets: dict[str, Any] = field(default_factory=dict, repr=False)  # run-wide cache: folder -> DatasetDir

    @property
    def out_dir(self) -> Path:
        path = self.run_dir / self.stage_name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def backend(self):
        """The run's PolicyBackend, created once from the recipe's `model` section."""
        if self._backend is None:
            self._backend = self._backend_factory()
        return self._backend

    @property
    def executor(self):
        """Where K type fits run (recipe `executor:`): in this process, or side by side on Ray."""
        if self._executor is None:
            if self._executor_factory is None:
                from ..executors import LocalExecutor

                self._executor = LocalExecutor()
            else:
                self._executor = self._executor_factory()
        return self._executor


class Trainer(ABC):
    """A trainer type. Subclasses set `name`, `Config`, `input_slots`, `produces` and implement `run`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Config: ClassVar[type[StageConfig]] = StageConfig
    # input slot -> the artifact kinds it takes (a bare string: any kind); recipe `inputs` keys
    # must be among these ("*": any other name)
    input_slots: ClassVar[dict[str, Slot | str]] = {}
    required_inputs: ClassVar[tuple[str, ...]] = ()
    # the artifact kinds (emdpo_plugin.artifacts.KINDS) its outputs carry; checked by the runner
    produces: ClassVar[tuple[str, ...]] = ()
    # entries of its folder the trainer reads back to resume after a kill (each written
    # atomically and checked by the trainer); the runner empties the rest of the folder before
    # a stage that is not done runs again (emdpo_plugin.recipe.stage_dir)
    resume_state: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def source_identity(cls, config: StageConfig, recipe: dict[str, Any]) -> Any:
        """What the stage reads from outside the run (e.g. a data file's content hash), JSON-able:
        it enters the stage's key, so a resume re-runs the stage when it changed. None: nothing."""
        return None

    @abstractmethod
    def run(self, ctx: StageContext, config: StageConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Run the stage; return its outputs (JSON-serialisable)."""
