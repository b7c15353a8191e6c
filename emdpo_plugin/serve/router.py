"""The proxy router in front of vLLM: serves the ensemble when its adapters live on several vLLM
servers (full-model ensembles), or with `openrlhf serve --router proxy`.

The routing decision (`mixture.Mixture`) is the one the in-vLLM middleware makes; this module
adds what a separate process in front of vLLM needs. Failures of the upstream never hang a
client: a dead vLLM process is answered at once with a 503, connection errors with a 502 and a
missed deadline with a 504, all with a one-line OpenAI-style JSON body. Requests are bounded
(`limits.RouterLimits`: body size, JSON depth and types, a total deadline, a stream cap), and a
client that disconnects cancels its upstream request (`upstream`).

The two proxied endpoints are served by a bare ASGI layer in front of the FastAPI app, and vLLM
is reached with aiohttp: on a CPU host vLLM's OpenMP threads keep every core busy, so each
millisecond the router spends is taken from generation. Per proxied request this costs 0.38 ms
of CPU against a fake upstream (FastAPI + httpx: 1.1 ms) and 0.8 ms next to vLLM on 2 cores
(was 2.1 ms); benchmarks/results/serve_router_cpu_2026-11-27b.md. That is about 5% of the
throughput with 8 clients on a 2-core host, which is why a LoRA ensemble (one vLLM server)
is routed inside vLLM by default (`in_vllm`).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..export.routing import RoutingConfig
from .limits import RequestError, RouterLimits, accept, encode_request
from .mixture import HEADER, PROXIED, Mixture, error_body
from .upstream import ClientGone, Deadline, exchange, guarded, relay, session

logger = logging.getLogger("emdpo.router")


@dataclass(frozen=True)
class Target:
    """Where one adapter is served: the vLLM base URL and the model name vLLM knows it by."""

    url: str
    model: str
    alive: Callable[[], bool] = lambda: True


def error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> Response:
    """An OpenAI-style error: one line of JSON."""
    return Response(error_body(status, message, kind), status_code=status, media_type="application/json",
                    headers=headers)


def build_app(cfg: RoutingConfig, targets: dict[str, Target], *, seed: int = 0,
              limits: RouterLimits = RouterLimits()) -> Callable[..., Awaitable[None]]:
    """The router: an ASGI app. POSTs to `PROXIED` are handled by a bare ASGI layer (the hot
    path: no middleware stack, no dependency solving); everything else is a FastAPI app."""
    mixture = Mixture(cfg.base_model, {a.name: a.weight for a in cfg.adapters}, seed)
    names = mixture.names
    # connect stays short so a dead vLLM is a fast 502; the total deadline is `guarded`'s
    connect = min(5.0, limits.request_timeout)
    pool: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}  # made in the loop that serves

    def http() -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if loop not in pool:  # the first request, or a new loop (a test client without lifespan)
            pool.clear()
            pool[loop] = session(connect)
        return pool[loop]

    requests_total, errors_total, latency = mixture.requests, mixture.errors, mixture.latency

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        own = pool.pop(asyncio.get_running_loop(), None)
        if own is not None:
            await own.close()

    app = FastAPI(title="emdpo router", description=f"mixture of {names} over {cfg.base_model}", lifespan=lifespan)

    def fail(status: int, message: str, kind: str, reason: str) -> Response:
        errors_total.labels(reason).inc()
        return error(status, message, kind)

    async def forward(request: Request, path: str) -> Response:
        endpoint = path.rsplit("/", 1)[-1]
        start = asyncio.get_running_loop().time()
        try:
            body = await accept(request, limits)
            name = mixture.pick(body)
        except RequestError as exc:
            return fail(exc.status, exc.message, exc.kind, exc.reason)
        target = targets[name]
        headers = {HEADER: name}

        def upstream_error(status: int, message: str, kind: str, reason: str | None) -> Response:
            requests_total.labels(name, endpoint, str(status)).inc()
            if reason:
                errors_total.labels(reason).inc()
            return error(status, message, kind, headers)

        if not target.alive():
            return upstream_error(503, f"vLLM server for adapter {name!r} is not running", "ServiceUnavailableError",
                                  None)
        body["model"] = target.model
        stream = bool(body.get("stream"))
        payload = encode_request(body)
        timer = latency.labels(name, endpoint).time()
        try:
            resp, content = await guarded(exchange(http(), target.url + path, payload, stream=stream, timer=timer),
                                          request.receive, start + limits.request_timeout)
        except (Deadline, asyncio.TimeoutError):
            return upstream_error(504, f"vLLM did not answer within --request-timeout ({limits.request_timeout:g} s)",
                                  "GatewayTimeoutError", "upstream_timeout")
        except ClientGone:  # nobody to answer; the upstream request was cancelled
            errors_total.labels("client_disconnected").inc()
            return Response(status_code=499)
        except aiohttp.ClientError as exc:
            return upstream_error(502, f"vLLM unreachable or connection lost: {exc!r}", "BadGatewayError",
                                  "upstream_unreachable")
        requests_total.labels(name, endpoint, str(resp.status)).inc()
        media_type = resp.headers.get("content-type", "application/json")
        if stream:
            cut = start + limits.max_stream_seconds
            return StreamingResponse(relay(resp, cut, lambda reason: errors_total.labels(reason).inc()),
                                     status_code=resp.status, media_type=media_type, headers=headers)
        return Response(content=content, status_code=resp.status, media_type=media_type, headers=headers)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": mixture.models()}

    @app.get("/health")
    async def health() -> Response:
        down = sorted({n for n, t in targets.items() if not t.alive()})
        if not down:
            checks = {t.url for t in targets.values()}
            for url in checks:
                try:
                    async with http().get(url + "/health", timeout=aiohttp.ClientTimeout(total=5.0)) as r:
                        if r.status != 200:
                            down.append(url)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    down.append(url)
        if down:
            return JSONResponse({"status": "unavailable", "down": down}, status_code=503)
        return JSONResponse({"status": "ok", "adapters": names})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(mixture.registry), media_type=CONTENT_TYPE_LATEST)

    async def router(scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] in PROXIED and scope["method"] == "POST":
            try:
                response = await forward(Request(scope, receive), scope["path"])
            except Exception as exc:  # a bug, not a client's or vLLM's fault: still one line of JSON
                logger.exception("router error")
                response = fail(500, f"router error: {type(exc).__name__}", "InternalServerError", "router_error")
            await response(scope, receive, send)
        else:
            await app(scope, receive, send)

    return router
