"""The data-builder contract: what `openrlhf data build` and the recipe `data` stage call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .schema import Comparison


@dataclass
class BuiltDataset:
    train: list[Comparison]
    test: list[Comparison]
    config: dict[str, Any]  # the full resolved config (defaults filled in), recorded in the manifest
    labels: dict[str, Any] = field(default_factory=dict)  # label engines and versions
    extra: dict[str, Any] = field(default_factory=dict)  # builder-specific manifest fields


class DataBuilder(Protocol):
    def __call__(self, config: dict[str, Any], *, seed: int) -> BuiltDataset: ...
