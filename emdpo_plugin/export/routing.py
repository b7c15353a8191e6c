"""Routing config `emdpo-routing/v1`: base model, adapters and mixture weights, for serving.

The ensemble is the sequence-level mixture `sum_k w_k pi_k`: per request, adapter k with
probability w_k. Adapter paths are relative to the config file and must stay inside its
folder, so the folder can be copied to a serving host as one unit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ..config import StrictModel, format_validation_error
from ..errors import EmdpoError
from ..safe_yaml import read_yaml

FORMAT = "emdpo-routing/v1"
ENSEMBLE = "ensemble"  # the router's model name for the mixture
# Names become vLLM arguments (`--lora-modules NAME=PATH`, `--served-model-name NAME`) and folder
# names: a leading '-' would read as a flag, a leading '.' could name '..'.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class AdapterEntry(StrictModel):
    name: str
    path: str
    weight: float = Field(ge=0.0)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.fullmatch(v):
            raise ValueError(f"{v!r}: expected letters, digits, '_', '.', '-', starting with a letter, digit or '_' "
                             "(a leading '-' reads as a command-line flag, a leading '.' can name '..')")
        if v == ENSEMBLE:
            raise ValueError(f"{v!r} is the router's name for the whole mixture; choose another")
        return v


class RoutingConfig(StrictModel):
    format: str = FORMAT
    base_model: str
    policy: Literal["mixture"] = "mixture"
    adapter_type: Literal["lora", "full"] = "lora"  # lora: PEFT adapter folders; full: complete model folders
    adapters: list[AdapterEntry]
    meta: dict[str, Any] = {}

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, v: str) -> str:
        if not v.strip() or v.startswith("-"):
            raise ValueError(f"{v!r}: expected a model path or hub id (a leading '-' reads as a command-line flag)")
        return v

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v != FORMAT:
            raise ValueError(f"expected {FORMAT!r}")
        return v

    @model_validator(mode="after")
    def _weights(self) -> "RoutingConfig":
        if not self.adapters:
            raise ValueError("adapters: at least one adapter is needed")
        total = sum(a.weight for a in self.adapters)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"adapters: weights must sum to 1, got {total:.8f}")
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"adapters: duplicate names in {names}")
        return self


def mixture_entries(names: list[str], weights: Any) -> list[AdapterEntry]:
    """Entries for folders `adapters/<name>`, weights clipped at 0 and normalised to sum to 1."""
    w = [max(float(x), 0.0) for x in weights]
    total = sum(w)
    entries = [AdapterEntry(name=n, path=f"adapters/{n}", weight=x / total) for n, x in zip(names, w)]
    entries[-1].weight = 1.0 - sum(e.weight for e in entries[:-1])  # float rounding must not break the sum
    return entries


def write_routing(path: Path, config: RoutingConfig) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    load_routing(path)  # never write a config that would not load
    return path


def load_routing(path: str | Path) -> RoutingConfig:
    """Load and validate; adapter folders must exist inside the config's folder."""
    path = Path(path)
    raw = read_yaml(path, what="routing config")
    try:
        cfg = RoutingConfig.model_validate(raw)
    except ValidationError as exc:
        raise EmdpoError(f"{path}: {format_validation_error(exc, whole='config')}") from None
    root = path.parent.resolve()
    for i, a in enumerate(cfg.adapters):
        target = (root / a.path).resolve()
        if Path(a.path).is_absolute() or not target.is_relative_to(root):
            raise EmdpoError(f"{path}: adapters.{i}.path: {a.path!r} escapes the config's folder")
        if not target.is_dir():
            raise EmdpoError(f"{path}: adapters.{i}.path: folder {a.path!r} does not exist")
    return cfg


def adapter_dirs(path: str | Path, cfg: RoutingConfig) -> dict[str, Path]:
    root = Path(path).parent.resolve()
    return {a.name: (root / a.path).resolve() for a in cfg.adapters}
