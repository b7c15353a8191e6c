"""The weighted router against a fake vLLM (an ASGI app): routing, stickiness, errors, metrics.

The real vLLM end-to-end test is tests/test_serve_vllm.py (slow)."""

from __future__ import annotations

import json
import math
from collections import Counter

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from emdpo_plugin.export.routing import AdapterEntry, RoutingConfig
from emdpo_plugin.serve.router import AdapterChooser, Target, build_app

WEIGHTS = {"type0": 0.3, "type1": 0.7}


def fake_vllm() -> FastAPI:
    """Echoes which model it was asked for, as vLLM's LoRA routing would use it."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body.get("stream"):
            async def events():
                for i in range(3):
                    yield f"data: {json.dumps({'model': body['model'], 'choices': [{'text': str(i)}]})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"model": body["model"], "choices": [{"text": "hi", "index": 0}], "user": body.get("user")}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        return {"model": body["model"], "choices": [{"message": {"role": "assistant", "content": "ok"}}]}

    @app.get("/health")
    async def health():
        return JSONResponse({})

    return app


def routing(weights=WEIGHTS) -> RoutingConfig:
    return RoutingConfig(base_model="base", adapters=[AdapterEntry(name=n, path=f"adapters/{n}", weight=w)
                                                      for n, w in weights.items()])


def client_for(upstream: FastAPI | None = None, alive: bool = True, weights=WEIGHTS, seed: int = 0) -> TestClient:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream or fake_vllm()))
    targets = {n: Target("http://vllm", n, lambda: alive) for n in weights}
    return TestClient(build_app(routing(weights), targets, seed=seed, client=http))


def test_ensemble_requests_follow_the_weights():
    with client_for() as c:
        counts = Counter()
        n = 400
        for _ in range(n):
            r = c.post("/v1/completions", json={"model": "ensemble", "prompt": "x"})
            assert r.status_code == 200
            name = r.headers["x-emdpo-adapter"]
            assert r.json()["model"] == name  # vLLM was asked for the chosen adapter
            counts[name] += 1
    sd = math.sqrt(n * 0.3 * 0.7)
    assert abs(counts["type0"] - 0.3 * n) < 4 * sd, counts


def test_named_adapter_goes_to_it_and_unknown_model_is_404():
    with client_for() as c:
        for _ in range(20):
            r = c.post("/v1/completions", json={"model": "type0", "prompt": "x"})
            assert r.headers["x-emdpo-adapter"] == "type0" and r.json()["model"] == "type0"
        r = c.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
        assert r.status_code == 404
        assert "gpt-4" in r.json()["error"]["message"] and "ensemble" in r.json()["error"]["message"]


def test_same_user_same_adapter_and_users_spread_by_weight():
    with client_for() as c:
        by_user = {}
        for u in range(200):
            names = {c.post("/v1/completions", json={"model": "ensemble", "prompt": "x", "user": f"u{u}"})
                     .headers["x-emdpo-adapter"] for _ in range(3)}
            assert len(names) == 1
            by_user[u] = names.pop()
    share = sum(v == "type1" for v in by_user.values()) / 200
    assert abs(share - 0.7) < 4 * math.sqrt(0.21 / 200)
    # deterministic from (seed, user): a new router with the same seed agrees
    again = AdapterChooser(list(WEIGHTS), list(WEIGHTS.values()), seed=0)
    assert all(again.choose(f"u{u}") == name for u, name in by_user.items())


def test_zero_weight_adapter_is_never_sampled():
    chooser = AdapterChooser(["a", "b", "c"], [0.5, 0.0, 0.5], seed=1)
    assert "b" not in {chooser.choose() for _ in range(2000)}
    assert "b" not in {chooser.choose(f"user{i}") for i in range(2000)}


def test_streaming_and_chat_pass_through():
    with client_for() as c:
        with c.stream("POST", "/v1/completions", json={"model": "type1", "prompt": "x", "stream": True}) as r:
            assert r.status_code == 200 and r.headers["x-emdpo-adapter"] == "type1"
            assert r.headers["content-type"].startswith("text/event-stream")
            text = "".join(r.iter_text())
        assert text.count("data: ") == 4 and text.rstrip().endswith("[DONE]")
        r = c.post("/v1/chat/completions", json={"model": "ensemble", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["model"] == r.headers["x-emdpo-adapter"]


def test_models_health_and_metrics():
    with client_for() as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == ["ensemble", "type0", "type1"]
        assert c.get("/health").status_code == 200
        for _ in range(5):
            c.post("/v1/completions", json={"model": "type0", "prompt": "x"})
        c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        text = c.get("/metrics").text
    assert 'emdpo_requests_total{adapter="type0",endpoint="completions",status="200"} 5.0' in text
    assert 'emdpo_errors_total{reason="unknown_model"} 1.0' in text


def test_dead_upstream_gets_a_json_5xx_at_once():
    with client_for(alive=False) as c:
        r = c.post("/v1/completions", json={"model": "ensemble", "prompt": "x"})
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 503


def test_unreachable_upstream_is_502_json():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    http = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    targets = {n: Target("http://vllm", n) for n in WEIGHTS}
    with TestClient(build_app(routing(), targets, client=http)) as c:
        r = c.post("/v1/completions", json={"model": "type0", "prompt": "x"})
        assert r.status_code == 502 and r.json()["error"]["type"] == "BadGatewayError"
        assert r.headers["x-emdpo-adapter"] == "type0"
        assert c.get("/health").status_code == 503


def test_bad_json_is_400():
    with client_for() as c:
        r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize("weights", [{"a": 1.0}, {"a": 0.25, "b": 0.25, "c": 0.5}])
def test_chooser_matches_weights(weights):
    chooser = AdapterChooser(list(weights), list(weights.values()), seed=3)
    n = 4000
    counts = Counter(chooser.choose() for _ in range(n))
    for name, w in weights.items():
        assert abs(counts[name] - w * n) <= 4 * math.sqrt(n * w * (1 - w)) + 1e-9


def _adapter_folders(root, rank: int):
    from emdpo_plugin.export.routing import write_routing

    for n in WEIGHTS:
        (root / "adapters" / n).mkdir(parents=True)
        (root / "adapters" / n / "adapter_config.json").write_text(json.dumps({"r": rank}))
    return write_routing(root / "routing.yaml", routing())


def test_lora_ensemble_is_one_vllm_with_every_adapter(tmp_path):
    from emdpo_plugin.serve.vllm_server import plan_servers

    path = _adapter_folders(tmp_path, rank=12)
    servers, placement = plan_servers(path, routing(), extra_args=["--max-model-len=128"], log_dir=tmp_path, port=4321)
    assert len(servers) == 1 and servers[0].port == 4321
    cmd = servers[0].command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"  # vLLM itself is never public
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16"  # rank 12 rounded up to a rank vLLM accepts
    assert cmd[cmd.index("--max-loras") + 1] == "2" and "--max-model-len=128" in cmd
    i = cmd.index("--lora-modules")
    assert cmd[i + 1:i + 3] == [f"type0={tmp_path / 'adapters' / 'type0'}", f"type1={tmp_path / 'adapters' / 'type1'}"]
    assert placement == {"type0": (servers[0], "type0"), "type1": (servers[0], "type1")}


def test_full_model_ensemble_is_one_vllm_per_model(tmp_path):
    from emdpo_plugin.serve.vllm_server import plan_servers

    path = _adapter_folders(tmp_path, rank=8)
    cfg = routing().model_copy(update={"adapter_type": "full"})
    servers, placement = plan_servers(path, cfg, extra_args=[], log_dir=tmp_path)
    assert [s.name for s in servers] == ["type0", "type1"] and len({s.port for s in servers}) == 2
    for s in servers:
        cmd = s.command()
        assert cmd[cmd.index("--model") + 1] == str(tmp_path / "adapters" / s.name)
        assert cmd[cmd.index("--served-model-name") + 1] == s.name and "--enable-lora" not in cmd
    assert placement["type1"][1] == "type1"


def test_a_folder_that_is_not_a_lora_adapter_is_named(tmp_path):
    from emdpo_plugin.errors import EmdpoError
    from emdpo_plugin.serve.vllm_server import plan_servers

    path = _adapter_folders(tmp_path, rank=8)
    (tmp_path / "adapters" / "type1" / "adapter_config.json").unlink()
    with pytest.raises(EmdpoError, match="type1.*adapter_config.json"):
        plan_servers(path, routing(), extra_args=[], log_dir=tmp_path)
