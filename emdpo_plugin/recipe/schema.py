"""Recipe schema and plan validation: every mistake is found before any stage runs.

`validate_recipe` resolves each stage's trainer through the registry, validates its config
with the trainer's own pydantic `Config`, and checks the stage graph (inputs name earlier
stages), so `--dry-run` and a real run fail on exactly the same things.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from .. import registry
from ..artifacts import as_slot
from ..config import format_validation_error
from ..errors import EmdpoError, RecipeError
from ..executors import ExecutorConfig
from ..tracking import LoggerConfig
from ..trainers.base import StageConfig

STAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# folders of the run folder that are not stage folders (the runner empties a stage's folder)
RESERVED_NAMES = {"cache": "reference log-prob cache (cache/)"}


class StageSpec(BaseModel):
    """One recipe stage as written: `trainer` is a registered name or `module:Class`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="stage name: its folder in the run folder; inputs and --set refer to it")
    trainer: str = Field(description="a registered trainer type or module:Class")
    inputs: dict[str, str] = Field({}, description="input slot -> an earlier stage's name")
    config: dict[str, Any] = Field({}, description="the trainer's config; unknown keys are errors")


class Recipe(BaseModel):
    """A resolved recipe (after `extends` and `--set`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="recipe name: recorded in run.json, the report's title and the tracker's run name")
    seed: StrictInt = Field(0, description=(
        "the run's seed: data, initialisation and sampling of every stage without its own seed; --seeds replaces it"))
    output_dir: str | None = Field(None, description="run folder; --output-dir overrides it")
    model: dict[str, Any] = Field({}, description=(
        "the policy backend (backend: bandit | openrlhf, default bandit) and its config, checked by that backend"))
    data: dict[str, Any] = Field({}, description="the data stage's config: builder + config, or path + keys")
    executor: ExecutorConfig = Field(ExecutorConfig(), description="where the K type fits run: this process or Ray")
    logger: LoggerConfig = Field(LoggerConfig(), description="TensorBoard / wandb tracking (OpenRLHF's logger keys); off by default")
    stages: list[StageSpec] = Field(description="the stages in the order they run")


class PlannedStage(NamedTuple):
    spec: StageSpec
    trainer: type  # the Trainer subclass
    config: StageConfig


@dataclass
class Plan:
    """A validated recipe: the resolved dict plus each stage's trainer class and config."""

    recipe: dict[str, Any]
    stages: list[PlannedStage] = field(default_factory=list)
    source: str | None = None  # the recipe file, recorded in run.json
    typed: Recipe | None = None  # the validated model of `recipe`

    @property
    def name(self) -> str:
        return self.recipe["name"]

    @property
    def seed(self) -> int:
        return self.recipe.get("seed", 0)

    @property
    def executor(self) -> ExecutorConfig:
        if self.typed is not None:
            return self.typed.executor
        return ExecutorConfig.model_validate(self.recipe.get("executor") or {})


def validate_recipe(raw: dict[str, Any], *, source: str | None = None) -> Plan:
    """Validate a loaded recipe into a `Plan`; raises `RecipeError` (one line) on the first problem.

    `source` (the recipe path) prefixes error messages and is recorded in the plan.
    """
    try:
        return _validate(raw, source)
    except RecipeError as exc:
        if source is None:
            raise
        raise RecipeError(f"{source}: {exc}") from None


def _validate(raw: dict[str, Any], source: str | None) -> Plan:
    if not isinstance(raw, dict):
        raise RecipeError(f"expected a recipe mapping, got {type(raw).__name__}")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, "", stage_names=_stage_names(raw))) from None
    if not recipe.stages:
        raise RecipeError("stages: the recipe has no stages")

    _check_backend(recipe.model)
    planned: list[PlannedStage] = []
    seen: list[str] = []
    for spec in recipe.stages:
        where = f"stages.{spec.name}"
        if not STAGE_NAME.match(spec.name):
            raise RecipeError(
                f"{where}.name: {spec.name!r} is not a valid stage name (letters, digits, _ and -, not starting with a digit)"
            )
        if spec.name in seen:
            raise RecipeError(f"{where}: duplicate stage name")
        if spec.name in RESERVED_NAMES:
            raise RecipeError(f"{where}.name: {spec.name!r} is reserved for the run folder's {RESERVED_NAMES[spec.name]}")
        trainer = load_trainer(spec.trainer, where=f"{where}.trainer")
        try:
            config = trainer.Config.model_validate(spec.config)
        except ValidationError as exc:
            raise RecipeError(format_validation_error(exc, f"{where}.config", model=trainer.Config)) from None
        _check_inputs(spec, trainer, {ps.spec.name: ps.trainer for ps in planned}, [s.name for s in recipe.stages])
        if getattr(trainer, "name", None) == "data":
            _check_data(spec, config, recipe.data)
        planned.append(PlannedStage(spec, trainer, config))
        seen.append(spec.name)
    return Plan(recipe=raw, stages=planned, source=source, typed=recipe)


def format_plan(plan: Plan, output_dir: str | None) -> str:
    """The plan as YAML: every stage with its trainer, inputs and full config (defaults included)."""
    doc = {
        "recipe": plan.name,
        "source": plan.source,
        "seed": plan.seed,
        "output_dir": output_dir,
        "model": plan.recipe.get("model") or {},
        "data": plan.recipe.get("data") or {},
        "stages": [
            {
                "name": ps.spec.name,
                "trainer": ps.spec.trainer,
                "inputs": dict(ps.spec.inputs),
                "config": ps.config.model_dump(mode="json"),
            }
            for ps in plan.stages
        ],
    }
    header = f"# dry run: {len(plan.stages)} stage(s) validated; nothing was run or written"
    return header + "\n" + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).rstrip()


def load_trainer(ref: str, *, where: str = "") -> type:
    """The trainer class for a registered name or `module:Class`, as a one-line RecipeError if not.

    `where` (e.g. `stages.em.trainer`) prefixes the message.
    """
    prefix = f"{where}: " if where else ""
    obj = _load_plugin(registry.TRAINERS, ref, "trainer", prefix)
    cfg = getattr(obj, "Config", None)
    if not (isinstance(obj, type) and callable(getattr(obj, "run", None))
            and isinstance(cfg, type) and issubclass(cfg, BaseModel)):
        raise RecipeError(f"{prefix}{ref!r} is not a trainer (needs a `Config` pydantic model and `run`)")
    return obj


def _load_plugin(group: str, ref: str, what: str, prefix: str) -> Any:
    """A registered name or `module:attr` from an entry-point group, as a one-line RecipeError if not."""
    try:
        return registry.get(group, ref)
    except EmdpoError as exc:
        raise RecipeError(f"{prefix}{exc}") from None
    except Exception as exc:  # a broken plugin: say which, without a traceback
        raise RecipeError(f"{prefix}cannot load {what} {ref!r}: {type(exc).__name__}: {exc}") from None


def _check_backend(model: dict[str, Any]) -> None:
    """Name and config check: the backend itself is built lazily, when a stage first needs it.

    A backend class may declare its pydantic `Config`; the `model` section (less `backend`)
    is validated against it here, so a typo fails at --dry-run, not an hour into a run."""
    backend = model.get("backend", "bandit")
    if not isinstance(backend, str) or not backend:
        raise RecipeError(f"model.backend: expected a backend name, got {backend!r}")
    if ":" not in backend and backend not in registry.names(registry.POLICY_BACKENDS):
        known = ", ".join(registry.names(registry.POLICY_BACKENDS)) or "none"
        raise RecipeError(f"model.backend: unknown policy backend {backend!r} (registered: {known})")
    config_model = getattr(registry.get(registry.POLICY_BACKENDS, backend), "Config", None)
    if config_model is not None:
        try:
            config_model.model_validate({k: v for k, v in model.items() if k != "backend"})
        except ValidationError as exc:
            raise RecipeError(format_validation_error(exc, "model", model=config_model)) from None


def _check_inputs(spec: StageSpec, trainer: type, earlier: dict[str, type], all_names: list[str]) -> None:
    """Every input names an earlier stage whose trainer produces an artifact kind the slot takes."""
    slots = {name: as_slot(slot) for name, slot in (getattr(trainer, "input_slots", {}) or {}).items()}
    required = tuple(getattr(trainer, "required_inputs", ()) or ())
    where = f"stages.{spec.name}.inputs"
    for slot, source in spec.inputs.items():
        if slot not in slots and "*" not in slots:  # "*": the trainer takes any slot name
            have = f"slots: {', '.join(slots)}" if slots else "this trainer takes no inputs"
            raise RecipeError(f"{where}.{slot}: unknown input slot ({have})")
        if source not in earlier:
            if source == spec.name:
                why = "a stage cannot take its own outputs"
            elif source in all_names:
                why = f"stage {source!r} runs later"
            else:
                why = f"stages: {', '.join(all_names)}"
            raise RecipeError(f"{where}.{slot}: no earlier stage named {source!r} ({why})")
        wanted = slots.get(slot, slots.get("*")).kinds
        produced = tuple(getattr(earlier[source], "produces", ()) or ())
        if wanted and produced and not set(wanted) & set(produced):  # undeclared (plugin) kinds: not checked
            raise RecipeError(f"{where}.{slot}: expects a {' or '.join(wanted)} artifact; stage {source!r} "
                              f"({earlier[source].name}) produces {', '.join(produced)}")
    for slot in required:
        if slot not in spec.inputs:
            what = f" ({slots[slot].describe()})" if slot in slots else ""
            raise RecipeError(f"{where}.{slot}: required input missing{what}")


def _check_data(spec: StageSpec, config: StageConfig, data: dict[str, Any]) -> None:
    """The recipe's `data` section, validated by the data stage's own model (so `data.keys` and
    every other key are checked), and the builder config by the builder's pydantic model (a
    builder function's `Config` attribute), at plan time: a typo fails `--dry-run`."""
    merged = {**data, **config.model_dump(exclude_unset=True)}
    try:
        type(config).model_validate(merged)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, "data", model=type(config))) from None
    builder, cfg = merged.get("builder"), merged.get("config") or {}
    if not builder:
        return
    prefix = "data" if "builder" in data and "builder" not in spec.config else f"stages.{spec.name}.config"
    build = _load_plugin(registry.DATA_BUILDERS, builder, "data builder", f"{prefix}.builder: ")
    config_model = getattr(build, "Config", None)
    if isinstance(config_model, type) and issubclass(config_model, BaseModel):
        where = "data.config" if "config" in data and "config" not in spec.config else f"stages.{spec.name}.config.config"
        try:
            config_model.model_validate(cfg)
        except ValidationError as exc:
            raise RecipeError(format_validation_error(exc, where, model=config_model)) from None


def _stage_names(raw: Any) -> list[Any]:
    stages = raw.get("stages") if isinstance(raw, dict) else None
    if not isinstance(stages, list):
        return []
    return [s.get("name") if isinstance(s, dict) else None for s in stages]
