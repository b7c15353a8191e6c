"""The row rules of format v1: one raw dict row -> a validated `Comparison` (DESIGN.md section 3).

Every reader and writer passes rows through `parse_rows`, so every source obeys exactly the
same rules. Errors are one line, `<file>: row <N>: field '<name>': <reason>`; with a column
mapping (`data.keys`) the field is named as the user's column, `'question' (prompt)`.
Columns that are not format-v1 fields are kept as the row's `meta`, never dropped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from ..errors import DataError
from ..safe_json import MAX_DEPTH, depth_exceeds
from .chat import CHAT, PLAIN, ChatMessages, parse_messages, text_format_of
from .keys import FIELDS_BY, DataKeys
from .schema import Comparison, comparison_hash

_REQUIRED = ("annotator_id", "prompt")
_RANKED = ("responses", "ranking")
_PAIRWISE = ("chosen", "rejected")
_OPTIONAL = ("group", "comparison_id", "split", "meta")
KNOWN_FIELDS = frozenset(_REQUIRED + _RANKED + _PAIRWISE + _OPTIONAL)


def _kind(value: Any) -> str:
    """JSON-ish name plus a short repr, so messages say what was actually found."""
    names = {
        type(None): "null",
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "object",
    }
    name = names.get(type(value), type(value).__name__)
    if value is None:
        return name
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{name} {text}"


class At(NamedTuple):
    """Where a row came from, and the user's column for each remapped canonical field."""

    where: str
    labels: Mapping[str, str] = {}


def _fail(at: At, field: str, reason: str) -> DataError:
    column = at.labels.get(field, field)
    shown = f"'{column}' ({field})" if column != field else f"'{field}'"
    return DataError(f"{at.where}: field {shown}: {reason}")


def _present(row: dict, key: str) -> bool:
    """Null counts as absent: columnar formats fill missing optional cells with null."""
    return row.get(key) is not None


def _require_str(row: dict, key: str, at: At, *, allow_empty: bool) -> str:
    if key not in row:
        raise _fail(at, key, "required field missing (expected a string)")
    value = row[key]
    if not isinstance(value, str):
        raise _fail(at, key, f"expected a string, found {_kind(value)}")
    if not allow_empty and not value.strip():
        raise _fail(at, key, f"expected a non-empty string, found {value!r}")
    return value


def _scalar_id(row: dict, key: str, at: At) -> str:
    """An id as a string: strings as they are, numbers as their string form (3 and 3.0 as '3')."""
    if key not in row:
        raise _fail(at, key, "required field missing (expected a string or integer id)")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _fail(at, key, f"expected a string or integer id, found {_kind(value)}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(at, key, f"expected a string or integer id, found {_kind(value)}")
        value = str(int(value)) if value.is_integer() else repr(value)
    text = str(value)
    if not text.strip():
        raise _fail(at, key, f"expected a non-empty string, found {text!r}")
    return text


def _text(value: Any, at: At, field: str, item: str = "", *, chat: bool, allow_empty: bool = False) -> str:
    """A prompt or response: a string, or (any prompt; responses of a chat row) a message list."""
    want = f"{item} to be " if item else ""
    if isinstance(value, list):
        if not chat:
            raise _fail(at, field, f"expected {want}a string (message-list responses need a message-list "
                                   f"prompt), found {_kind(value)}")
        messages, why = parse_messages(value)
        if messages is None:
            raise _fail(at, field, f"expected {want}a string or a message list, found {why}")
        return messages
    if not isinstance(value, str):
        raise _fail(at, field, f"expected {want}a string{' or a message list' if chat else ''}, found {_kind(value)}")
    if not allow_empty and not value.strip():
        raise _fail(at, field, f"expected {want}a non-empty string, found {value!r}")
    return value


def _parse_responses(row: dict, at: At, chat: bool) -> list[str]:
    value = row["responses"]
    if not isinstance(value, list):
        raise _fail(at, "responses", f"expected a list of >= 2 responses, found {_kind(value)}")
    if len(value) < 2:
        raise _fail(at, "responses", f"expected a list of >= 2 responses, found {len(value)} item(s)")
    return [_text(v, at, "responses", f"item {i}", chat=chat) for i, v in enumerate(value)]


def _parse_ranking(row: dict, at: At, n_responses: int) -> list[int]:
    if not _present(row, "ranking"):
        raise _fail(at, "ranking", "expected a list of response indices (best first) with 'responses', found nothing")
    value = row["ranking"]
    if not isinstance(value, list) or not value:
        found = "an empty list" if value == [] else _kind(value)
        raise _fail(at, "ranking", f"expected a non-empty list of integer indices, found {found}")
    seen: set[int] = set()
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int):
            raise _fail(at, "ranking", f"expected item {i} to be an integer index, found {_kind(item)}")
        if not 0 <= item < n_responses:
            raise _fail(at, "ranking",
                        f"expected indices in 0..{n_responses - 1} ({n_responses} responses), found {item} at item {i}")
        if item in seen:
            raise _fail(at, "ranking", f"expected distinct indices, found {item} twice")
        seen.add(item)
    return list(value)


def _parse_candidates(row: dict, at: At, chat: bool) -> tuple[list[str], list[int]]:
    """Either responses + ranking or the chosen/rejected shorthand, never both."""
    ranked = [k for k in _RANKED if _present(row, k)]
    pairwise = [k for k in _PAIRWISE if _present(row, k)]
    if ranked and pairwise:
        raise _fail(at, pairwise[0], f"cannot be combined with '{at.labels.get(ranked[0], ranked[0])}': "
                                     "use either responses + ranking or chosen + rejected")
    if pairwise:
        for key in _PAIRWISE:
            if key not in row:
                raise _fail(at, key, "required field missing (expected a response)")
        return [_text(row[k], at, k, chat=chat) for k in _PAIRWISE], [0, 1]
    if not ranked:
        raise _fail(at, "responses", "expected 'responses' + 'ranking' or 'chosen' + 'rejected', found neither")
    if not _present(row, "responses"):
        raise _fail(at, "responses", "expected a list of >= 2 responses alongside 'ranking', found nothing")
    responses = _parse_responses(row, at, chat)
    return responses, _parse_ranking(row, at, len(responses))


def _optional_str(row: dict, key: str, at: At) -> str | None:
    return _require_str(row, key, at, allow_empty=False) if _present(row, key) else None


def _parse_meta(row: dict, at: At) -> dict[str, Any]:
    """`meta` (an object, or its JSON text as parquet/HF files hold it) plus every extra column."""
    meta: dict[str, Any] = {}
    if _present(row, "meta"):
        value = row["meta"]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise _fail(at, "meta", "expected an object (or its JSON text), found invalid JSON") from None
        if not isinstance(value, dict):
            raise _fail(at, "meta", f"expected an object, found {_kind(value)}")
        meta.update(value)
    for key, value in row.items():
        if key in KNOWN_FIELDS:
            continue
        if key in meta:
            raise _fail(at, key, "also a key of the row's 'meta' object; keep one")
        meta[key] = value
    for key, value in meta.items():
        try:
            json.dumps(value, allow_nan=False)
        except ValueError:
            raise _fail(at, key, f"extra column kept as metadata: expected finite numbers (JSON has no NaN or "
                                 f"infinity; use null), found {_kind(value)}") from None
        except TypeError:
            raise _fail(at, key, f"extra column kept as metadata: expected a JSON value, found {_kind(value)}") from None
    return meta


def _canonical(row: dict, at: At, columns: Mapping[str, str]) -> dict:
    """The row under canonical field names (`columns`: source column -> field)."""
    if not columns:
        return row
    out: dict = {}
    for key, value in row.items():
        if key in columns:
            out[columns[key]] = value
        elif key in at.labels:
            raise DataError(f"{at.where}: field '{key}': also given by column '{at.labels[key]}' "
                            f"(keys {FIELDS_BY[key]}={at.labels[key]}); drop or rename one")
        else:
            out[key] = value
    return out


def parse_row(row: Any, at: At | str, columns: Mapping[str, str] | None = None) -> Comparison:
    """Validate one raw row and normalise it; `at` is the `<file>: row <N>` prefix (and labels).

    The single definition of the row rules: every reader and writer goes through it.
    """
    at = At(at) if isinstance(at, str) else at
    if not isinstance(row, dict):
        raise DataError(f"{at.where}: expected a JSON object, found {_kind(row)}")
    if depth_exceeds(row, MAX_DEPTH):
        raise DataError(f"{at.where}: nests deeper than {MAX_DEPTH} levels")
    row = _canonical(row, at, columns or {})
    annotator_id = _scalar_id(row, "annotator_id", at)
    if "prompt" not in row:
        raise _fail(at, "prompt", "required field missing (expected a string or a message list)")
    prompt = _text(row["prompt"], at, "prompt", chat=True, allow_empty=True)
    responses, ranking = _parse_candidates(row, at, chat=isinstance(prompt, ChatMessages))
    cid = _optional_str(row, "comparison_id", at)
    return Comparison(
        annotator_id=annotator_id,
        prompt=prompt,
        responses=responses,
        ranking=ranking,
        comparison_id=cid if cid is not None else comparison_hash(annotator_id, prompt, responses, ranking),
        group=_scalar_id(row, "group", at) if _present(row, "group") else None,
        split=_optional_str(row, "split", at),
        meta=_parse_meta(row, at),
    )


def parse_rows(source: str, rows: Iterable[tuple[int, Any]], keys: DataKeys | None = None) -> list[Comparison]:
    """Parse numbered raw rows from one file: one text format throughout, unique comparison ids."""
    columns = keys.column_map() if keys is not None else {}
    labels = {field: column for column, field in columns.items()}
    out: list[Comparison] = []
    first_seen: dict[str, int] = {}
    first_format: tuple[str, int] | None = None
    for number, raw in rows:
        at = At(f"{source}: row {number}", labels)
        comp = parse_row(raw, at, columns)
        fmt = CHAT if isinstance(comp.prompt, ChatMessages) else PLAIN
        if first_format is None:
            first_format = (fmt, number)
        elif fmt != first_format[0]:
            want = "a message list" if first_format[0] == CHAT else "a string"
            raise _fail(at, "prompt", f"expected {want} like row {first_format[1]} (one text format per file: "
                                      f"all prompts plain strings or all message lists)")
        if comp.comparison_id in first_seen:
            derived = "" if _present(raw, labels.get("comparison_id", "comparison_id")) else \
                " (derived from the row content)"
            raise _fail(at, "comparison_id", f"expected a unique id, found {comp.comparison_id!r}{derived} "
                                             f"already used by row {first_seen[comp.comparison_id]}")
        first_seen[comp.comparison_id] = number
        out.append(comp)
    return out


def common_text_format(files: Mapping[str, list[Comparison]]) -> str:
    """The text format every file (name -> rows) shares, `plain` or `chat_template`; else one line
    naming the first row that differs from the first file."""
    first: tuple[str, str] | None = None
    for name, rows in files.items():
        if not rows:
            continue
        fmt = text_format_of(r.prompt for r in rows[:1])
        if first is None:
            first = (fmt, name)
        elif fmt != first[0]:
            want = "a message list" if first[0] == CHAT else "a string"
            raise DataError(f"{name}: row 1: field 'prompt': expected {want} like the prompts of {first[1]} "
                            "(every split of a dataset has one text format)")
    return first[0] if first else PLAIN


def check_ids_across_splits(splits: Mapping[str, tuple[str, list[Comparison]]]) -> None:
    """Refuse a comparison id used in two splits (split -> (file or source label, rows)).

    Ids name rows in per-row results (`eval/per_row.py`) and in messages; one id in train and
    test would make a held-out row indistinguishable from a training row there (and positional
    ids from a builder that forgot the split prefix collide exactly so). One line naming the id,
    both splits and both rows."""
    seen: dict[str, tuple[str, str, int]] = {}
    for split, (label, rows) in splits.items():
        for number, row in enumerate(rows, start=1):
            other, other_label, other_row = seen.setdefault(row.comparison_id, (split, label, number))
            if other != split:  # a repeat within one file is parse_rows' error
                raise DataError(f"{label}: row {number}: field 'comparison_id': {row.comparison_id!r} is also row "
                                f"{other_row} of {other_label} (splits {other} and {split}); a comparison id must "
                                "be unique across train/val/test")
