"""Format v1: one comparison per row (DESIGN.md section 3).

`Comparison` is the normalised in-memory row; `ComparisonSet` is the columnar view the
algorithms use (annotator indices, padded rankings). A prompt or response given as a message
list is a `chat.ChatMessages` string; `meta` holds the row's extra columns, unread by training. `group` is ground truth for evaluation
only: training code reads `ComparisonSet.annotator_index`, never `group`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from .chat import text_format_of, to_record_value

FORMAT_VERSION = "emdpo-format/v1"
SPLITS = ("train", "val", "test")  # a dataset folder's files: <split>.jsonl or <split>.parquet


def comparison_hash(annotator_id: str, prompt: str, responses: list[str], ranking: list[int]) -> str:
    """Stable id for a row that has none: the same content always gets the same id."""
    payload = json.dumps([annotator_id, prompt, responses, ranking], ensure_ascii=False)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Comparison:
    annotator_id: str
    prompt: str
    responses: list[str]
    ranking: list[int]  # indices into responses, best first; may be a top-k prefix
    comparison_id: str
    group: str | None = None
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_pairwise(self) -> bool:
        return len(self.responses) == 2 and len(self.ranking) >= 1

    def to_record(self) -> dict:
        rec = {
            "comparison_id": self.comparison_id,
            "annotator_id": self.annotator_id,
            "prompt": to_record_value(self.prompt),
            "responses": [to_record_value(r) for r in self.responses],
            "ranking": list(self.ranking),
        }
        if self.group is not None:
            rec["group"] = self.group
        if self.split is not None:
            rec["split"] = self.split
        if self.meta:
            rec["meta"] = dict(self.meta)
        return rec


@dataclass
class ComparisonSet:
    """Rows plus the index arrays the algorithms need; built once per dataset split."""

    rows: list[Comparison]
    annotator_ids: list[str] = field(default_factory=list)  # order defines annotator indices

    def __post_init__(self) -> None:
        if not self.annotator_ids:
            seen: dict[str, None] = {}
            for r in self.rows:
                seen.setdefault(r.annotator_id, None)
            self.annotator_ids = list(seen)

    def __len__(self) -> int:
        return len(self.rows)

    @cached_property
    def annotator_index(self) -> np.ndarray:
        pos = {a: i for i, a in enumerate(self.annotator_ids)}
        return np.array([pos[r.annotator_id] for r in self.rows], dtype=np.int64)

    @property
    def n_annotators(self) -> int:
        return len(self.annotator_ids)

    @cached_property
    def max_responses(self) -> int:
        return max((len(r.responses) for r in self.rows), default=0)

    @cached_property
    def rankings(self) -> np.ndarray:
        """(n, max_responses) int64, -1 padded."""
        out = np.full((len(self.rows), self.max_responses), -1, dtype=np.int64)
        for i, r in enumerate(self.rows):
            out[i, : len(r.ranking)] = r.ranking
        return out

    @cached_property
    def response_mask(self) -> np.ndarray:
        """(n, max_responses) bool: which response slots exist."""
        out = np.zeros((len(self.rows), self.max_responses), dtype=bool)
        for i, r in enumerate(self.rows):
            out[i, : len(r.responses)] = True
        return out

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.rows]

    @property
    def text_format(self) -> str:
        """`chat_template` when the prompts are message lists, else `plain`."""
        return text_format_of(self.prompts)

    @property
    def responses(self) -> list[list[str]]:
        return [r.responses for r in self.rows]

    @property
    def comparison_ids(self) -> list[str]:
        return [r.comparison_id for r in self.rows]

    def annotator_groups(self) -> list[str | None]:
        """Ground-truth group per annotator (evaluation only)."""
        groups: dict[str, str | None] = {}
        for r in self.rows:
            groups.setdefault(r.annotator_id, r.group)
        return [groups[a] for a in self.annotator_ids]

    def subset(self, mask: np.ndarray) -> "ComparisonSet":
        """Rows where mask is true, keeping the annotator index space."""
        return ComparisonSet([r for r, m in zip(self.rows, mask) if m], list(self.annotator_ids))
