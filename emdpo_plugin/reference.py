"""The config reference: every key a recipe may set, with its type, default and description.

`openrlhf trainers` prints it as text and `openrlhf trainers --markdown` as Markdown;
docs/recipes.md is the Markdown output (tests/test_docs.py checks that it is current). Nested
pydantic models are expanded with dotted keys (`train.lr`, `stages[].name`, `identifiability.<name>.em`).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from . import registry
from .artifacts import as_slot
from .errors import EmdpoError

REGENERATE = "openrlhf trainers --markdown > docs/recipes.md"


@dataclass(frozen=True)
class FieldRow:
    """One config key: `default` is None for a required key and "" for a section whose keys follow."""

    key: str
    type: str
    default: str | None
    description: str


def type_name(tp: Any) -> str:
    """A short, stable spelling of a type annotation (`int | None`, `'hf' | 'vllm'`, `list[int]`)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is None:
        if tp is type(None):
            return "None"
        if isinstance(tp, type):
            return tp.__name__
        return str(tp).replace("typing.", "")
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"


def _nested(tp: Any) -> tuple[type[BaseModel] | None, str]:
    """The pydantic model inside an annotation and the key suffix its fields hang under."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp, "."
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        found = [m for m in (_nested(a) for a in args if a is not type(None)) if m[0] is not None]
        return found[0] if len(found) == 1 else (None, "")
    if origin in (list, tuple, set) and args:
        model, suffix = _nested(args[0])
        return (model, "[]" + suffix) if model is not None else (None, "")
    if origin is dict and len(args) == 2:
        model, suffix = _nested(args[1])
        return (model, ".<name>" + suffix) if model is not None else (None, "")
    return None, ""


def _default(info: FieldInfo) -> str | None:
    if info.is_required():
        return None
    value = info.get_default(call_default_factory=True)
    return "" if isinstance(value, BaseModel) else repr(value)


def field_rows(model: type[BaseModel], prefix: str = "") -> list[FieldRow]:
    """Every field of `model`, recursively: a nested model's fields follow its own row."""
    rows: list[FieldRow] = []
    for name, info in model.model_fields.items():
        key = prefix + name
        inner, suffix = _nested(info.annotation)
        rows.append(FieldRow(key, type_name(info.annotation), _default(info), (info.description or "").strip()))
        if inner is not None:
            rows.extend(field_rows(inner, key + suffix))
    return rows


# --- what is described --------------------------------------------------------------------


def recipe_model() -> type[BaseModel]:
    from .recipe.schema import Recipe

    return Recipe


def backend_configs() -> dict[str, type[BaseModel] | str]:
    """Registered backend name -> its `Config` model, or why it cannot be described."""
    out: dict[str, type[BaseModel] | str] = {}
    for name in registry.names(registry.POLICY_BACKENDS):
        try:
            backend = registry.get(registry.POLICY_BACKENDS, name)
        except Exception as exc:  # a broken plugin is listed, not fatal
            out[name] = f"cannot load: {exc}"
            continue
        cfg = getattr(backend, "Config", None)
        out[name] = cfg if isinstance(cfg, type) and issubclass(cfg, BaseModel) else "no Config model declared"
    return out


def load_trainers(names: list[str] | None = None) -> dict[str, type | str]:
    """Trainer name -> class, or why it cannot be loaded; named trainers that fail raise."""
    from .recipe.schema import load_trainer

    out: dict[str, type | str] = {}
    for name in names or registry.names(registry.TRAINERS):
        try:
            out[name] = load_trainer(name)
        except EmdpoError as exc:
            if names:  # asked for by name: a real error
                raise
            out[name] = f"cannot load: {exc}"
    return out


def _inputs(trainer: type) -> list[tuple[str, bool, str]]:
    slots = dict(getattr(trainer, "input_slots", {}) or {})
    required = set(getattr(trainer, "required_inputs", ()) or ())
    return [(slot, slot in required, as_slot(what).describe()) for slot, what in slots.items()]


# --- text ----------------------------------------------------------------------------------


def _text_rows(rows: list[FieldRow], indent: str = "    ") -> list[str]:
    lines = []
    for r in rows:
        default = " required" if r.default is None else (f" = {r.default}" if r.default else "")
        desc = f"  # {r.description}" if r.description else ""
        lines.append(f"{indent}{r.key}: {r.type}{default}{desc}")
    return lines


def describe_trainer(name: str, trainer: type) -> str:
    """Plain text: a trainer's inputs, what it produces and every config field with type and default."""
    lines = [f"{name}  {(getattr(trainer, 'description', '') or '').strip()}".rstrip()]
    inputs = _inputs(trainer)
    lines.append("  inputs:" if inputs else "  inputs: none")
    lines += [f"    {slot} ({'required' if req else 'optional'}): {what}" for slot, req, what in inputs]
    produces = tuple(getattr(trainer, "produces", ()) or ())
    lines.append(f"  produces: {', '.join(produces) if produces else 'undeclared'}")
    rows = field_rows(trainer.Config)
    lines += ["  config:", *_text_rows(rows)] if rows else ["  config: none"]
    return "\n".join(lines)


def text_reference(names: list[str] | None = None) -> str:
    """`openrlhf trainers`: the recipe's top level and `model:` sections (all trainers only), then trainers."""
    blocks = []
    if not names:
        blocks.append("\n".join(["recipe (top level; `extends: FILE` merges another recipe first)",
                                 *_text_rows(field_rows(recipe_model()), "  ")]))
        for backend, cfg in backend_configs().items():
            head = f"model: (backend: {backend})"
            body = _text_rows(field_rows(cfg), "  ") if not isinstance(cfg, str) else [f"  ({cfg})"]
            blocks.append("\n".join([head, *body]))
    trainers = load_trainers(names)
    if not names:
        blocks.append("trainers (stages[].trainer; a stage's config: takes its trainer's keys)"
                      if trainers else "no trainers registered")
    for name, trainer in trainers.items():
        blocks.append(f"{name}\n  ({trainer})" if isinstance(trainer, str) else describe_trainer(name, trainer))
    return "\n\n".join(blocks)


# --- Markdown ------------------------------------------------------------------------------


def _cell(text: str, code: bool = True) -> str:
    """Table-cell text: pipes escaped; outside code spans `<` too (it would start an HTML tag)."""
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if code else text.replace("<", "&lt;")


def _md_table(rows: list[FieldRow]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for r in rows:
        default = "required" if r.default is None else (f"`{r.default}`" if r.default else "")
        lines.append(f"| `{_cell(r.key)}` | `{_cell(r.type)}` | {_cell(default)} | {_cell(r.description, code=False)} |")
    return lines


def markdown_reference(names: list[str] | None = None) -> str:
    """`openrlhf trainers --markdown`: the same reference as Markdown (docs/recipes.md)."""
    out: list[str] = []
    if not names:
        out += [
            "# Recipe reference",
            "",
            "<!-- Generated from the pydantic config models; do not edit. Change a field's description, then run:",
            f"     {REGENERATE} -->",
            "",
            "Every key a recipe may set: its type, its default and what it means. How recipes are written,",
            "`extends`, `--set` and resuming: [recipes-guide.md](recipes-guide.md). Unknown keys are errors",
            "everywhere; `openrlhf run RECIPE --dry-run` checks a recipe against all of this.",
            "",
            "## Recipe top level",
            "",
            "`extends: FILE` (optional) merges another recipe first: mappings deep-merge, stages merge by name.",
            "",
            *_md_table(field_rows(recipe_model())),
            "",
            "## `model:` section",
            "",
            "`backend` names the policy backend (default `bandit`); the other keys are that backend's config.",
        ]
        for backend, cfg in backend_configs().items():
            out += ["", f"### `backend: {backend}`", ""]
            out += [f"({cfg})"] if isinstance(cfg, str) else _md_table(field_rows(cfg))
        out += ["", "## Trainers (`stages[].trainer`)", ""]
        out += ["A stage's `config:` takes the keys of its trainer; `inputs:` maps the trainer's input slots to "
                "earlier stages."]
    for name, trainer in load_trainers(names).items():
        out += ["", f"### `{name}`", ""]
        if isinstance(trainer, str):
            out.append(f"({trainer})")
            continue
        description = (getattr(trainer, "description", "") or "").strip()
        if description:
            out += [description, ""]
        inputs = _inputs(trainer)
        if inputs:
            out.append("Inputs:")
            out += [f"- `{slot}` ({'required' if req else 'optional'}): {what}" for slot, req, what in inputs]
        else:
            out.append("Inputs: none.")
        produces = tuple(getattr(trainer, "produces", ()) or ())
        out += ["", f"Produces: {', '.join(f'`{p}`' for p in produces) if produces else 'undeclared'}.", ""]
        rows = field_rows(trainer.Config)
        out += _md_table(rows) if rows else ["Config: none."]
    return "\n".join(out).strip() + "\n"
