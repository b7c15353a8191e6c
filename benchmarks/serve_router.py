"""Serving benchmark and acceptance run: `openrlhf serve ROUTING.yaml`, router vs vLLM direct.

One invocation starts the real server (vLLM + router), then measures, on the same machine and
the same warm vLLM: start-up time to healthy, requests/s and latency for sequential
`/v1/completions` through the router (model `ensemble`) and directly to vLLM (the adapter drawn
with the same weights client-side), in alternating blocks so drift hits both alike; adapter
counts against the weights (z-scores); named-adapter and sticky-user routing; memory (RSS of the
whole process tree); the 5xx answer time after vLLM is killed; and that SIGTERM leaves no process.

    .venv/bin/python benchmarks/serve_router.py runs/demo/minmax/routing.yaml \
        --out benchmarks/results/serve_router_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from emdpo_plugin.export.routing import load_routing
from emdpo_plugin.serve.vllm_server import free_port

OPENRLHF = str(Path(sys.executable).parent / "openrlhf")


def tree_rss_mib(pid: int) -> float:
    p = psutil.Process(pid)
    procs = [p, *p.children(recursive=True)]
    return sum(q.memory_info().rss for q in procs if q.is_running()) / 2**20


def timed_requests(client: httpx.Client, url: str, models: list[str], prompt: str, max_tokens: int):
    latencies, adapters = [], []
    for m in models:
        t = time.perf_counter()
        r = client.post(url + "/v1/completions", json={"model": m, "prompt": prompt, "max_tokens": max_tokens,
                                                       "temperature": 1.0})
        latencies.append(time.perf_counter() - t)
        r.raise_for_status()
        adapters.append(r.headers.get("x-emdpo-adapter") or r.json()["model"])
    return latencies, adapters


def concurrent_rate(url: str, models: list[str], prompt: str, max_tokens: int, concurrency: int) -> float:
    """Requests/s with `concurrency` clients in flight (asyncio + httpx)."""
    import asyncio

    async def run() -> float:
        queue = list(models)
        async with httpx.AsyncClient(timeout=120) as c:
            async def worker():
                while queue:
                    m = queue.pop()
                    r = await c.post(url + "/v1/completions", json={"model": m, "prompt": prompt,
                                                                    "max_tokens": max_tokens, "temperature": 1.0})
                    r.raise_for_status()
            t = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return len(models) / (time.perf_counter() - t)

    return asyncio.run(run())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("routing")
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--requests", type=int, default=300, help="per side (router, direct)")
    ap.add_argument("--block", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt", default="The movie was")
    ap.add_argument("--concurrency", type=int, default=8, help="clients in flight for the concurrent comparison")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    cfg = load_routing(args.routing)
    names, weights = [a.name for a in cfg.adapters], [a.weight for a in cfg.adapters]
    vllm_port = free_port()
    router, vllm = f"http://127.0.0.1:{args.port}", f"http://127.0.0.1:{vllm_port}"
    t0 = time.monotonic()
    proc = subprocess.Popen([OPENRLHF, "serve", args.routing, "--port", str(args.port), "--vllm-port", str(vllm_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU",
                 "routing": args.routing, "weights": dict(zip(names, weights)), "requests_per_side": args.requests,
                 "max_tokens": args.max_tokens}
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited: {proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(router + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 600:
                raise SystemExit("not healthy after 600 s")
            time.sleep(0.5)
        res["startup_s"] = round(time.monotonic() - t0, 1)
        print(f"healthy after {res['startup_s']} s", flush=True)
        rng = random.Random(0)
        lat = {"router": [], "direct": []}
        adapters = []
        with httpx.Client(timeout=120) as c:
            timed_requests(c, router, ["ensemble"] * 5, args.prompt, args.max_tokens)  # warm both paths
            timed_requests(c, vllm, names, args.prompt, args.max_tokens)
            for start in range(0, args.requests, args.block):
                k = min(args.block, args.requests - start)
                l_r, a = timed_requests(c, router, ["ensemble"] * k, args.prompt, args.max_tokens)
                l_d, _ = timed_requests(c, vllm, rng.choices(names, weights, k=k), args.prompt, args.max_tokens)
                lat["router"] += l_r
                lat["direct"] += l_d
                adapters += a
                print(f"{start + k}/{args.requests} router {k / sum(l_r):.2f} req/s, direct {k / sum(l_d):.2f} req/s",
                      flush=True)
            res["rss_mib_tree"] = round(tree_rss_mib(proc.pid), 1)
            for side, ls in lat.items():
                ls_sorted = sorted(ls)
                res[side] = {"req_per_s": round(len(ls) / sum(ls), 3), "p50_ms": round(1000 * ls_sorted[len(ls) // 2], 1),
                             "p95_ms": round(1000 * ls_sorted[int(0.95 * len(ls))], 1)}
            res["router_over_direct_throughput"] = round(res["router"]["req_per_s"] / res["direct"]["req_per_s"], 3)
            n_conc = min(args.requests, 100)
            conc = {"router": [], "direct": []}
            for _ in range(2):  # alternate, twice each
                conc["router"].append(concurrent_rate(router, ["ensemble"] * n_conc, args.prompt, args.max_tokens,
                                                      args.concurrency))
                conc["direct"].append(concurrent_rate(vllm, rng.choices(names, weights, k=n_conc), args.prompt,
                                                      args.max_tokens, args.concurrency))
            res["concurrent"] = {"clients": args.concurrency, "requests_per_try": n_conc,
                                 **{side: {"req_per_s": round(sum(v) / len(v), 3)} for side, v in conc.items()}}
            res["concurrent"]["router_over_direct_throughput"] = round(
                res["concurrent"]["router"]["req_per_s"] / res["concurrent"]["direct"]["req_per_s"], 3)
            print(f"concurrent x{args.concurrency}: {res['concurrent']}", flush=True)
            counts = Counter(adapters)
            n = len(adapters)
            res["adapter_counts"] = {a: counts[a] for a in names}
            res["z_scores"] = {a: round((counts[a] - n * w) / math.sqrt(n * w * (1 - w)), 2) if 0 < w < 1 else 0.0
                               for a, w in zip(names, weights)}
            res["all_succeeded"] = n == args.requests
            res["named_ok"] = all(
                c.post(router + "/v1/completions", json={"model": a, "prompt": args.prompt, "max_tokens": 2})
                .headers["x-emdpo-adapter"] == a for a in names for _ in range(5))
            res["sticky_ok"] = all(len({c.post(router + "/v1/completions", json={
                "model": "ensemble", "prompt": args.prompt, "max_tokens": 2, "user": f"user{u}"}).headers["x-emdpo-adapter"]
                for _ in range(5)}) == 1 for u in range(10))
            metrics = c.get(router + "/metrics").text
            res["metrics_lines"] = [line for line in metrics.splitlines() if line.startswith("emdpo_requests_total")]

            # kill vLLM (its whole process group): the next request must fail fast with JSON
            tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
            vllm_proc = next(p for p in psutil.Process(proc.pid).children()
                             if "vllm.entrypoints" in " ".join(p.cmdline()))
            os.killpg(os.getpgid(vllm_proc.pid), signal.SIGKILL)
            time.sleep(0.5)
            t = time.perf_counter()
            r = c.post(router + "/v1/completions", json={"model": "ensemble", "prompt": "x", "max_tokens": 2}, timeout=30)
            res["after_vllm_killed"] = {"status": r.status_code, "seconds": round(time.perf_counter() - t, 3),
                                        "json": r.json()}
        proc.send_signal(signal.SIGTERM)
        t = time.perf_counter()
        proc.wait(timeout=120)
        res["sigterm_exit_s"] = round(time.perf_counter() - t, 2)
        time.sleep(1)
        left = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        res["processes_left_after_sigterm"] = left
    finally:
        if proc.poll() is None:
            proc.kill()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
