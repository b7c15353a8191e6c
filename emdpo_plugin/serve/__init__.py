"""`openrlhf serve ROUTING.yaml`: vLLM behind a weighted OpenAI-compatible router.

`serve()` validates the routing config, starts the vLLM server(s) on private loopback ports,
waits until they are healthy, then runs the router (uvicorn) on the public host/port, pinned to
`--router-cpus` if given (`placement`). On SIGTERM or SIGINT, uvicorn drains and returns, and
every vLLM process group is stopped; the same happens if start-up fails half-way.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from .limits import RouterLimits
from .placement import CpuPlacement, pin_process

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_STARTUP_TIMEOUT", "CpuPlacement", "RouterLimits", "serve"]

# `serve()`'s defaults, which the CLI shows: importing this package loads no server stack
# (FastAPI, httpx, vLLM helpers), so the CLI can build its parser from them cheaply.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_STARTUP_TIMEOUT = 600.0  # seconds to wait for vLLM to become healthy


class _Stop(Exception):
    """Raised by the SIGTERM handler while vLLM is starting (before uvicorn owns the signals)."""


def serve(routing_path: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, vllm_args: list[str] = (),
          vllm_port: int | None = None, seed: int = 0, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
          limits: RouterLimits = RouterLimits(), log_dir: str | Path | None = None,
          placement: CpuPlacement = CpuPlacement()) -> int:
    """Serve `routing_path` until SIGTERM/SIGINT; returns the exit code."""
    import uvicorn

    from ..export.routing import load_routing
    from .router import Target, build_app
    from .vllm_server import plan_servers

    routing_path = Path(routing_path)
    cfg = load_routing(routing_path)
    log_dir = Path(log_dir) if log_dir else routing_path.parent / "serve-logs"
    router_cpus = placement.router_cpu_set()  # checked before anything starts
    servers, where = plan_servers(routing_path, cfg, extra_args=list(vllm_args), log_dir=log_dir, seed=seed,
                                  port=vllm_port, placement=placement)

    def on_term(signum, frame):  # noqa: ARG001
        raise _Stop()

    # Kept while uvicorn serves: uvicorn drains on SIGTERM, restores this handler and re-raises
    # the signal, so `_Stop` ends uvicorn.run and the clean-up below runs (with the default
    # handler restored, the re-raised SIGTERM would kill this process and orphan vLLM).
    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    serving = False
    try:
        try:
            for s in servers:
                print(f"starting vLLM ({s.name}) on {s.url}; log: {s.log_path}", flush=True)
                s.start()
            for s in servers:
                s.wait_healthy(startup_timeout - (time.monotonic() - t0))
            targets = {name: Target(server.url, model, server.alive) for name, (server, model) in where.items()}
            app = build_app(cfg, targets, seed=seed, limits=limits)
            if router_cpus:  # after vLLM started, so that vLLM does not inherit the mask
                pin_process(router_cpus)
            weights = ", ".join(f"{a.name}={a.weight:.3f}" for a in cfg.adapters)
            print(f"vLLM healthy after {time.monotonic() - t0:.1f} s; router on http://{host}:{port} "
                  f"(model 'ensemble': {weights}){placement.describe()}", flush=True)
            serving = True
            # no access log and no X-Forwarded-* rewriting: per-request work the router has no use for
            uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, proxy_headers=False,
                        timeout_graceful_shutdown=10)
        except _Stop:
            if not serving:
                print("stopped during start-up", flush=True)
                return 143
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # do not die half-way through clean-up
        for s in servers:
            s.stop()
        print("router and vLLM stopped", flush=True)
