"""Headline cost of EM-DPO: wall time of a full EM-DPO run over one plain DPO run, same data and
machine, measured side by side in one invocation; plus what the reference cache and
responsibility sparsity save. Results go to benchmarks/results/ with the machine named.

    .venv/bin/python benchmarks/em_vs_dpo.py --users 100 --pairs 20 --iterations 3
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from emdpo_plugin.backends.openrlhf_backend import OpenRLHFBackend
from emdpo_plugin.data.schema import ComparisonSet
from emdpo_plugin.models.tiny import build_tiny_lm
from emdpo_plugin.trainers.em_dpo import EMConfig, _Checkpoint, run_em


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": __import__("os").cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--work", default="/tmp/emdpo-bench")
    ap.add_argument("--out", default="benchmarks/results/em_vs_dpo_cpu.json")
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    from data_builders.imdb_synthetic import build

    built = build({"source": {"kind": "generated"}, "users": a.users, "pairs_per_user": a.pairs, "test_size": 8}, seed=0)
    data = ComparisonSet(built.train)
    model = build_tiny_lm(sorted({r.prompt + x for r in built.train for x in r.responses})[:2000], work / "sft", sft_steps=100)
    cfg = {"pretrain": str(model), "max_len": 96, "eval_batch_size": 64, "lora": {"rank": 0},
           "train": {"lr": 1e-3, "micro_batch_size": 16, "batch_size": 32, "lr_warmup_steps": 5}}
    be = OpenRLHFBackend(cfg, seed=0, run_dir=work / "run")
    results: dict = {"machine": machine(), "data": {"comparisons": len(data), "annotators": data.n_annotators},
                     "config": {**cfg, "pretrain": "tiny (built here)"}, "runs": {}}

    t = time.perf_counter()
    be.ref_score(data)
    results["ref_scoring_s"] = time.perf_counter() - t

    t = time.perf_counter()
    be.fit(be.new_policy(0), data, np.ones(len(data)), warm=False, desc="dpo")
    results["runs"]["dpo"] = {"seconds": time.perf_counter() - t}

    for name, threshold in (("em_sparse", 0.01), ("em_dense", 0.0)):
        em = EMConfig(K=2, iterations=a.iterations, min_responsibility=threshold, init="dirichlet", init_concentration=0.3)
        before = dict(be.stats)
        t = time.perf_counter()
        state, _ = run_em(be, data, em, 0, _Checkpoint(work / name, name), name)
        seconds = time.perf_counter() - t
        rows = [sum(f.get("rows", 0) for f in it) for it in state["fit"]]
        results["runs"][name] = {
            "seconds": seconds, "iterations": state["iteration"], "rows_trained_per_iteration": rows,
            "ref_rows_computed": be.stats["ref_rows_computed"] - before["ref_rows_computed"],
            "ref_rows_served_from_cache": be.stats["ref_rows_cached"] - before["ref_rows_cached"],
        }
    dpo_s = results["runs"]["dpo"]["seconds"]
    results["ratios"] = {
        "em_sparse_over_dpo": results["runs"]["em_sparse"]["seconds"] / dpo_s,
        "em_dense_over_dpo": results["runs"]["em_dense"]["seconds"] / dpo_s,
        "sparse_over_dense": results["runs"]["em_sparse"]["seconds"] / results["runs"]["em_dense"]["seconds"],
        "reference_forward_passes_saved_by_cache": "each EM iteration reuses the dataset's reference log-probs: "
        "without the cache every M-step epoch would also run the reference forward (2N of the 8N FLOPs per token)",
    }
    results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({"ratios": results["ratios"], "runs": results["runs"], "peak_rss_gib": results["peak_rss_gib"]}, indent=2))


if __name__ == "__main__":
    main()
