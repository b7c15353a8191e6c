"""Talking to vLLM under the router's limits: a total deadline, client disconnects, a stream cap.

httpx's timeouts bound each read, so an upstream that trickles a byte now and then never times
out; the router bounds the whole exchange by wall-clock deadlines instead. A client that hangs
up cancels its upstream request (closing that connection is how vLLM learns to abort it), so no
generation runs on for nobody.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AbstractContextManager
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import anyio
import httpx

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


async def exchange(http: httpx.AsyncClient, request: httpx.Request, *, stream: bool,
                   timer: AbstractContextManager[Any]) -> tuple[httpx.Response, bytes | None]:
    """Send `request`; a stream comes back open (headers only), anything else read and closed."""
    with timer:
        resp = await http.send(request, stream=True)
    if stream:
        return resp, None
    try:
        return resp, await resp.aread()
    finally:
        await resp.aclose()


def error_event(message: str, status: int) -> bytes:
    return f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\n".encode()


async def relay(resp: httpx.Response, deadline: float, on_error: Callable[[str], None]) -> AsyncIterator[bytes]:
    """vLLM's server-sent events, passed through until `deadline` (event-loop clock).

    The cap or a broken upstream ends the stream with an error event (the status line has gone
    out already); the upstream response is closed however the stream ends, a client disconnect
    (Starlette cancels this generator) included."""
    chunks = resp.aiter_raw()
    try:
        while True:
            try:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            yield chunk
    except TimeoutError:
        on_error("stream_cut")
        yield error_event("stream cut: it ran longer than --max-stream-seconds", 504)
    except httpx.HTTPError as exc:
        on_error("stream_broken")
        yield error_event(f"vLLM stream broken: {type(exc).__name__}", 502)
    finally:
        with anyio.CancelScope(shield=True):
            await resp.aclose()
