"""The unit every source yields: one prompt with its completions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Item:
    """A prompt and its completions; `meta` is what the source knows of them (the corpus: levels, errors)."""

    prompt: str
    responses: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
