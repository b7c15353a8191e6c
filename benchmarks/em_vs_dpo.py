"""What EM-DPO costs next to one DPO run: the whole `em_dpo` stage over one `dpo` stage.

Both run as real stages of one `openrlhf run` on the CPU demo's data and model (recipes/
emdpo_imdb_cpu.yaml: 200 annotators x 25 comparisons, the tiny Llama, LoRA): after an untimed
warm-up stage (a short DPO fit that also scores the reference log-probs, reported separately
as `ref_s`), `dpo` and `em` stages alternate `--repeats` times, so drift on the machine hits
both arms alike. Numerator: the whole EM stage (start, every iteration, the final E-step,
checkpoints, saving); denominator: one DPO stage of one epoch. Each EM run's ARI against the
labelled groups, iterations, rows trained, pairs scored and its time split (train, score,
engine, checkpoint) come from the stage's own outputs. `stock_dpo_s`: the host's own
`openrlhf.cli.train_dpo.train` for one epoch on the same rows, model and batch sizes (the
reference model runs every step there), a second denominator.

    .venv/bin/python benchmarks/em_vs_dpo.py --K 2 --repeats 3 --out benchmarks/results/em_vs_dpo_cpu_DATE.json

The result file must not exist (results are never overwritten: pick a new dated name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "emdpo_imdb_cpu.yaml"


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} CPU cores, no GPU"


def commit() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def bench_recipe(K: int, repeats: int, em_overrides: dict[str, Any] | None = None,
                 model_overrides: list[str] | None = None) -> dict[str, Any]:
    """The CPU demo recipe with its stages replaced by warm-up, then dpo / em alternating;
    `model_overrides` are the loader's dotted overrides under `model.` (both arms get them)."""
    from emdpo_plugin.recipe.loader import load_recipe

    recipe = load_recipe(RECIPE, [f"model.{o}" for o in model_overrides or []])
    stages = {s["name"]: s for s in recipe["stages"]}
    em_config = {**stages["em"]["config"], **(em_overrides or {}), "K": K}
    out = [stages["data"], stages["sft"],
           {"name": "warmup", "trainer": "dpo", "inputs": {"dataset": "data"}, "config": {"epochs": 0.2}}]
    for r in range(repeats):
        out.append({"name": f"dpo_r{r}", "trainer": "dpo", "inputs": {"dataset": "data"}, "config": {"epochs": 1}})
        out.append({"name": f"em_r{r}", "trainer": "em_dpo", "inputs": {"dataset": "data"}, "config": em_config})
    recipe["stages"] = out
    recipe.pop("output_dir", None)
    recipe["name"] = f"em_vs_dpo_K{K}"
    return recipe


STOCK = """
import json, sys, time
from emdpo_plugin.host.compat import apply_cpu_compat
from emdpo_plugin.host.args import make_args
apply_cpu_compat()
import torch
from openrlhf.cli.train_dpo import train
from openrlhf.trainer.dpo_trainer import DPOTrainer
fit = DPOTrainer.fit
def timed_fit(self, *args, **kwargs):  # the training loop alone: no model loading, no engine set-up
    t = time.perf_counter()
    out = fit(self, *args, **kwargs)
    print("STOCK_FIT_SECONDS", time.perf_counter() - t, flush=True)
    return out
DPOTrainer.fit = timed_fit
cfg = json.loads(sys.argv[1])
args = make_args(cfg)
t = time.perf_counter()
train(args)
print("STOCK_SECONDS", time.perf_counter() - t)
if torch.cuda.is_available():
    print("STOCK_PEAK_GPU_MIB", torch.cuda.max_memory_allocated() / 2**20)
"""


def stock_dpo(run: Path, recipe: dict[str, Any], work: Path) -> dict[str, float | None]:
    """The host's own DPO CLI (`train`) for one epoch on the same rows, model and batch sizes:
    `seconds` (all of `train`), `fit_seconds` (its training loop) and `peak_gpu_mib` (None on CPU)."""
    from emdpo_plugin.data.io import load_dataset_dir

    state = json.loads((run / "run.json").read_text())
    data = load_dataset_dir(run / state["stages"]["data"]["outputs"]["dir"]).train
    rows = work / "stock.jsonl"
    with rows.open("w") as f:
        for p, rs, rk in zip(data.prompts, data.responses, data.rankings):
            f.write(json.dumps({"prompt": p, "chosen": rs[int(rk[0])], "rejected": rs[int(rk[1])]}) + "\n")
    model = run / state["stages"]["sft"]["outputs"]["model"]
    m, tr = recipe["model"], recipe["model"]["train"]
    cfg = {"model.model_name_or_path": str(model), "ref.model_name_or_path": str(model), "data.dataset": str(rows),
           "data.max_len": m["max_len"], "train.micro_batch_size": tr["micro_batch_size"],
           "train.batch_size": tr["batch_size"], "train.max_epochs": 1, "adam.lr": tr["lr"],
           "lr_warmup_ratio": 0.03, "ds.lora.rank": m["lora"]["rank"], "ds.lora.alpha": m["lora"]["alpha"],
           "ds.zero_stage": m["ds"]["zero_stage"], "ds.param_dtype": m["ds"]["param_dtype"],
           "ckpt.output_dir": str(work / "stock_ckpt"), "ckpt.path": str(work / "stock_ckpt")}
    t = time.perf_counter()
    from emdpo_plugin.dist import single_process_env

    proc = subprocess.run([sys.executable, "-c", STOCK, json.dumps(cfg)], capture_output=True, text=True, cwd=work,
                          env=single_process_env())
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit("stock openrlhf DPO failed (stderr above)")

    def printed(key: str) -> float | None:
        found = [float(x.split()[1]) for x in proc.stdout.splitlines() if x.startswith(key + " ")]
        return found[-1] if found else None

    return {"seconds": printed("STOCK_SECONDS") or wall, "fit_seconds": printed("STOCK_FIT_SECONDS"),
            "peak_gpu_mib": printed("STOCK_PEAK_GPU_MIB")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="result JSON (a new file; never overwritten)")
    ap.add_argument("--K", type=int, default=2, help="EM types (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="dpo/em pairs, alternating (default 3)")
    ap.add_argument("--no-stock", action="store_true", help="skip the stock OpenRLHF DPO denominator")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--em", action="append", default=[], metavar="KEY=VALUE",
                    help="override an em_dpo config key of the recipe (YAML value), e.g. --em warm_epochs=0.5")
    ap.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                    help="override a model key for both arms (dotted), e.g. --model train.optimizer_state=fresh")
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"{out} exists: results are never overwritten, give a new name")
    started_at = commit()  # the code that runs (read before anything can change the tree)
    work = Path(a.work or tempfile.mkdtemp(prefix="em_vs_dpo_"))
    work.mkdir(parents=True, exist_ok=True)
    recipe = bench_recipe(a.K, a.repeats, {k: yaml.safe_load(v) for k, v in (e.split("=", 1) for e in a.em)},
                          a.model)
    (work / "bench.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = work / "run"
    openrlhf = str(Path(sys.executable).parent / "openrlhf")
    subprocess.run([openrlhf, "run", str(work / "bench.yaml"), "--output-dir", str(run)], check=True)
    stages = json.loads((run / "run.json").read_text())["stages"]
    dpo_s = [stages[f"dpo_r{r}"]["seconds"] for r in range(a.repeats)]
    em_s = [stages[f"em_r{r}"]["seconds"] for r in range(a.repeats)]
    ratios = [e / d for e, d in zip(em_s, dpo_s)]
    ems = [stages[f"em_r{r}"]["outputs"] for r in range(a.repeats)]
    result = {
        "device": device(), "commit": started_at, "K": a.K, "repeats": a.repeats,
        "data": "recipes/emdpo_imdb_cpu.yaml data (imdb_synthetic generated, 200 annotators x 25 comparisons)",
        "model": {k: recipe["model"][k] for k in ("max_len", "lora", "train", "ds")},
        "em_config": recipe["stages"][4]["config"],
        "dpo_s": dpo_s, "em_s": em_s, "ratios": ratios, "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "ref_s": ems[0].get("backend_stats", {}).get("ref_seconds"),
        "ari": [o.get("ari") for o in ems],
        "iterations": [o.get("iterations") for o in ems],
        "rows_trained": [o.get("cost", {}).get("rows_trained") for o in ems],
        "pairs_scored": [o.get("cost", {}).get("pairs_scored") for o in ems],
        "components": [o.get("cost", {}).get("seconds") for o in ems],
    }
    if not a.no_stock:
        stock = stock_dpo(run, recipe, work)
        result["stock_dpo_s"], result["stock_dpo_fit_s"] = stock["seconds"], stock["fit_seconds"]
        result["ratio_median_vs_stock"] = statistics.median(em_s) / result["stock_dpo_s"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("device", "K", "dpo_s", "em_s", "ratio_median", "ari", "iterations",
                                             "rows_trained", "pairs_scored", "components")
                      if k in result} | {"stock_dpo_s": result.get("stock_dpo_s")}, indent=2))


if __name__ == "__main__":
    main()
