"""What the router accepts from a client: a bounded, well-typed JSON object.

The router is the only public face of `openrlhf serve`, so a client must not be able to make it
buffer an unbounded body, recurse through a pathologically nested document, or pass NaN (which
is not JSON and which vLLM would reject or mishandle) and odd-typed routing fields through to
vLLM. Every refusal is a `RequestError` the router answers with a one-line JSON error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..safe_json import NonFinite, depth_exceeds, finite_float, no_constant

if TYPE_CHECKING:  # only annotated: the CLI reads RouterLimits' defaults without the server stack
    from starlette.requests import Request


@dataclass(frozen=True)
class RouterLimits:
    """Per-request bounds; each is an `openrlhf serve` option of the same name."""

    max_body_bytes: int = 4 * 2**20  # a long chat history is well under this
    request_timeout: float = 600.0  # body in, and the upstream's whole answer (headers for a stream)
    max_stream_seconds: float = 1800.0  # a streamed answer is cut after this long
    max_json_depth: int = 64  # OpenAI tool schemas nest a few levels, never dozens

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "request_timeout", "max_stream_seconds", "max_json_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive number, got {value!r}")


class RequestError(Exception):
    """A request the router refuses: HTTP status, message, OpenAI error type, metrics reason."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError", reason: str = "bad_request") -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.reason = status, message, kind, reason


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it (or its declared length) exceeds `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit()):
        raise RequestError(400, f"header content-length: expected a byte count, got {declared!r}")
    too_large = RequestError(413, f"request body exceeds the limit of {limit} bytes (--max-body-bytes)",
                             "PayloadTooLargeError", "body_too_large")
    if declared is not None and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def accept(request: Request, limits: RouterLimits) -> dict[str, Any]:
    """The request's body, read in full within `--request-timeout` and checked (`parse_request`);
    a `RequestError` otherwise (408 for a body that does not arrive in time)."""
    import anyio

    try:
        with anyio.fail_after(limits.request_timeout):
            raw = await read_body(request, limits.max_body_bytes)
    except TimeoutError:
        raise RequestError(408, f"request body not received within --request-timeout ({limits.request_timeout:g} s)",
                           "RequestTimeoutError", "body_timeout") from None
    return parse_request(raw, limits.max_json_depth)


def encode_request(body: dict[str, Any]) -> bytes:
    """`body` (as `parse_request` returned it, perhaps with `model` rewritten) for vLLM."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def parse_request(raw: bytes, max_depth: int) -> dict[str, Any]:
    """The body as a JSON object with finite numbers, bounded nesting and typed routing fields."""
    too_deep = RequestError(400, f"request body nests deeper than {max_depth} levels (--max-json-depth)")
    try:
        body = json.loads(raw, parse_float=finite_float, parse_constant=no_constant)
    except NonFinite as exc:
        raise RequestError(400, f"request body holds the {exc}") from None
    except RecursionError:
        raise too_deep from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, an integer too long to convert
        raise RequestError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    if depth_exceeds(body, max_depth):
        raise too_deep
    for field, types, expected in (("model", str, "a string"), ("user", str, "a string"),
                                   ("stream", bool, "true or false")):
        value = body.get(field)
        if value is not None and not isinstance(value, types):
            raise RequestError(400, f"field {field!r}: expected {expected}, got {type(value).__name__}")
    return body
