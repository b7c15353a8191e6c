"""The data-builder contract: what `openrlhf data build` and the recipe `data` stage call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .schema import Comparison


@dataclass
class BuiltDataset:
    """What a builder returns; `data build` and the `data` stage write it as a dataset folder.

    `val` is the validation split (hyperparameters are chosen on it, never on `test`); None
    writes no val.jsonl, so builders written before the split existed keep working.
    `disjoint_prompts` names splits whose prompt sets the builder guarantees to be pairwise
    disjoint (e.g. `("train", "val", "test")`); it is recorded in the manifest and checked on
    every load, so a hand-edited copy that leaks test prompts into val is caught.
    """

    train: list[Comparison]
    test: list[Comparison]
    config: dict[str, Any]  # the full resolved config (defaults filled in), recorded in the manifest
    labels: dict[str, Any] = field(default_factory=dict)  # label engines and versions
    extra: dict[str, Any] = field(default_factory=dict)  # builder-specific manifest fields
    val: list[Comparison] | None = None
    disjoint_prompts: tuple[str, ...] = ()


class DataBuilder(Protocol):
    def __call__(self, config: dict[str, Any], *, seed: int) -> BuiltDataset: ...
