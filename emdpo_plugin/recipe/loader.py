"""Recipe files: YAML (safe_load only), `extends:` inheritance and `--set a.b=c` overrides.

The loader only resolves structure; `schema.validate_recipe` checks trainers and configs.
Errors name the file and the dotted key, on one line, so a user can fix them without a traceback.
YAML is read with `safe_yaml` (bounded size, depth and alias expansion). `extends` may only
name files in the recipe's own folder tree unless outside files are allowed explicitly
(`--allow-extends-outside`, or EMDPO_ALLOW_EXTENDS_OUTSIDE=1).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import RecipeError
from ..safe_yaml import load_yaml, read_yaml
from .schema import Recipe

TOP_LEVEL_KEYS = ("extends", *Recipe.model_fields)  # the schema decides; `extends` is resolved here
STAGE_KEYS = ("name", "trainer", "inputs", "config", "drop")
# Where `--set` may create missing intermediate mappings (the schema validates them after).
_OPEN_SECTIONS = ("config", "model", "data", "logger")
ALLOW_OUTSIDE_ENV = "EMDPO_ALLOW_EXTENDS_OUTSIDE"


def extends_outside_allowed(flag: bool | None = None) -> bool:
    """`flag` if given, else whether EMDPO_ALLOW_EXTENDS_OUTSIDE is set to 1/true/yes."""
    if flag is not None:
        return flag
    return os.environ.get(ALLOW_OUTSIDE_ENV, "").strip().lower() in ("1", "true", "yes")


def load_recipe(path: str | Path, overrides: Iterable[str] = (), *,
                allow_extends_outside: bool | None = None) -> dict[str, Any]:
    """Load `path`, resolve its `extends` chain, fill defaults and apply `--set` overrides.

    Returns a plain dict with exactly the keys name, seed, output_dir (if set), executor (if
    set), model, data, stages; each stage has name, trainer (if set), inputs and config.
    `allow_extends_outside` (default: the EMDPO_ALLOW_EXTENDS_OUTSIDE variable) lets `extends`
    name absolute paths and files outside the recipe's folder tree.
    """
    path = Path(path)
    root = None if extends_outside_allowed(allow_extends_outside) else path.parent.resolve()
    recipe = _load_chain(path, (), root)
    _fill_defaults(recipe, path)
    for override in overrides:
        _apply_override(recipe, override, path)
    _check_resolved(recipe, path)
    return recipe


# --- files and extends -------------------------------------------------------------------


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    where = f"{chain[-1]}: extends" if chain else None
    raw = read_yaml(path, RecipeError, what="recipe file", where=where)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level, got {_kind(raw)}")
    return raw


def _load_chain(path: Path, chain: tuple[Path, ...], root: Path | None) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise RecipeError(f"{path}: extends: cycle {cycle}")
    raw = _read_yaml(path, chain)
    _check_file(raw, path)
    parent_ref = raw.pop("extends", None)
    if parent_ref is None:
        return _merge_recipes({}, raw, path)
    parent = _load_chain(_extends_target(path, parent_ref, root), (*chain, resolved), root)
    return _merge_recipes(parent, raw, path)


def _extends_target(path: Path, ref: str, root: Path | None) -> Path:
    """`ref` relative to `path`'s folder; with a `root`, it must stay inside it (symlinks resolved)."""
    target = path.parent / ref
    if root is None:
        return target
    allow = f"pass --allow-extends-outside (or set {ALLOW_OUTSIDE_ENV}=1) to allow it"
    if Path(ref).is_absolute():
        raise RecipeError(f"{path}: extends: {ref!r} is an absolute path; {allow}")
    if not target.resolve().is_relative_to(root):
        raise RecipeError(f"{path}: extends: {ref!r} is outside the recipe's folder {root}; {allow}")
    return target


def _check_file(raw: dict[str, Any], path: Path) -> None:
    """Per-file checks, so the error names the file that is wrong."""
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise RecipeError(
                f"{path}: {key}: unknown top-level key (allowed: {', '.join(TOP_LEVEL_KEYS)})"
            )
    _expect(raw, "name", str, path)
    _expect(raw, "extends", str, path)
    _expect(raw, "output_dir", str, path)
    _expect(raw, "executor", dict, path)
    _expect(raw, "model", dict, path)
    _expect(raw, "data", dict, path)
    if "seed" in raw and (isinstance(raw["seed"], bool) or not isinstance(raw["seed"], int)):
        raise RecipeError(f"{path}: seed: expected int, got {raw['seed']!r}")
    stages = raw.get("stages", [])
    if not isinstance(stages, list):
        raise RecipeError(f"{path}: stages: expected a list of stages, got {_kind(stages)}")
    seen: set[str] = set()
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise RecipeError(f"{path}: stages[{i}]: expected a mapping, got {_kind(stage)}")
        name = stage.get("name")
        if not isinstance(name, str) or not name:
            raise RecipeError(f"{path}: stages[{i}].name: every stage needs a string name")
        if name in seen:
            raise RecipeError(f"{path}: stages.{name}: duplicate stage name")
        seen.add(name)
        for key in stage:
            if key not in STAGE_KEYS:
                raise RecipeError(
                    f"{path}: stages.{name}.{key}: unknown key (allowed: {', '.join(STAGE_KEYS[:-1])}, drop)"
                )
        for key, typ in (("trainer", str), ("inputs", dict), ("config", dict), ("drop", bool)):
            if key in stage and not isinstance(stage[key], typ):
                want = {str: "str", dict: "mapping", bool: "bool"}[typ]
                raise RecipeError(f"{path}: stages.{name}.{key}: expected {want}, got {stage[key]!r}")


def _expect(raw: dict[str, Any], key: str, typ: type, path: Path) -> None:
    if key in raw and not isinstance(raw[key], typ):
        want = "mapping" if typ is dict else typ.__name__
        raise RecipeError(f"{path}: {key}: expected {want}, got {raw[key]!r}")


def _merge_recipes(parent: dict[str, Any], child: dict[str, Any], path: Path) -> dict[str, Any]:
    """Deep-merge `child` into `parent`; stages merge by name (see `_merge_stages`)."""
    out = copy.deepcopy(parent)
    for key, value in child.items():
        if key == "stages":
            out["stages"] = _merge_stages(out.get("stages", []), value, path)
        else:
            out[key] = deep_merge(out.get(key), value)
    return out


def _merge_stages(parent: list[dict], child: list[dict], path: Path) -> list[dict]:
    """A child stage with a parent's name merges into it in place; `drop: true` removes it;
    new names are appended in the child's order."""
    out = [copy.deepcopy(s) for s in parent]
    index = {s["name"]: i for i, s in enumerate(out)}
    dropped: set[str] = set()
    for stage in child:
        stage = copy.deepcopy(stage)
        name = stage["name"]
        drop = stage.pop("drop", False)
        if drop:
            if name not in index:
                raise RecipeError(f"{path}: stages.{name}.drop: no parent stage named {name!r} to drop")
            dropped.add(name)
        elif name in index:
            out[index[name]] = deep_merge(out[index[name]], stage)
        else:
            index[name] = len(out)
            out.append(stage)
    return [s for s in out if s["name"] not in dropped]


def deep_merge(base: Any, override: Any) -> Any:
    """Mappings merge recursively (override wins); anything else is replaced by `override`."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for key, value in override.items():
            out[key] = deep_merge(out.get(key), value)
        return out
    return copy.deepcopy(override)


def _fill_defaults(recipe: dict[str, Any], path: Path) -> None:
    """Explicit defaults, so overrides like `stages.em.config.K=3` always have a parent."""
    recipe.setdefault("seed", 0)
    recipe.setdefault("model", {})
    recipe.setdefault("data", {})
    recipe.setdefault("executor", {})
    recipe.setdefault("logger", {})
    recipe.setdefault("stages", [])
    for stage in recipe["stages"]:
        stage.setdefault("inputs", {})
        stage.setdefault("config", {})
    items = {k: recipe[k] for k in Recipe.model_fields if k in recipe}
    recipe.clear()
    recipe.update(items)


def _check_resolved(recipe: dict[str, Any], path: Path) -> None:
    """Re-check types after overrides (they may have replaced whole sections)."""
    if "name" not in recipe:
        raise RecipeError(f"{path}: name: required (the recipe's name, recorded in run.json)")
    _check_file(recipe, path)
    for stage in recipe["stages"]:
        if "drop" in stage:
            raise RecipeError(f"{path}: stages.{stage['name']}.drop: cannot be set with --set")


# --- overrides ---------------------------------------------------------------------------


def parse_override(text: str, path: Path | str = "<recipe>") -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], load_yaml('c')); so `3`, `0.1`, `true`, `[1,4]` are typed."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"{path}: --set {text}: expected KEY=VALUE")
    parts = key.split(".")
    if any(not p for p in parts):
        raise RecipeError(f"{path}: --set {key}: empty segment in dotted key")
    if not value_text.strip():
        return parts, ""
    shown = value_text if len(value_text) <= 60 else value_text[:57] + "..."
    value = load_yaml(value_text, f"{path}: --set {key}: value {shown!r}", RecipeError)
    return parts, value


def _apply_override(recipe: dict[str, Any], text: str, path: Path) -> None:
    parts, value = parse_override(text, path)
    dotted = ".".join(parts)
    where = f"{path}: --set {dotted}"
    top = parts[0]
    if top not in TOP_LEVEL_KEYS or top == "extends":
        allowed = ", ".join(k for k in TOP_LEVEL_KEYS if k != "extends")
        raise RecipeError(f"{where}: unknown top-level key {top!r} (allowed: {allowed})")

    if top == "executor" and len(parts) > 1:  # an optional section: `--set executor.kind=ray` opens it
        recipe.setdefault("executor", {})
    if top == "stages" and len(parts) > 1:
        by_name = {s.get("name"): s for s in recipe["stages"] if isinstance(s, dict)}
        stage_name = parts[1]
        if stage_name not in by_name:
            known = ", ".join(str(n) for n in by_name) or "none"
            raise RecipeError(f"{where}: no stage named {stage_name!r} (stages: {known})")
        if len(parts) == 2:
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: a stage must be a mapping, got {value!r}")
            stage = by_name[stage_name]
            stage.clear()
            stage.update({"name": stage_name, "inputs": {}, "config": {}, **value})
            return
        if parts[2] not in STAGE_KEYS[:-1]:
            raise RecipeError(f"{where}: unknown stage key {parts[2]!r} (allowed: name, trainer, inputs, config)")
        container, rest, open_from = by_name[stage_name], parts[2:], 2
    else:
        container, rest, open_from = recipe, parts, 0

    # Missing intermediates may be created only below a free-form section (config/model/data).
    section = _open_section_index(parts, open_from)
    for depth, segment in enumerate(rest[:-1]):
        absolute = open_from + depth
        prefix = ".".join(parts[: absolute + 1])
        if segment not in container:
            if section is None or absolute <= section:
                raise RecipeError(f"{where}: {prefix!r} does not exist")
            container[segment] = {}
        nxt = container[segment]
        if not isinstance(nxt, dict):
            raise RecipeError(f"{where}: {prefix!r} is {_kind(nxt)}, not a mapping")
        container = nxt
    container[rest[-1]] = value


def _open_section_index(parts: list[str], open_from: int) -> int | None:
    """Index in `parts` of the free-form section the key lives in, None outside one."""
    if open_from == 2:  # stages.<name>.config...
        return 2 if parts[2] == "config" else None
    return 0 if parts[0] in ("model", "data", "logger") else None


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
