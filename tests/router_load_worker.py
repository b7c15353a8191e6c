"""Processes for test_router.py's process-level tests, one per role.

    router_load_worker.py upstream [PORT]      the fake vLLM of test_router.py
    router_load_worker.py router URL           the router in front of URL, tracing its allocations;
                                               GET /_memory answers {"traced": bytes, "rss": bytes}
                                               after a full garbage collection
    router_load_worker.py in-vllm              the fake vLLM with the mixture middleware inside,
                                               tracing its allocations (GET /_memory likewise)
    router_load_worker.py serve ROUTING PORT [MODE]
                                               `openrlhf serve`'s serve() (--router MODE), with the
                                               fake vLLM started in vLLM's place (its own process
                                               group; with the middleware when serve asks for it)
                                               and a router that starts listening 1 s late

upstream and router bind a free loopback port (or PORT) and print it as their first line."""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
import tracemalloc

import psutil
import uvicorn

from emdpo_plugin.serve.router import Target, build_app
from test_router import WEIGHTS, fake_vllm, routing  # this script's folder is on sys.path


def memory_probe(app):
    async def probed(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/_memory":
            gc.collect()
            body = json.dumps({"traced": tracemalloc.get_traced_memory()[0],
                               "rss": psutil.Process().memory_info().rss}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
        else:
            await app(scope, receive, send)
    return probed


def slow_router_start(seconds: float = 1.0) -> None:
    """The router's uvicorn takes `seconds` to start listening, as on a loaded machine: `serve`
    must still not say "healthy" before a client can connect."""
    import asyncio

    import uvicorn

    startup = uvicorn.Server.startup

    async def slow_startup(self, sockets=None):
        await asyncio.sleep(seconds)
        await startup(self, sockets)

    uvicorn.Server.startup = slow_startup


def main(role: str, arg: str | None = None, port: str | None = None, mode: str = "auto") -> None:
    if role == "serve":
        from emdpo_plugin.serve import serve
        from emdpo_plugin.serve.vllm_server import VLLMServer

        VLLMServer.command = lambda self: [sys.executable, __file__, "upstream", str(self.port)]
        slow_router_start()
        sys.exit(serve(arg, port=int(port), startup_timeout=60, router=mode))
    upstream = arg
    if role == "router":
        tracemalloc.start()
        app = memory_probe(build_app(routing(), {n: Target(upstream, n) for n in WEIGHTS}))
    elif role == "in-vllm":
        from emdpo_plugin.serve.in_vllm import MixtureMiddleware, middleware_env
        from emdpo_plugin.serve.limits import RouterLimits

        tracemalloc.start()
        os.environ.update(middleware_env(routing(), 0, RouterLimits()))
        app = memory_probe(MixtureMiddleware(fake_vllm()))
    else:
        from emdpo_plugin.serve.in_vllm import ENV, MixtureMiddleware

        app = MixtureMiddleware(fake_vllm()) if ENV in os.environ else fake_vllm()
    sock = socket.socket()
    sock.bind(("127.0.0.1", int(arg) if role == "upstream" and arg else 0))
    print(sock.getsockname()[1], flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False)).run(sockets=[sock])


if __name__ == "__main__":
    main(*sys.argv[1:])
