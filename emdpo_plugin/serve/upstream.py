"""Talking to vLLM under the router's limits: a total deadline, client disconnects, a stream cap.

The client is aiohttp's: on a 2-core host vLLM's OpenMP threads keep both cores busy, so every
millisecond the router spends is taken from generation, and aiohttp (C HTTP parser) costs about
a third of the CPU per proxied request that httpx did (benchmarks/results/serve_router_cpu_2026-11-27b.md).

Socket timeouts bound each read, so an upstream that trickles a byte now and then never times
out; the router bounds the whole exchange by wall-clock deadlines instead. A client that hangs
up cancels its upstream request (closing that connection is how vLLM learns to abort it), so no
generation runs on for nobody.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AbstractContextManager
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import aiohttp
import anyio

T = TypeVar("T")


class Deadline(Exception):
    """The upstream did not finish before the request's deadline."""


class ClientGone(Exception):
    """The client disconnected before the upstream answered."""


async def _disconnect(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def guarded(work: Awaitable[T], receive: Callable[[], Awaitable[dict[str, Any]]], deadline: float) -> T:
    """`work`'s result, unless the client disconnects first (`ClientGone`) or the event loop's
    clock passes `deadline` (`Deadline`); either way `work` is cancelled and has cleaned up.

    `receive` is the ASGI receive of a request whose body was read in full, so its next message
    can only be the disconnect."""
    loop = asyncio.get_running_loop()
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watch}, timeout=max(0.0, deadline - loop.time()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task in done:
        return task.result()
    raise ClientGone() if watch in done else Deadline()


# vLLM's server closes a keep-alive connection after 5 idle seconds (VLLM_HTTP_TIMEOUT_KEEP_ALIVE);
# the router drops its own idle connections well before that, so it never sends on one just closed
KEEPALIVE_SECONDS = 2.0


def session(connect_timeout: float) -> aiohttp.ClientSession:
    """The router's pooled keep-alive client; create it inside the running event loop.

    Only connecting has a timeout of its own (a dead vLLM is a fast 502); the total deadline is
    `guarded`'s, the stream's `relay`'s."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256, limit_per_host=0, keepalive_timeout=KEEPALIVE_SECONDS),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout),
        skip_auto_headers=("User-Agent",), trust_env=False)


async def exchange(http: aiohttp.ClientSession, url: str, body: bytes, *, stream: bool,
                   timer: AbstractContextManager[Any]) -> tuple[aiohttp.ClientResponse, bytes | None]:
    """POST `body` (JSON) to `url`; a stream comes back open (headers only), anything else read
    and released. Cancelled or failed half-way, the connection is closed, never pooled.

    A pooled connection that the server closed just as it was reused fails before any answer
    (`ServerDisconnectedError`; the connection leaves the pool): such a request is sent once more.
    A vLLM that died with the request on it refuses the second try (502); one that closed the
    connection while working on it aborted that request, so it does not run twice."""
    headers = {"content-type": "application/json"}
    with timer:
        try:
            resp = await http.post(url, data=body, headers=headers)
        except aiohttp.ServerDisconnectedError:
            resp = await http.post(url, data=body, headers=headers)
    if stream:
        return resp, None
    try:
        content = await resp.read()
    except BaseException:
        resp.close()  # drop the connection: vLLM sees it go and aborts the request
        raise
    resp.release()
    return resp, content


def error_event(message: str, status: int) -> bytes:
    return f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\n".encode()


async def relay(resp: aiohttp.ClientResponse, deadline: float,
                on_error: Callable[[str], None]) -> AsyncIterator[bytes]:
    """vLLM's server-sent events, passed through until `deadline` (event-loop clock).

    The cap or a broken upstream ends the stream with an error event (the status line has gone
    out already); the upstream response is closed however the stream ends, a client disconnect
    (Starlette cancels this generator) included."""
    chunks = resp.content.iter_any()
    complete = False
    try:
        while True:
            try:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                complete = True
                return
            yield chunk
    except TimeoutError:
        on_error("stream_cut")
        yield error_event("stream cut: it ran longer than --max-stream-seconds", 504)
    except aiohttp.ClientError as exc:
        on_error("stream_broken")
        yield error_event(f"vLLM stream broken: {type(exc).__name__}", 502)
    finally:
        # a finished stream's connection goes back to the pool; any other is closed, which is
        # how vLLM learns that nobody reads on
        if complete:
            resp.release()
        else:
            resp.close()
