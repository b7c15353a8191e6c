"""Strict pydantic base for every config schema (recipes, stages, backends, builders), and the one
formatter of their validation errors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a recipe must not be silently ignored. NaN and
    infinities are refused where a float is expected (`.nan`/`.inf` in YAML)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


_TYPE_NAMES = {
    "int": "int", "float": "float", "bool": "bool", "string": "str", "str": "str",
    "list": "list", "tuple": "list", "set": "list", "dict": "mapping", "model": "mapping",
    "bytes": "bytes", "none": "null", "decimal": "number", "date": "date", "datetime": "datetime",
}


def format_validation_error(
    exc: ValidationError,
    prefix: str = "",
    *,
    model: type[BaseModel] | None = None,
    stage_names: list[Any] | None = None,
    whole: str = "recipe",
    config_keys: bool = False,
) -> str:
    """Pydantic errors -> `prefix.dotted.key: reason[; ...]` on one line, for every config the user writes.

    `whole` names an error of the document itself (no key). With `config_keys` each key reads
    `config key 'a.b'` instead: builder configs, whose keys are what the user passes to `--set`.
    """
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        if stage_names and len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
            name = stage_names[loc[1]] if loc[1] < len(stage_names) else None
            loc[1] = name if isinstance(name, str) and name else f"[{loc[1]}]"
        dotted = ".".join(str(p) for p in loc).replace(".[", "[")
        if config_keys:
            key = f"config key '{dotted or '(top level)'}'"
        else:
            key = ".".join(p for p in (prefix, dotted) if p) or whole
        lines.append(f"{key}: {_describe(err, model if len(loc) == 1 else None)}")
    return "; ".join(lines)


def _describe(err: dict[str, Any], model: type[BaseModel] | None) -> str:
    kind: str = err["type"]
    got = _short(err.get("input"))
    if kind == "extra_forbidden":
        if model is not None:
            return f"unknown key (fields: {', '.join(model.model_fields) or 'none'})"
        return "unknown key"
    if kind == "missing":
        return "required key missing"
    if kind == "int_from_float":
        return f"expected int, got {got}"
    base, _, suffix = kind.rpartition("_")
    if suffix in ("type", "parsing") and base in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[base]}, got {got}"
    if kind == "literal_error":
        return f"expected one of {err.get('ctx', {}).get('expected', '?')}, got {got}"
    msg = str(err.get("msg", kind)).replace("\n", " ")
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    if msg.startswith("Input should be "):
        return f"expected {msg[len('Input should be '):]}, got {got}"
    return f"{msg[:1].lower()}{msg[1:]}, got {got}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
