"""`openrlhf serve ROUTING.yaml`: the ensemble on vLLM, routed by weight, OpenAI-compatible.

`serve()` validates the routing config and picks where the mixture is routed (`--router`):

- `in-vllm` (the default for a LoRA ensemble): one vLLM server with every adapter on the public
  host/port, routing inside its own API server (`in_vllm.MixtureMiddleware`); `serve` waits
  until it is healthy and supervises it;
- `proxy` (the default when the types are full models, one vLLM each): the vLLM servers on
  private loopback ports and the router (`router`, uvicorn) on the public host/port, pinned to
  `--router-cpus` if given (`placement`).

On SIGTERM or SIGINT every vLLM process group is stopped (after uvicorn drains, for the proxy);
the same happens if start-up fails half-way, and `serve` exits non-zero if vLLM dies under it.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Callable

from .limits import RouterLimits
from .placement import CpuPlacement, pin_process

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_STARTUP_TIMEOUT", "ROUTER_MODES", "CpuPlacement", "RouterLimits",
           "serve"]

# `serve()`'s defaults, which the CLI shows: importing this package loads no server stack
# (FastAPI, httpx, vLLM helpers), so the CLI can build its parser from them cheaply.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_STARTUP_TIMEOUT = 600.0  # seconds to wait for vLLM to become healthy
ROUTER_MODES = ("auto", "in-vllm", "proxy")  # auto: in-vllm for a LoRA ensemble, proxy for full models


class _Stop(Exception):
    """Raised by the SIGTERM handler while vLLM is starting (before uvicorn owns the signals)."""


def serve(routing_path: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, vllm_args: list[str] = (),
          vllm_port: int | None = None, seed: int = 0, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
          limits: RouterLimits = RouterLimits(), log_dir: str | Path | None = None,
          placement: CpuPlacement = CpuPlacement(), router: str = "auto") -> int:
    """Serve `routing_path` until SIGTERM/SIGINT; returns the exit code."""
    from ..errors import EmdpoError
    from ..export.routing import load_routing
    from .vllm_server import plan_servers

    routing_path = Path(routing_path)
    cfg = load_routing(routing_path)
    log_dir = Path(log_dir) if log_dir else routing_path.parent / "serve-logs"
    if router not in ROUTER_MODES:
        raise EmdpoError(f"--router: expected one of {', '.join(ROUTER_MODES)}, got {router!r}")
    in_vllm = router == "in-vllm" or (router == "auto" and cfg.adapter_type == "lora")
    if in_vllm:
        from .in_vllm import middleware_env

        for value, flag in ((vllm_port, "--vllm-port"), (placement.router_cpus, "--router-cpus")):
            if value is not None:
                raise EmdpoError(f"{flag}: there is no separate router with --router in-vllm (vLLM serves "
                                 "--port and routes itself); use --router proxy")
        servers, _ = plan_servers(routing_path, cfg, extra_args=list(vllm_args), log_dir=log_dir, seed=seed,
                                  port=port, placement=placement, host=host,
                                  middleware=middleware_env(cfg, seed, limits))
        return _supervise(servers[0], cfg, startup_timeout)
    router_cpus = placement.router_cpu_set()  # checked before anything starts
    servers, where = plan_servers(routing_path, cfg, extra_args=list(vllm_args), log_dir=log_dir, seed=seed,
                                  port=vllm_port, placement=placement)
    return _proxy(servers, where, cfg, host=host, port=port, seed=seed, startup_timeout=startup_timeout,
                  limits=limits, placement=placement, router_cpus=router_cpus)


def _on_term(signum, frame):  # noqa: ARG001
    raise _Stop()


def _weights(cfg) -> str:
    return ", ".join(f"{a.name}={a.weight:.3f}" for a in cfg.adapters)


def _run(servers: list, startup_timeout: float, serving: Callable[[float], int], stopped: str) -> int:
    """Start `servers` and wait until they are healthy, then return `serving(seconds it took)`.
    SIGTERM or SIGINT ends it with 0 (143 during start-up); every server is stopped however it ends."""
    # Kept while uvicorn serves: uvicorn drains on a signal, restores this handler and re-raises
    # it, so `_Stop` ends the uvicorn server and the clean-up below runs (with the default handler
    # restored, the re-raised SIGTERM would kill this process and orphan vLLM).
    handled = (signal.SIGTERM, signal.SIGINT)
    old = {sig: signal.signal(sig, _on_term) for sig in handled}
    t0 = time.monotonic()
    started = False
    try:
        for s in servers:
            print(f"starting vLLM ({s.name}) on {s.url}; log: {s.log_path}", flush=True)
            s.start()
        for s in servers:
            s.wait_healthy(startup_timeout - (time.monotonic() - t0))
        started = True
        return serving(time.monotonic() - t0)
    except _Stop:
        if not started:
            print("stopped during start-up", flush=True)
            return 143
        return 0
    finally:
        for sig in handled:  # do not die half-way through clean-up
            signal.signal(sig, signal.SIG_IGN)
        for s in servers:
            s.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        print(stopped, flush=True)


def _supervise(server, cfg, startup_timeout: float) -> int:
    """One vLLM server that routes itself: serve until a signal (exit 0) or until vLLM dies
    (exit 1, with its last log lines)."""

    def serving(seconds: float) -> int:
        print(f"vLLM healthy after {seconds:.1f} s; serving on http://{server.host}:{server.port} "
              f"(model 'ensemble': {_weights(cfg)}; routed inside vLLM)", flush=True)
        while server.alive():
            time.sleep(0.5)
        print(f"vLLM exited with code {server.process.returncode}; last lines of {server.log_path}:\n"
              f"{server.log_tail()}", flush=True)
        return 1

    return _run([server], startup_timeout, serving, "vLLM stopped")


def _proxy(servers, where, cfg, *, host: str, port: int, seed: int, startup_timeout: float, limits: RouterLimits,
           placement: CpuPlacement, router_cpus: set[int] | None) -> int:
    """vLLM server(s) on loopback ports behind the router process (uvicorn) on host:port."""
    import uvicorn

    from .router import Target, build_app

    class AnnouncingServer(uvicorn.Server):
        """Prints its line only once the router listens: a client that waits for "healthy" (a
        supervisor, a test) must not find the port still closed."""

        def __init__(self, config: uvicorn.Config, line: str) -> None:
            super().__init__(config)
            self.line = line

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                print(self.line, flush=True)

    def serving(seconds: float) -> int:
        targets = {name: Target(server.url, model, server.alive) for name, (server, model) in where.items()}
        app = build_app(cfg, targets, seed=seed, limits=limits)
        if router_cpus:  # after vLLM started, so that vLLM does not inherit the mask
            pin_process(router_cpus)
        # no access log and no X-Forwarded-* rewriting: per-request work the router has no use for
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                proxy_headers=False, timeout_graceful_shutdown=10)
        AnnouncingServer(config, f"vLLM healthy after {seconds:.1f} s; router on http://{host}:{port} "
                                 f"(model 'ensemble': {_weights(cfg)}){placement.describe()}").run()
        return 0

    return _run(servers, startup_timeout, serving, "router and vLLM stopped")
