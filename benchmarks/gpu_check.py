"""GPU check: the CPU recipe's language-model stages at ~1B parameters on one GPU, fully offline.

    python benchmarks/gpu_check.py --out DIR                # on a GPU machine (about 5 minutes)
    python benchmarks/gpu_check.py --out DIR --size tiny    # the same flow on CPU, to test the script

It derives a recipe from `recipes/emdpo_imdb_cpu.yaml`: the same data builder (generated
source, smaller), a random-initialised Llama-shaped model of ~1B parameters with its tokenizer
built locally and SFT'd through OpenRLHF (the `sft` stage's `model: tiny` at that size), then
`dpo`, `em` (EM-DPO, 2 iterations, no clustering input), `minmax` (HF sampler) and `report`.
The Cluster-DPO stages are left out: their sentence embedder is not on the GPU image.
It runs the recipe twice, in one process without a launcher and under
`torchrun --nproc_per_node 1`, and writes `gpu_check_<date>.json` into --out: per run the stage
times, peak GPU memory per stage, M-step tokens/s, EM's ARI, the per-group accuracies, and any
error. After the first run, stock OpenRLHF DPO (`openrlhf.cli.train_dpo`, single LoRA, its
reference model run every step) trains one epoch on the same rows, model and batch sizes
(`em_vs_dpo.stock_dpo`): `stock_dpo` holds its training-loop tokens/s and peak GPU memory, and the
ratios against the weighted-DPO M-steps and the `em` stage (K adapters). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    # hidden 2048, 20 layers, 16 heads (head_dim 128): 1.0 B parameters with a 2,000-token vocabulary
    "1b": {"stages.sft.config.hidden_size": 2048, "stages.sft.config.layers": 20, "stages.sft.config.heads": 16,
           "stages.sft.config.sft_steps": 60, "stages.sft.config.lr": 5.0e-4,
           "model.ds.zero_stage": 2, "model.ds.param_dtype": "bf16", "model.ds.torch_adam": True,
           "model.train.lr": 5.0e-4, "model.eval_batch_size": 128,
           "model.train.micro_batch_size": 16, "model.train.batch_size": 32},
    "tiny": {"stages.sft.config.sft_steps": 20, "stages.sft.config.max_texts": 300},
}
DATA = {"data.config.users": 120, "data.config.pairs_per_user": 20, "data.config.test_size": 64,
        "stages.em.config.iterations": 2, "stages.minmax.config.prompts": 32,
        "stages.minmax_w14.config.prompts": 32, "stages.report.config.regret_prompts": 32}
SMALL_DATA = {"data.config.users": 24, "data.config.pairs_per_user": 6, "data.config.test_size": 8,
              "stages.em.config.iterations": 2, "stages.minmax.config.prompts": 8,
              "stages.minmax_w14.config.prompts": 8, "stages.report.config.regret_prompts": 8,
              "model.generation.max_new_tokens": 8, "model.train.lr_warmup_steps": 0}
DROP = ("kmeans", "minmax_kmeans")  # need the sentence embedder's weights


def derive_recipe(size: str, out: Path, sft_model: Path | None = None) -> Path:
    """The CPU recipe with the sizes above and without the Cluster-DPO stages, as a YAML file.

    `sft_model`: use this SFT model folder instead of building one (the launcher run reuses the
    first run's, so the check fits in its time budget)."""
    from emdpo_plugin.recipe.loader import load_recipe

    overrides = {**(DATA if size == "1b" else SMALL_DATA), **SIZES[size]}
    if sft_model is not None:
        overrides["stages.sft.config.model"] = str(sft_model.resolve())
    raw = load_recipe(ROOT / "recipes" / "emdpo_imdb_cpu.yaml", [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    raw["stages"] = [s for s in raw["stages"] if s["name"] not in DROP]
    for s in raw["stages"]:
        s["inputs"] = {k: v for k, v in (s.get("inputs") or {}).items() if v not in DROP}
    raw.pop("extends", None)
    raw["name"] = f"gpu_check_{size}" + ("_prebuilt" if sft_model else "")
    path = out / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(cmd: list[str], run_dir: Path, log: Path, timeout: int) -> dict:
    """One run of the recipe; its summary from run.json and report/metrics.json."""
    from emdpo_plugin.dist import single_process_env

    env = single_process_env()
    # torch AdamW: DeepSpeed's fused Adam would JIT-compile with nvcc (minutes, and fails on "9.0a")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", EMDPO_TORCH_ADAM="1")
    t0 = time.perf_counter()
    with log.open("w") as fh:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result: dict = {"command": " ".join(cmd), "exit": rc, "wall_s": round(time.perf_counter() - t0, 1)}
    if rc != 0:
        result["error_tail"] = log.read_text(errors="replace")[-3000:]
    state_file = run_dir / "run.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        result["world_size"] = state.get("world_size")
        result["stages"] = {n: {k: st.get(k) for k in ("status", "seconds", "peak_gpu_mib", "peak_rss_mib", "error")}
                            for n, st in state["stages"].items()}
        fits = []
        for name in ("dpo", "em"):
            outputs = (state["stages"].get(name) or {}).get("outputs") or {}
            fits += [outputs["fit"]] if "fit" in outputs else []
        em_dir = run_dir / "em" / "restarts" / "r0" / "state.json"
        if em_dir.exists():
            fits += [f for it in json.loads(em_dir.read_text()).get("fit", []) for f in it]
        timed = [f for f in fits if f.get("tokens") and f.get("seconds")]
        if timed:
            result["mstep_tokens_per_s"] = round(sum(f["tokens"] for f in timed) / sum(f["seconds"] for f in timed), 1)
            result["mstep_fits_timed"] = len(timed)
    metrics_file = run_dir / "report" / "metrics.json"
    if metrics_file.exists():
        m = json.loads(metrics_file.read_text())
        result["em_ari"] = (m.get("clustering", {}).get("em") or {}).get("ari")
        result["accuracy"] = {p: {g: v.get("accuracy") for g, v in d["per_group"].items()}
                              for p, d in m.get("policies", {}).items()}
    return result


def against_stock(run_dir: Path, recipe: Path, work: Path, ours: dict) -> dict:
    """Stock OpenRLHF DPO on the first run's rows and SFT model, against that run's numbers.

    Tokens per second: our `dpo` stage's real (unpadded) token count for its one epoch over the
    same rows, over the stock training loop's seconds (model loading and engine set-up excluded
    on both sides). Memory: peak allocated GPU memory of the whole stock run against our `dpo`
    stage (one LoRA, cached reference) and `em` stage (K adapters)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from em_vs_dpo import stock_dpo

    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("EMDPO_TORCH_ADAM", "1")  # as `run`: no fused-Adam JIT compile on the GPU image
    try:
        stock = stock_dpo(run_dir, yaml.safe_load(recipe.read_text()), work)
    except SystemExit as exc:
        return {"error": str(exc)}
    state = json.loads((run_dir / "run.json").read_text())["stages"]
    dpo_fit = (state.get("dpo", {}).get("outputs") or {}).get("fit") or {}
    out = {**stock, "tokens": dpo_fit.get("tokens")}
    if stock["fit_seconds"] and dpo_fit.get("tokens"):
        out["tokens_per_s"] = round(dpo_fit["tokens"] / stock["fit_seconds"], 1)
        if ours.get("mstep_tokens_per_s"):
            out["mstep_over_stock_tokens_per_s"] = round(ours["mstep_tokens_per_s"] / out["tokens_per_s"], 3)
    for stage in ("dpo", "em"):
        peak = (ours.get("stages", {}).get(stage) or {}).get("peak_gpu_mib")
        if peak and stock["peak_gpu_mib"]:
            out[f"{stage}_over_stock_peak_gpu_mib"] = round(peak / stock["peak_gpu_mib"], 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for runs, logs and the result JSON")
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--timeout", type=int, default=300, help="seconds for the first run (the second gets 2/3)")
    ap.add_argument("--skip-launcher", action="store_true", help="only the run without a launcher")
    ap.add_argument("--skip-stock", action="store_true", help="no stock OpenRLHF DPO comparison")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    recipe = derive_recipe(args.size, args.out)
    report = {"date": dt.date.today().isoformat(), "size": args.size, "recipe": recipe.name,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "runs": {}}
    py = sys.executable
    plain = args.out / "plain"
    runs = [("no_launcher", lambda: [py, "-m", "emdpo_plugin", "run", str(recipe), "--output-dir", str(plain)],
             args.timeout)]
    if not args.skip_launcher:
        def launcher_cmd() -> list[str]:
            built = plain / "sft" / "model"
            rec = derive_recipe(args.size, args.out, built) if (built / "config.json").exists() else recipe
            report["launcher_recipe"] = rec.name
            return [py, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "emdpo_plugin", "run",
                    str(rec), "--output-dir", str(args.out / "torchrun")]
        runs.append(("torchrun_1", launcher_cmd, args.timeout * 2 // 3))
    for name, make_cmd, timeout in runs:
        cmd = make_cmd()
        run_dir = Path(cmd[-1])
        print(f"[gpu_check] {name}: {' '.join(cmd)}", flush=True)
        report["runs"][name] = run(cmd, run_dir, args.out / f"{name}.log", timeout)
        r = report["runs"][name]
        print(f"[gpu_check] {name}: exit {r['exit']} in {r['wall_s']} s; ARI {r.get('em_ari')}; "
              f"M-step tokens/s {r.get('mstep_tokens_per_s')}", flush=True)
        if name == "no_launcher" and r["exit"] == 0 and not args.skip_stock:
            report["stock_dpo"] = against_stock(plain, recipe, args.out / "stock", r)
            print(f"[gpu_check] stock DPO: {report['stock_dpo']}", flush=True)
    path = args.out / f"gpu_check_{report['date']}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if all(r["exit"] == 0 for r in report["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
