"""Column mapping: read data whose columns have other names (`data.keys`, `--keys`).

Like OpenRLHF's `--data.prompt_key`/`chosen_key`/`rejected_key`: each canonical field may be
read from a column of another name. The mapping is applied when rows are read; everything
written afterwards (dataset folders) uses the canonical names.
"""

from __future__ import annotations

from pydantic import Field, ValidationError

from ..config import StrictModel
from ..errors import DataError

# key name in data.keys -> canonical field of format v1
FIELDS = {
    "prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "responses": "responses",
    "ranking": "ranking", "annotator": "annotator_id", "group": "group",
}


class DataKeys(StrictModel):
    """Source column for each canonical field; unset fields keep their canonical name."""

    prompt: str | None = Field(None, description="column of the prompt (text or chat message list)")
    chosen: str | None = Field(None, description="column of the preferred response (pairwise rows)")
    rejected: str | None = Field(None, description="column of the other response (pairwise rows)")
    responses: str | None = Field(None, description="column of the response list (ranked rows)")
    ranking: str | None = Field(None, description="column of the ranking: response indices, best first")
    annotator: str | None = Field(None, description="column of the annotator id (annotator_id)")
    group: str | None = Field(None, description="column of the ground-truth group (used only by evaluation)")

    def column_map(self) -> dict[str, str]:
        """source column -> canonical field, for the keys that are set (and differ)."""
        out: dict[str, str] = {}
        for key, column in self.model_dump(exclude_none=True).items():
            if column in out:
                raise DataError(f"data.keys: column {column!r} is mapped twice ({FIELDS_BY[out[column]]} and {key})")
            out[column] = FIELDS[key]
        return {c: f for c, f in out.items() if c != f}

    def describe(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.model_dump(exclude_none=True).items())


FIELDS_BY = {field: key for key, field in FIELDS.items()}


def parse_keys(text: str | None) -> DataKeys:
    """`prompt=question,chosen=good,...` (the CLI's `--keys`) as DataKeys; bad input is one line."""
    if not text:
        return DataKeys()
    pairs: dict[str, str] = {}
    for part in text.split(","):
        key, eq, column = (s.strip() for s in part.partition("="))
        if not eq or not key or not column:
            raise DataError(f"--keys: expected FIELD=COLUMN pairs separated by commas, found {part.strip()!r}")
        if key in pairs:
            raise DataError(f"--keys: {key} given twice")
        pairs[key] = column
    try:
        return DataKeys.model_validate(pairs)
    except ValidationError as exc:
        bad = [str(e["loc"][0]) for e in exc.errors()]
        raise DataError(f"--keys: unknown field(s) {', '.join(bad)} (expected {', '.join(FIELDS)})") from None
