"""Routing inside vLLM's own API server: `openrlhf serve`'s default for a LoRA ensemble.

A LoRA ensemble is one vLLM server with every adapter, so the mixture needs no process of its
own: vLLM loads `MixtureMiddleware` (`--middleware`, an ASGI middleware) and the middleware
rewrites each completion request's `model` to the drawn adapter before vLLM's handler reads it.
A separate router costs a second HTTP hop and about 0.8 ms of CPU per request, which on a busy
2-core CPU host is 5% of the throughput with 8 clients (benchmarks/results/); in vLLM's process
the decision costs one JSON parse.

Behaviour matches the proxy router (`router`), from the same `mixture.Mixture`: `ensemble` draws
by weight (sticky per `user`), a named adapter goes to it, an unknown model is a 404, every
answer carries `x-emdpo-adapter`, `/v1/models` lists the ensemble and the adapters, `/metrics`
adds the `emdpo_*` series to vLLM's, and the same `RouterLimits` bound each request: body size
and JSON shape (413/400), the body's arrival (408), the answer's headers (504) and a stream's
length (cut with an error event). A non-streamed answer is held until it is complete, so a missed
deadline is always a clean 504. Past a deadline vLLM's handler is cancelled, which aborts the
generation as a client disconnect does; a client's own disconnect reaches vLLM unchanged.

vLLM builds the middleware with no arguments, so `openrlhf serve` passes the mixture in the
environment (`ENV`, JSON written by `middleware_env`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Awaitable, Callable

import anyio
from prometheus_client import generate_latest
from starlette.requests import Request

from ..errors import EmdpoError
from ..export.routing import RoutingConfig
from .limits import RequestError, RouterLimits, accept, encode_request
from .mixture import HEADER, PROXIED, Mixture, error_body
from .upstream import error_event

ENV = "EMDPO_MIXTURE"
MIDDLEWARE = f"{__name__}.MixtureMiddleware"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def middleware_env(cfg: RoutingConfig, seed: int, limits: RouterLimits) -> dict[str, str]:
    """The environment that hands `cfg`'s mixture to the middleware in vLLM's process."""
    spec = {"base_model": cfg.base_model, "weights": {a.name: a.weight for a in cfg.adapters}, "seed": seed,
            "limits": {k: getattr(limits, k) for k in limits.__dataclass_fields__}}
    return {ENV: json.dumps(spec)}


def _headers(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    """`headers` for a body rewritten to `length` bytes: one content-length, no chunked encoding."""
    return [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"transfer-encoding")] + \
        [(b"content-length", str(length).encode())]


class MixtureMiddleware:
    """ASGI middleware for vLLM's OpenAI server: the ensemble's routing, in process."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        raw = os.environ.get(ENV)
        if not raw:
            raise EmdpoError(f"{MIDDLEWARE} needs the mixture in ${ENV} (openrlhf serve sets it)")
        try:
            spec = json.loads(raw)
            self.mixture = Mixture(spec["base_model"], spec["weights"], int(spec["seed"]))
            self.limits = RouterLimits(**spec["limits"])
        except (ValueError, KeyError, TypeError) as exc:
            raise EmdpoError(f"${ENV}: expected the JSON that openrlhf serve writes ({exc})") from None
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["method"] == "POST" and scope["path"] in PROXIED:
                return await self._route(scope, receive, send)
            if scope["method"] == "GET" and scope["path"] in ("/v1/models", "/metrics"):
                return await self._amend(scope, receive, send)
        await self.app(scope, receive, send)

    async def _reply(self, send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] = ()) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *extra]})
        await send({"type": "http.response.body", "body": body})

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        mixture, limits = self.mixture, self.limits
        endpoint = scope["path"].rsplit("/", 1)[-1]
        start = anyio.current_time()
        try:
            body = await accept(Request(scope, receive), limits)
            name = mixture.pick(body)
        except RequestError as exc:
            mixture.errors.labels(exc.reason).inc()
            return await self._reply(send, exc.status, error_body(exc.status, exc.message, exc.kind))
        body["model"] = name
        payload = encode_request(body)
        tag = [(HEADER.encode(), name.encode())]
        replayed = False

        async def replay() -> dict[str, Any]:  # the rewritten body, then the client's own messages
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": payload, "more_body": False}

        status: int | None = None
        stream = bool(body.get("stream"))
        held: list[dict[str, Any]] = []  # a whole answer goes out only once it is complete
        streaming = False  # whether a stream's first message reached the client

        async def tagged(message: dict[str, Any]) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), *tag]}
                mixture.latency.labels(name, endpoint).observe(anyio.current_time() - start)
                if stream:  # the deadline has been met: from here the stream's cap applies
                    deadline.deadline = start + limits.max_stream_seconds
            if not stream:
                held.append(message)
                return
            streaming = True
            await send(message)

        inner = {**scope, "headers": _headers(scope["headers"], len(payload))}
        with anyio.CancelScope(deadline=start + limits.request_timeout) as deadline:
            await self.app(inner, replay, tagged)
        if not deadline.cancelled_caught:
            for message in held:
                await send(message)
        elif not streaming:
            status = 504
            mixture.errors.labels("upstream_timeout").inc()
            await self._reply(send, 504, error_body(
                504, f"vLLM did not answer within --request-timeout ({limits.request_timeout:g} s)",
                "GatewayTimeoutError"), tag)
        else:  # the status line has gone out: end the stream with an error event
            mixture.errors.labels("stream_cut").inc()
            await send({"type": "http.response.body", "more_body": False, "body": error_event(
                "stream cut: it ran longer than --max-stream-seconds", 504)})
        mixture.requests.labels(name, endpoint, str(status)).inc()

    async def _amend(self, scope: Scope, receive: Receive, send: Send) -> None:
        """vLLM's `/v1/models` with the ensemble and its weights, or its `/metrics` with ours added."""
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:  # anything else (401 with --api-key, ...) passes unchanged
            if scope["path"] == "/metrics":
                body += generate_latest(self.mixture.registry)
            else:
                listing = json.loads(body)
                served = {m.get("id"): m for m in listing.get("data", [])}
                listing["data"] = [{**served.get(m["id"], {}), **m} for m in self.mixture.models()]
                body = json.dumps(listing).encode()
        await send({**start, "headers": _headers(start.get("headers", []), len(body))})
        await send({"type": "http.response.body", "body": body})
