"""JSON a user hands us (dataset rows, manifests, router requests): strict where `json` is lax.

`json.loads` accepts NaN/Infinity (not JSON), turns 1e999 into inf, keeps the last of two equal
keys and recurses until RecursionError. `loads` refuses each with a one-line `JsonInputError`;
a syntax error stays `json.JSONDecodeError` so callers can say where it is.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

MAX_DEPTH = 64


class JsonInputError(ValueError):
    """Valid JSON syntax that we still refuse; the message is one line."""


class NonFinite(JsonInputError):
    """NaN, Infinity or a number too large for a float; `text` is how it was written."""

    def __init__(self, text: str) -> None:
        super().__init__(f"non-finite number {text}; JSON numbers must be finite")
        self.text = text


def finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e999 parses as inf
        raise NonFinite(text)
    return value


def no_constant(text: str) -> NoReturn:  # json calls this for NaN, Infinity, -Infinity
    raise NonFinite(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JsonInputError(f"duplicate key {key!r} in one object")
        out[key] = value
    return out


def depth_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays/objects nest more than `limit` levels (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def loads(text: str | bytes, max_depth: int = MAX_DEPTH, *, allow_nan: bool = False) -> Any:
    """Decode one JSON value: unique keys, at most `max_depth` levels, finite numbers (unless
    `allow_nan`: files we wrote ourselves, whose statistics may be NaN)."""
    too_deep = JsonInputError(f"nests deeper than {max_depth} levels")
    strict = {} if allow_nan else {"parse_float": finite_float, "parse_constant": no_constant}
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, **strict)
    except RecursionError:
        raise too_deep from None
    except (json.JSONDecodeError, JsonInputError):
        raise
    except ValueError as exc:  # e.g. an integer too long to convert
        raise JsonInputError(str(exc).splitlines()[0] if str(exc) else "invalid JSON") from None
    if depth_exceeds(value, max_depth):
        raise too_deep
    return value
