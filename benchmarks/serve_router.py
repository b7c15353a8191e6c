"""Serving benchmark and acceptance run: `openrlhf serve ROUTING.yaml`, routed vs vLLM direct.

One invocation starts the real server, then measures on the same machine: start-up time to
healthy, requests/s and latency for sequential `/v1/completions` through `serve` (model
`ensemble`) and directly to a vLLM that does no routing (the adapter drawn with the same weights
client-side), and the same with `--concurrency` clients in flight, each in alternating blocks
(routed, direct, direct, routed, ...) so drift hits both alike; adapter counts against the
weights (z-scores); named-adapter and sticky-user routing; memory (RSS of the whole process
tree); and that SIGTERM leaves no process.

"Direct" depends on where `serve` routes (`--serve-arg=--router=...`, resolved as serve resolves
it): with the routing inside vLLM (a LoRA ensemble's default) it is a second, stock vLLM server
with the same adapters and settings, started by this script (the two idle in turn); behind the
proxy router it is the router's own vLLM on its loopback port, and the JSON 5xx answer time after
that vLLM is killed is measured too.

The headline numbers are `sequential_ratio` and `concurrent<N>_ratio`: the median router block's
requests/s over the median direct block's. Throughput on a small CPU host comes in phases
several seconds long that hit both sides (vLLM's spinning OpenMP threads against everything
else), so one block says little; medians over many alternating blocks do. The CPU time of the
router process and of vLLM's process tree per request is recorded for the concurrent blocks.
Placement and vLLM options of `openrlhf serve` (`--serve-arg=--vllm-reserved-cpus=1`, ...) apply
to both sides.

    flock /tmp/emdpo-cpu.lock .venv/bin/python benchmarks/serve_router.py runs/demo/minmax/routing.yaml \
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
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from emdpo_plugin.cli import build_parser
from emdpo_plugin.export.routing import load_routing
from emdpo_plugin.serve import CpuPlacement
from emdpo_plugin.serve.vllm_server import free_port, plan_servers

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


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    return f"{model}, {os.cpu_count()} CPUs, no GPU"


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def ratio_of_medians(router: list[float], direct: list[float]) -> float:
    return round(statistics.median(router) / statistics.median(direct), 3)


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
    ap.add_argument("--requests", type=int, default=600, help="sequential requests per side (router, direct)")
    ap.add_argument("--block", type=int, default=15, help="sequential requests per block")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt", default="The movie was")
    ap.add_argument("--concurrency", type=int, default=8, help="clients in flight for the concurrent comparison")
    ap.add_argument("--conc-requests", type=int, default=100, help="requests per concurrent block")
    ap.add_argument("--conc-rounds", type=int, default=24,
                    help="concurrent blocks per side, alternating router/direct")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="extra option of openrlhf serve, e.g. --serve-arg=--vllm-reserved-cpus=1 (repeatable)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if Path(args.out).exists():
        raise SystemExit(f"{args.out} exists: results go under a new name, never over an old one")

    cfg = load_routing(args.routing)
    names, weights = [a.name for a in cfg.adapters], [a.weight for a in cfg.adapters]
    opts = build_parser().parse_args(["serve", args.routing, *args.serve_arg])
    mode = opts.router if opts.router != "auto" else ("in-vllm" if cfg.adapter_type == "lora" else "proxy")
    vllm_port = free_port()
    router, vllm = f"http://127.0.0.1:{args.port}", f"http://127.0.0.1:{vllm_port}"
    stock = None  # the direct side's own vLLM, when serve's vLLM routes itself
    if mode == "in-vllm":
        placement = CpuPlacement(vllm_cpus=opts.vllm_cpus, vllm_reserved_cpus=opts.vllm_reserved_cpus,
                                 omp_spincount=opts.vllm_omp_spincount)
        (stock,), _ = plan_servers(Path(args.routing), cfg, extra_args=opts.vllm_args, seed=opts.seed,
                                   log_dir=Path(tempfile.mkdtemp(prefix="stock-vllm-")), port=vllm_port,
                                   placement=placement)
        stock.start()
        stock.wait_healthy(600)
    t0 = time.monotonic()
    port_args = [] if mode == "in-vllm" else ["--vllm-port", str(vllm_port)]
    proc = subprocess.Popen([OPENRLHF, "serve", args.routing, "--port", str(args.port), *port_args, *args.serve_arg],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=Path(__file__).parent).stdout.strip()
    res: dict = {"machine": machine(), "commit": commit + ("+dirty" if dirty else ""), "routing": args.routing,
                 "router_mode": mode, "direct": "stock vLLM beside it" if stock else "the router's vLLM",
                 "weights": dict(zip(names, weights)), "serve_args": args.serve_arg,
                 "requests_per_side": args.requests, "max_tokens": args.max_tokens}
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

        def only(side: str | None) -> None:
            """Two vLLMs (routed, stock) share the cores: the side not measured is stopped (SIGSTOP
            to its process group), so neither one's idle threads or timers take the other's CPU.
            A first run with both running gave blocks of 21-78 req/s for the same side."""
            if not stock:
                return
            groups = {"router": os.getpgid(next(p for p in psutil.Process(proc.pid).children()
                                                if "vllm.entrypoints" in " ".join(p.cmdline())).pid),
                      "direct": os.getpgid(stock.process.pid)}
            for name, group in groups.items():
                os.killpg(group, signal.SIGCONT if side in (None, name) else signal.SIGSTOP)
            time.sleep(0.05)
        rng = random.Random(0)
        lat = {"router": [], "direct": []}
        blocks = {"router": [], "direct": []}
        adapters = []
        with httpx.Client(timeout=120) as c:
            timed_requests(c, router, ["ensemble"] * 5, args.prompt, args.max_tokens)  # warm both paths
            timed_requests(c, vllm, names, args.prompt, args.max_tokens)
            for i, start in enumerate(range(0, args.requests, args.block)):
                k = min(args.block, args.requests - start)
                direct_models = rng.choices(names, weights, k=k)
                if i % 2:  # router, direct, direct, router, ...
                    only("direct")
                    l_d, _ = timed_requests(c, vllm, direct_models, args.prompt, args.max_tokens)
                only("router")
                l_r, a = timed_requests(c, router, ["ensemble"] * k, args.prompt, args.max_tokens)
                if not i % 2:
                    only("direct")
                    l_d, _ = timed_requests(c, vllm, direct_models, args.prompt, args.max_tokens)
                lat["router"] += l_r
                lat["direct"] += l_d
                blocks["router"].append(k / sum(l_r))
                blocks["direct"].append(k / sum(l_d))
                adapters += a
                print(f"{start + k}/{args.requests} router {k / sum(l_r):.2f} req/s, direct {k / sum(l_d):.2f} req/s",
                      flush=True)
            res["rss_mib_tree"] = round(tree_rss_mib(proc.pid), 1)
            for side, ls in lat.items():
                ls_sorted = sorted(ls)
                res[side] = {"req_per_s": round(len(ls) / sum(ls), 3), "p50_ms": round(1000 * ls_sorted[len(ls) // 2], 1),
                             "p95_ms": round(1000 * ls_sorted[int(0.95 * len(ls))], 1)}
            res["router_over_direct_throughput"] = round(res["router"]["req_per_s"] / res["direct"]["req_per_s"], 3)
            res["sequential_blocks_req_per_s"] = {side: [round(x, 3) for x in v] for side, v in blocks.items()}
            res["sequential_ratio"] = ratio_of_medians(blocks["router"], blocks["direct"])

            n_conc = args.conc_requests
            router_pid = [proc.pid]  # the supervising `serve` process alone when vLLM routes itself
            vllm_pids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
            if stock:
                vllm_pids += [stock.process.pid] + [p.pid for p in psutil.Process(stock.process.pid).children(recursive=True)]
            conc = {"router": [], "direct": []}
            cpu_ms = {side: {"router_process": [], "vllm_tree": []} for side in conc}
            only("router")
            concurrent_rate(router, ["ensemble"] * 20, args.prompt, args.max_tokens, args.concurrency)  # warm
            only("direct")
            concurrent_rate(vllm, names * 10, args.prompt, args.max_tokens, args.concurrency)
            for i in range(args.conc_rounds):  # router, direct, direct, router, ...
                for side in (("router", "direct") if i % 2 == 0 else ("direct", "router")):
                    only(side)
                    models = ["ensemble"] * n_conc if side == "router" else rng.choices(names, weights, k=n_conc)
                    c_r, c_v = cpu_seconds(router_pid), cpu_seconds(vllm_pids)
                    conc[side].append(concurrent_rate(router if side == "router" else vllm, models, args.prompt,
                                                      args.max_tokens, args.concurrency))
                    cpu_ms[side]["router_process"].append(1000 * (cpu_seconds(router_pid) - c_r) / n_conc)
                    cpu_ms[side]["vllm_tree"].append(1000 * (cpu_seconds(vllm_pids) - c_v) / n_conc)
                print(f"concurrent round {i + 1}/{args.conc_rounds}: router {conc['router'][-1]:.2f} req/s, "
                      f"direct {conc['direct'][-1]:.2f} req/s", flush=True)
            paired = [r / d for r, d in zip(conc["router"], conc["direct"])]
            res["concurrent"] = {
                "clients": args.concurrency, "requests_per_block": n_conc, "blocks_per_side": args.conc_rounds,
                **{side: {"req_per_s_median": round(statistics.median(v), 3), "req_per_s_mean": round(sum(v) / len(v), 3),
                          "blocks_req_per_s": [round(x, 2) for x in v],
                          "cpu_ms_per_request_median": {k: round(statistics.median(x), 2)
                                                        for k, x in cpu_ms[side].items()}}
                   for side, v in conc.items()},
                "router_over_direct_throughput": ratio_of_medians(conc["router"], conc["direct"]),
                "router_over_direct_paired_median": round(statistics.median(paired), 3),
            }
            res[f"concurrent{args.concurrency}_ratio"] = res["concurrent"]["router_over_direct_throughput"]
            print(f"sequential ratio {res['sequential_ratio']}, concurrent x{args.concurrency} ratio "
                  f"{res[f'concurrent{args.concurrency}_ratio']}", flush=True)
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

            only(None)
            tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
            if mode == "proxy":  # kill vLLM (its whole process group): the next request must fail fast with JSON
                vllm_proc = next(p for p in psutil.Process(proc.pid).children()
                                 if "vllm.entrypoints" in " ".join(p.cmdline()))
                os.killpg(os.getpgid(vllm_proc.pid), signal.SIGKILL)
                time.sleep(0.5)
                t = time.perf_counter()
                r = c.post(router + "/v1/completions", json={"model": "ensemble", "prompt": "x", "max_tokens": 2},
                           timeout=30)
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
        if stock:
            os.killpg(os.getpgid(stock.process.pid), signal.SIGCONT)
            stock.stop()
        if proc.poll() is None:  # failed half-way: let serve stop its (perhaps stopped) vLLM
            for child in psutil.Process(proc.pid).children():
                os.killpg(os.getpgid(child.pid), signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
