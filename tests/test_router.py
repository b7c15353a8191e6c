"""Both ways of routing the mixture against a fake vLLM: the proxy router (a separate app talking
to the fake on a loopback port) and the middleware inside vLLM's server (wrapping the fake app).
Routing, stickiness, errors, limits and metrics must be the same in both.

The real vLLM end-to-end test is tests/test_serve_vllm.py (slow)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.testclient import TestClient

from emdpo_plugin.export.routing import AdapterEntry, RoutingConfig
from emdpo_plugin.serve.in_vllm import MixtureMiddleware, middleware_env
from emdpo_plugin.serve.limits import RouterLimits
from emdpo_plugin.serve.mixture import AdapterChooser
from emdpo_plugin.serve.router import Target, build_app

WEIGHTS = {"type0": 0.3, "type1": 0.7}
MODES = ["proxy", "in-vllm"]


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

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "base", "object": "model", "max_model_len": 64},
                                           *({"id": n, "object": "model", "parent": "base", "max_model_len": 64}
                                             for n in WEIGHTS)]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse("vllm:num_requests_running 0.0\n")

    return app


def routing(weights=WEIGHTS) -> RoutingConfig:
    return RoutingConfig(base_model="base", adapters=[AdapterEntry(name=n, path=f"adapters/{n}", weight=w)
                                                      for n, w in weights.items()])


@contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """`app` on a real loopback port (uvicorn in a thread): the router talks to its upstream over
    TCP (aiohttp), and trickled bytes, hung connections and disconnects need real sockets."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def in_vllm(upstream: FastAPI, weights=WEIGHTS, seed: int = 0, limits: RouterLimits = RouterLimits()):
    """`upstream` as vLLM would load it with the middleware: wrapped, the mixture in the environment."""
    env = middleware_env(routing(weights), seed, limits)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return MixtureMiddleware(upstream)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@contextmanager
def client_for(upstream: FastAPI | None = None, alive: bool = True, weights=WEIGHTS, seed: int = 0,
               limits: RouterLimits = RouterLimits(), mode: str = "proxy") -> Iterator[TestClient]:
    """`mode` "proxy": the router in front of `upstream` (default: the fake vLLM) on a loopback
    port; "in-vllm": `upstream` with the middleware inside it."""
    upstream = upstream or fake_vllm()
    if mode == "in-vllm":
        with TestClient(in_vllm(upstream, weights, seed, limits)) as c:
            yield c
        return
    with served(upstream) as url:
        targets = {n: Target(url, n, lambda: alive) for n in weights}
        with TestClient(build_app(routing(weights), targets, seed=seed, limits=limits)) as c:
            yield c


@pytest.mark.parametrize("mode", MODES)
def test_ensemble_requests_follow_the_weights(mode):
    with client_for(mode=mode) as c:
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


@pytest.mark.parametrize("mode", MODES)
def test_named_adapter_goes_to_it_and_unknown_model_is_404(mode):
    with client_for(mode=mode) as c:
        for _ in range(20):
            r = c.post("/v1/completions", json={"model": "type0", "prompt": "x"})
            assert r.headers["x-emdpo-adapter"] == "type0" and r.json()["model"] == "type0"
        r = c.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
        assert r.status_code == 404
        assert "gpt-4" in r.json()["error"]["message"] and "ensemble" in r.json()["error"]["message"]


@pytest.mark.parametrize("mode", MODES)
def test_same_user_same_adapter_and_users_spread_by_weight(mode):
    with client_for(mode=mode) as c:
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


@pytest.mark.parametrize("mode", MODES)
def test_streaming_and_chat_pass_through(mode):
    with client_for(mode=mode) as c:
        with c.stream("POST", "/v1/completions", json={"model": "type1", "prompt": "x", "stream": True}) as r:
            assert r.status_code == 200 and r.headers["x-emdpo-adapter"] == "type1"
            assert r.headers["content-type"].startswith("text/event-stream")
            text = "".join(r.iter_text())
        assert text.count("data: ") == 4 and text.rstrip().endswith("[DONE]")
        r = c.post("/v1/chat/completions", json={"model": "ensemble", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["model"] == r.headers["x-emdpo-adapter"]


@pytest.mark.parametrize("mode", MODES)
def test_models_health_and_metrics(mode):
    with client_for(mode=mode) as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == ["ensemble", "type0", "type1"]
        assert c.get("/health").status_code == 200
        for _ in range(5):
            c.post("/v1/completions", json={"model": "type0", "prompt": "x"})
        c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        text = c.get("/metrics").text
        models = c.get("/v1/models").json()["data"]
    assert 'emdpo_requests_total{adapter="type0",endpoint="completions",status="200"} 5.0' in text
    assert 'emdpo_errors_total{reason="unknown_model"} 1.0' in text
    assert models[0]["weights"] == WEIGHTS and [m["weight"] for m in models[1:]] == list(WEIGHTS.values())
    if mode == "in-vllm":  # vLLM's own answers, amended: its metrics stay, its adapter fields stay
        assert "vllm:num_requests_running 0.0" in text
        assert models[1]["max_model_len"] == 64 and models[1]["parent"] == "ensemble"


def test_dead_upstream_gets_a_json_5xx_at_once():
    with client_for(alive=False) as c:
        r = c.post("/v1/completions", json={"model": "ensemble", "prompt": "x"})
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 503


def test_unreachable_upstream_is_502_json():
    with socket.socket() as free:  # nothing listens here any more: connection refused
        free.bind(("127.0.0.1", 0))
        refused = free.getsockname()[1]
    targets = {n: Target(f"http://127.0.0.1:{refused}", n) for n in WEIGHTS}
    with TestClient(build_app(routing(), targets)) as c:
        r = c.post("/v1/completions", json={"model": "type0", "prompt": "x"})
        assert r.status_code == 502 and r.json()["error"]["type"] == "BadGatewayError"
        assert r.headers["x-emdpo-adapter"] == "type0"
        assert c.get("/health").status_code == 503


@pytest.mark.parametrize("mode", MODES)
def test_bad_json_is_400(mode):
    with client_for(mode=mode) as c:
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


# --- limits: every refusal is a status code and one line of JSON, in bounded time -------------


def one_line_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert "\n" not in r.text.strip()
    return r.json()["error"]["message"]


def real_client(url: str, limits: RouterLimits = RouterLimits()) -> TestClient:
    """The router (in-process) with its own httpx client to a real upstream at `url`."""
    return TestClient(build_app(routing(), {n: Target(url, n) for n in WEIGHTS}, limits=limits))


@pytest.mark.parametrize("mode", MODES)
def test_body_over_the_limit_is_413_declared_or_chunked(mode):
    with client_for(limits=RouterLimits(max_body_bytes=100), mode=mode) as c:
        assert c.post("/v1/completions", json={"prompt": "x" * 50}).status_code == 200
        big = json.dumps({"prompt": "x" * 200}).encode()
        assert "--max-body-bytes" in one_line_error(c.post("/v1/completions", content=big), 413)
        chunked = c.post("/v1/completions", content=iter([big[:60], big[60:]]))  # no content-length
        assert "--max-body-bytes" in one_line_error(chunked, 413)
        small = json.dumps({"prompt": "y" * 20}).encode()
        r = c.post("/v1/completions", content=iter([small[:9], small[9:]]))  # chunked, under the limit
        assert r.status_code == 200 and r.json()["model"] == r.headers["x-emdpo-adapter"]
    assert 'emdpo_errors_total{reason="body_too_large"} 2.0' in c.get("/metrics").text


@pytest.mark.parametrize("raw, message", [
    (b'{"model": 5, "prompt": "x"}', "field 'model': expected a string, got int"),
    (b'{"model": ["type0"], "prompt": "x"}', "field 'model': expected a string, got list"),
    (b'{"user": {"id": 1}, "prompt": "x"}', "field 'user': expected a string, got dict"),
    (b'{"stream": "yes", "prompt": "x"}', "field 'stream': expected true or false, got str"),
    (b'{"prompt": "x", "temperature": NaN}', "non-finite number NaN"),
    (b'{"prompt": "x", "temperature": Infinity}', "non-finite number Infinity"),
    (b'{"prompt": "x", "temperature": -Infinity}', "non-finite number -Infinity"),
    (b'{"prompt": "x", "temperature": 1e999}', "non-finite number 1e999"),
    (b'{"prompt": "x", "logit_bias": ' + b"[" * 9 + b"]" * 9 + b"}", "deeper than 8 levels"),
    (b"[" * 100_000 + b"]" * 100_000, "deeper than 8 levels"),  # past Python's recursion limit
    (b'["not", "an object"]', "must be a JSON object"),
])
@pytest.mark.parametrize("mode", MODES)
def test_bad_json_types_are_400(raw, message, mode):
    with client_for(limits=RouterLimits(max_json_depth=8), mode=mode) as c:
        r = c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert message in one_line_error(r, 400)
        ok = {"prompt": "x", "logit_bias": [[[[[[[0]]]]]]]}  # 8 levels deep: allowed
        assert c.post("/v1/completions", json=ok).status_code == 200


def slow_vllm(started: threading.Event | None = None, seen_disconnect: threading.Event | None = None) -> FastAPI:
    """Never finishes within a test: with `stream` or `trickle` it sends its headers and then a
    few bytes every 0.1 s (so no single read waits long), otherwise it sends nothing. Notes when
    the router hangs up on it."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if started:
            started.set()
        if not (body.get("stream") or body.get("trickle")):  # notices its client leaving, as vLLM does
            for _ in range(400):
                if await request.is_disconnected():
                    seen_disconnect and seen_disconnect.set()
                    return JSONResponse({})
                await asyncio.sleep(0.05)
            return JSONResponse({})

        async def drip():
            try:
                yield "data: {}\n\n" if body.get("stream") else '{"choices": ['
                for _ in range(200):
                    await asyncio.sleep(0.1)
                    yield "data: {}\n\n" if body.get("stream") else " "
            finally:  # cancelled when the router closes the connection
                seen_disconnect and seen_disconnect.set()
        return StreamingResponse(drip(), media_type="text/event-stream" if body.get("stream") else "application/json")

    return app


@contextmanager
def slow_front(mode: str, limits: RouterLimits, **events) -> Iterator[TestClient]:
    """The mixture's front (`mode`) with the slow fake vLLM behind it."""
    if mode == "in-vllm":
        with TestClient(in_vllm(slow_vllm(**events), limits=limits)) as c:
            yield c
        return
    with served(slow_vllm(**events)) as url, real_client(url, limits) as c:
        yield c


def served_front(mode: str, upstream: FastAPI, limits: RouterLimits = RouterLimits()):
    """The mixture's front on a real loopback port (for tests that need a socket)."""
    if mode == "in-vllm":
        return served(in_vllm(upstream, limits=limits))

    @contextmanager
    def proxied():
        with served(upstream) as up, served(build_app(routing(), {n: Target(up, n) for n in WEIGHTS},
                                                      limits=limits)) as url:
            yield url
    return proxied()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("trickle", [False, True])
def test_upstream_past_the_deadline_is_504_even_while_it_trickles(trickle, mode):
    with slow_front(mode, RouterLimits(request_timeout=1.0)) as c:
        t = time.monotonic()
        r = c.post("/v1/completions", json={"model": "type0", "prompt": "x", "trickle": trickle})
        assert "--request-timeout" in one_line_error(r, 504) and time.monotonic() - t < 5
        assert r.headers["x-emdpo-adapter"] == "type0"


@pytest.mark.parametrize("mode", MODES)
def test_stream_is_cut_after_max_stream_seconds(mode):
    with slow_front(mode, RouterLimits(max_stream_seconds=1.0)) as c:
        t = time.monotonic()
        with c.stream("POST", "/v1/completions", json={"model": "type1", "prompt": "x", "stream": True}) as r:
            assert r.status_code == 200  # the status line went out before the cap
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert time.monotonic() - t < 5 and 3 <= len(events) < 30
        last = json.loads(events[-1][len("data: "):])
        assert last["error"]["code"] == 504 and "--max-stream-seconds" in last["error"]["message"]


@pytest.mark.parametrize("mode", MODES)
def test_slow_request_body_is_408(mode):
    with served_front(mode, fake_vllm(), RouterLimits(request_timeout=1.0)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: 100\r\n\r\n{\"prompt\"")  # and then nothing
            head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 408") and "--request-timeout" in head


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_the_upstream_request(stream, mode):
    started, seen_disconnect = threading.Event(), threading.Event()
    with served_front(mode, slow_vllm(started, seen_disconnect)) as url:
        body = json.dumps({"model": "type0", "prompt": "x", "stream": stream}).encode()
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n%s" % (len(body), body))
            assert started.wait(5)
        assert seen_disconnect.wait(5), "the router kept its upstream request after the client left"


def test_a_pooled_connection_closed_as_it_is_reused_is_retried_once():
    """vLLM closes idle keep-alive connections; one closed just as the router reuses it must not
    become a 502. This upstream answers the first request on each connection and closes the
    connection on the second without a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    body = b'{"choices": []}'
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    def one_connection(conn: socket.socket) -> None:
        with conn:
            for n in range(2):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(rest) < length:
                    rest += conn.recv(65536)
                if n == 0:
                    conn.sendall(answer)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=one_connection, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        with real_client(f"http://127.0.0.1:{listener.getsockname()[1]}") as c:
            for _ in range(3):  # the 2nd and 3rd reuse a connection that is then closed
                r = c.post("/v1/completions", json={"model": "type0", "prompt": "x"})
                assert r.status_code == 200, r.text
    finally:
        listener.close()


def test_dead_upstream_is_a_5xx_within_5_seconds():
    with socket.socket() as free:  # nothing listens here any more: connection refused
        free.bind(("127.0.0.1", 0))
        refused = free.getsockname()[1]
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        for port, limits, status in ((refused, RouterLimits(), 502),
                                     (silent.getsockname()[1], RouterLimits(request_timeout=1.0), 504)):
            with real_client(f"http://127.0.0.1:{port}", limits) as c:
                t = time.monotonic()
                one_line_error(c.post("/v1/completions", json={"prompt": "x"}), status)
                assert time.monotonic() - t < 5


def test_serve_limits_are_options_and_checked(capsys):
    from emdpo_plugin.cli import main

    assert main(["serve", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--max-body-bytes", "--max-json-depth", "--request-timeout", "--max-stream-seconds"):
        assert option in text
    assert main(["serve", "routing.yaml", "--max-body-bytes", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-body-bytes: expected a positive number, got 0" in err


# --- under load: a router process in front of a fake vLLM process, 16 clients in flight --------

LOAD_WORKER = Path(__file__).with_name("router_load_worker.py")


@contextmanager
def worker(*args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """A router_load_worker.py process and its URL; killed on exit."""
    proc = subprocess.Popen([sys.executable, str(LOAD_WORKER), *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        url = f"http://127.0.0.1:{int(proc.stdout.readline())}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/v1/models", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None, f"{args[0]} did not start"
                time.sleep(0.05)
        yield proc, url
    finally:
        proc.kill()
        proc.wait()


def load_request(i: int) -> dict:
    """A mix like real traffic: plain, sticky (50 users), named adapter, chat, streamed."""
    if i % 10 == 3:
        return {"path": "/v1/chat/completions", "json": {"model": "ensemble", "messages": [{"role": "user",
                                                                                            "content": f"hi {i}"}]}}
    body = {"model": "ensemble", "prompt": f"the film {i} was", "max_tokens": 16}
    if i % 10 == 5:
        body["stream"] = True
    elif i % 5 == 1:
        body["user"] = f"user{i % 50}"
    elif i % 10 == 7:
        body["model"] = "type1"
    return {"path": "/v1/completions", "json": body}


async def run_load(url: str, n: int, clients: int = 16, on_done=None) -> list[tuple[int, float, str]]:
    """`n` requests from `clients` concurrent clients: (status, seconds, body) for each."""
    results: list[tuple[int, float, str]] = []
    todo = iter(range(n))
    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 limits=httpx.Limits(max_connections=clients)) as c:
        async def client():
            for i in todo:
                req = load_request(i)
                t = time.monotonic()
                async with c.stream("POST", req["path"], json=req["json"]) as r:
                    text = (await r.aread()).decode()
                results.append((r.status_code, time.monotonic() - t, text))
                if r.status_code == 200 and req["json"].get("stream"):
                    assert text.rstrip().endswith("data: [DONE]"), text
                if on_done:
                    on_done(len(results))
        await asyncio.gather(*(client() for _ in range(clients)))
    return results


def assert_answers_all_without_growing(url: str) -> None:
    """800 requests, every one 200; traced memory (and RSS) flat from one phase of 300 to the next."""
    phases = []
    for n in (200, 300, 300):  # warm-up (pool, caches, metrics' label sets), then two equal phases
        results = asyncio.run(run_load(url, n))
        assert [s for s, _, _ in results] == [200] * n, Counter(s for s, _, _ in results)
        phases.append(httpx.get(url + "/_memory", timeout=10).json())
    traced = [p["traced"] for p in phases]
    rss = [p["rss"] for p in phases]
    # measured: +5 KB from one phase to the next; a leak of 500 bytes a request (+150 KB) fails this
    assert traced[2] - traced[1] < 128 * 1024, f"traced memory after each phase: {traced}"
    assert rss[2] - rss[1] < 8 * 2**20, f"RSS after each phase: {rss}"


@pytest.mark.timeout(120)
def test_middleware_inside_vllm_under_load_answers_everything_without_growing():
    """The same load against the fake vLLM with the middleware in its process: nothing the
    middleware keeps per request (held answers, replayed bodies, label sets) may accumulate."""
    with worker("in-vllm") as (_, url):
        assert_answers_all_without_growing(url)


@pytest.mark.timeout(120)
def test_router_under_load_answers_everything_without_growing_and_5xx_when_vllm_dies():
    """800 requests from 16 clients: all 200; the router's traced memory does not grow from one
    phase of 300 requests to the next; the upstream SIGKILLed mid-load leaves no request
    unanswered, each answered within 5 s (a JSON 5xx once it is gone, pooled connections or not)."""
    t0 = time.monotonic()
    with worker("upstream") as (upstream, up_url), worker("router", up_url) as (router, url):
        assert_answers_all_without_growing(url)

        killed = []

        def kill_upstream(done: int) -> None:
            if done == 100 and not killed:
                upstream.kill()
                upstream.wait()
                killed.append(time.monotonic())

        results = asyncio.run(run_load(url, 300, on_done=kill_upstream))
        assert killed and router.poll() is None
        statuses = Counter(s for s, _, _ in results)
        assert set(statuses) <= {200, 502, 503, 504} and statuses[502] >= 150, statuses
        assert max(secs for _, secs, _ in results) < 5
        for status, _, text in results:
            if status != 200:
                assert "\n" not in text.strip() and json.loads(text)["error"]["code"] == status
        assert httpx.get(url + "/health", timeout=10).status_code == 503
        assert f'emdpo_errors_total{{reason="upstream_unreachable"}} {statuses[502]}.0' in httpx.get(
            url + "/metrics", timeout=10).text
    assert time.monotonic() - t0 < 60


def serve_process(path: Path, port: int, mode: str) -> subprocess.Popen:
    """`serve` (--router `mode`) in a process of its own, with the fake vLLM in vLLM's place."""
    return subprocess.Popen([sys.executable, str(LOAD_WORKER), "serve", str(path), str(port), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def wait_healthy(proc: subprocess.Popen, url: str) -> None:
    """Until `serve` says it serves (with the routing inside vLLM, vLLM's port answers before that)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "healthy after" in line:
            assert httpx.get(url + "/health", timeout=5).status_code == 200
            return
    raise AssertionError(f"serve exited before it was healthy: {''.join(seen)}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_sigterm_stops_the_router_and_a_live_vllm(tmp_path, mode):
    """uvicorn drains on SIGTERM and then re-raises the signal; `serve` must still stop vLLM's
    process group (it once died of the re-raised signal and left vLLM running). With the
    routing inside vLLM, `serve` supervises vLLM alone, and the same holds."""
    psutil = pytest.importorskip("psutil")
    path = _adapter_folders(tmp_path, rank=8)
    port = free_loopback_port()
    proc = serve_process(path, port, mode)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url)
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=10)
        assert r.status_code == 200 and r.headers["x-emdpo-adapter"] in WEIGHTS
        fake_vllm_pids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert fake_vllm_pids
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert out.splitlines()[-1] == ("router and vLLM stopped" if mode == "proxy" else "vLLM stopped"), out
        left = [p for p in fake_vllm_pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert left == [], f"vLLM processes left behind: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.timeout(120)
def test_in_vllm_serve_exits_when_vllm_dies(tmp_path):
    """No router is left to answer 503s when vLLM routes itself: `serve` must notice vLLM's death,
    say so with vLLM's last log lines, and exit non-zero (so a supervisor restarts it)."""
    path = _adapter_folders(tmp_path, rank=8)
    port = free_loopback_port()
    proc = serve_process(path, port, "in-vllm")
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        vllm = psutil_children(proc.pid)
        os.killpg(os.getpgid(vllm[0]), signal.SIGKILL)
        t = time.monotonic()
        assert proc.wait(timeout=30) == 1 and time.monotonic() - t < 5
        out = proc.stdout.read()
        assert "vLLM exited with code -9; last lines of" in out and "vLLM stopped" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()


def psutil_children(pid: int) -> list[int]:
    psutil = pytest.importorskip("psutil")
    return [p.pid for p in psutil.Process(pid).children()]


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_router_mode_options_are_checked(tmp_path, capsys):
    from emdpo_plugin.cli import main
    from emdpo_plugin.export.routing import write_routing

    path = _adapter_folders(tmp_path, rank=8)
    assert main(["serve", str(path), "--router", "in-vllm", "--vllm-port", "9000"]) == 2
    assert "--vllm-port: there is no separate router with --router in-vllm" in capsys.readouterr().err
    assert main(["serve", str(path), "--router-cpus", "0"]) == 2  # auto is in-vllm for a LoRA ensemble
    assert "--router-cpus: there is no separate router" in capsys.readouterr().err
    write_routing(path, routing().model_copy(update={"adapter_type": "full"}))
    assert main(["serve", str(path), "--router", "in-vllm"]) == 2
    assert "types are full models: use --router proxy" in capsys.readouterr().err


def test_in_vllm_plan_binds_the_public_address_and_loads_the_middleware(tmp_path):
    from emdpo_plugin.serve.in_vllm import ENV, MIDDLEWARE
    from emdpo_plugin.serve.vllm_server import plan_servers

    path = _adapter_folders(tmp_path, rank=8)
    env = middleware_env(routing(), 3, RouterLimits(max_json_depth=9))
    servers, _ = plan_servers(path, routing(), extra_args=[], log_dir=tmp_path, port=8123, host="0.0.0.0",
                              middleware=env)
    cmd = servers[0].command()
    assert cmd[cmd.index("--middleware") + 1] == MIDDLEWARE and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert servers[0].url == "http://127.0.0.1:8123"  # health checks go over loopback
    assert json.loads(servers[0].env[ENV]) == {"base_model": "base", "weights": WEIGHTS, "seed": 3, "limits": {
        "max_body_bytes": 4 * 2**20, "request_timeout": 600.0, "max_stream_seconds": 1800.0, "max_json_depth": 9}}
    os.environ.pop(ENV, None)
    with pytest.raises(Exception, match=f"needs the mixture in \\${ENV}"):
        MixtureMiddleware(fake_vllm())


def test_cpu_placement_options_env_and_defaults(monkeypatch, capsys):
    from emdpo_plugin.cli import main
    from emdpo_plugin.errors import EmdpoError
    from emdpo_plugin.serve.placement import CpuPlacement, parse_cpu_list

    for name in ("VLLM_CPU_NUM_OF_RESERVED_CPU", "GOMP_SPINCOUNT", "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.delenv(name, raising=False)
    assert CpuPlacement().vllm_env() == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "GOMP_SPINCOUNT": "10000"}
    monkeypatch.setenv("GOMP_SPINCOUNT", "500")  # the environment wins over a default ...
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    assert CpuPlacement().vllm_env()["GOMP_SPINCOUNT"] == "500"
    assert CpuPlacement().vllm_env()["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    placed = CpuPlacement(vllm_cpus="0", vllm_reserved_cpus=1, omp_spincount=7)  # ... an option over both
    assert placed.vllm_env() == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "GOMP_SPINCOUNT": "7",
                                 "VLLM_CPU_OMP_THREADS_BIND": "0"}
    assert parse_cpu_list("0-2,5", "--router-cpus") == {0, 1, 2, 5}
    allowed = min(os.sched_getaffinity(0))
    assert CpuPlacement(router_cpus=str(allowed)).router_cpu_set() == {allowed}
    with pytest.raises(EmdpoError, match="--router-cpus: CPUs \\[4096\\] are not available"):
        CpuPlacement(router_cpus="4096").router_cpu_set()
    assert main(["serve", "routing.yaml", "--router-cpus", "1-0"]) == 2
    assert "--router-cpus: expected a CPU list" in capsys.readouterr().err
    assert main(["serve", "routing.yaml", "--vllm-omp-spincount", "-1"]) == 2
    assert "--vllm-omp-spincount: expected 0 or more" in capsys.readouterr().err
