"""Which done stages a `--resume` may reuse: those whose key still matches, and only those.

A stage's key (`stage_hash`) is the fingerprint of everything that produced its result: its
trainer and config, the run-wide seed, model and data sections, what it reads from outside the
run (`Trainer.source_identity`: a data file's bytes) and the output fingerprints of the stages
it depends on (`upstream_of`). Output fingerprints fold in their own stage's key, so a change
anywhere propagates down the dependency graph: exactly the stages downstream of a change re-run,
and a stage whose inputs were re-run never keeps its old result, even when its config is equal.
"""

from __future__ import annotations

from typing import Any

from ..fingerprint import output_fingerprint
from .schema import Plan, PlannedStage
from .state import RunState, config_hash


def model_stage_refs(section: Any) -> list[str]:
    """Stage names a model section loads as `stage:NAME` (e.g. `pretrain: stage:sft`)."""
    if isinstance(section, str):
        return [section.removeprefix("stage:")] if section.startswith("stage:") else []
    values = section.values() if isinstance(section, dict) else section if isinstance(section, list) else ()
    return [ref for v in values for ref in model_stage_refs(v)]


def upstream_of(plan: Plan, stage: PlannedStage) -> list[str]:
    """The stages `stage` depends on: its declared inputs, and any earlier stage the model section
    names (`stage:sft`): every stage shares the backend that loads that model."""
    order = [ps.spec.name for ps in plan.stages]
    earlier = set(order[: order.index(stage.spec.name)])
    names = list(dict.fromkeys(stage.spec.inputs.values()))
    names += [r for r in model_stage_refs(plan.recipe.get("model") or {}) if r in earlier and r not in names]
    return list(dict.fromkeys(names))


def source_identity(stage: PlannedStage, recipe: dict[str, Any]) -> Any:
    """What the stage reads from outside the run (None: nothing), from its trainer."""
    hook = getattr(stage.trainer, "source_identity", None)
    return hook(stage.config, recipe) if hook is not None else None


def stage_hash(plan: Plan, stage: PlannedStage, upstream: dict[str, str | None] | None = None,
               source: Any = None) -> str:
    """What decides whether a done stage can be reused: its trainer, config (with defaults) and
    inputs, the run-wide settings every stage depends on (seed, model, data), the identity of
    what it reads from outside the run, and the fingerprints of the stages it depends on."""
    payload: dict[str, Any] = {
        "trainer": stage.spec.trainer,
        "config": stage.config.model_dump(mode="json"),
        "inputs": stage.spec.inputs,
        "seed": plan.seed,
        "model": plan.recipe.get("model") or {},
        "data": plan.recipe.get("data") or {},
    }
    if upstream:  # absent for a stage with no inputs, so its key is the one earlier versions wrote
        payload["upstream"] = dict(sorted(upstream.items()))
    if source is not None:
        payload["source"] = source
    return config_hash(payload)


def reusable_stages(plan: Plan, previous: RunState, sources: dict[str, Any]) -> set[str]:
    """Done stages of `previous` whose key, computed with their inputs' recorded fingerprints, is
    unchanged and whose inputs are all reused too (an input that re-runs gets a new fingerprint)."""
    reuse: set[str] = set()
    fingerprints: dict[str, str | None] = {}
    for ps in plan.stages:
        name, deps = ps.spec.name, upstream_of(plan, ps)
        if any(d not in reuse for d in deps):
            continue
        old = previous.stages.get(name) or {}
        key = stage_hash(plan, ps, {d: fingerprints[d] for d in deps}, sources.get(name))
        fingerprint = output_fingerprint(old)
        if fingerprint is not None and old.get("config_hash") == key:
            reuse.add(name)
            fingerprints[name] = fingerprint
    return reuse
