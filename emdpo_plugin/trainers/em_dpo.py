"""`em_dpo` stage: soft EM over latent annotator types (paper Algorithm 1).

Each iteration: M-step (a weighted DPO per type, warm-started from the previous policies unless
`warm_start: false`, plus the closed-form eta update), then E-step (score every comparison under every type, posterior
per annotator in log space). The observed log-likelihood is recorded every iteration.

Initialisation: every type starts at the reference, so EM would sit at its symmetric fixed
point. Two seeded ways out: `init: seeded` (default) is k-means++ in likelihood space: type 0 is
fitted to one random annotator's comparisons, each next type to an annotator drawn with
probability proportional to the squared per-comparison NLL under the closest type so far;
the first E-step starts from those policies. `init: dirichlet` draws random soft assignments
instead (slower to separate small groups). `restarts` runs EM from several seeds and keeps the
run with the best final log-likelihood.

A checkpoint is written after every finished iteration; a killed run resumed with the same
config continues from the last finished iteration.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field
from tqdm.auto import tqdm

from ..algorithms.em import annotator_loglik, comparison_weights, dirichlet_responsibilities, e_step, update_eta
from ..data.schema import ComparisonSet
from ..executors import Executor, FitJob, LocalExecutor
from .base import StageConfig, StageContext, Trainer
from .common import dataset_from, rel_path, run_path


LOCAL = LocalExecutor()


class EMConfig(StageConfig):
    K: int = Field(2, ge=1, description="number of latent annotator types")
    iterations: int = Field(10, ge=1, description="maximum EM iterations")
    tol: float = Field(0.0, ge=0, description="stop when the log-likelihood gains less than tol (relative)")
    min_responsibility: float = Field(0.0, ge=0, lt=1, description="M-step skips rows whose annotator's g_ik is below this")
    init: Literal["seeded", "dirichlet"] = Field("seeded", description="symmetry breaking: likelihood k-means++ seeding or random responsibilities (ignored when inputs.init names a clustering stage)")
    init_smoothing: float = Field(0.1, ge=0, lt=1, description="inputs.init: hard assignments g become (1-s) g + s/K")
    init_concentration: float = Field(1.0, gt=0, description="Dirichlet concentration (init: dirichlet)")
    warm_start: bool = Field(True, description="M-steps continue from the previous policies; false: each M-step refits from the reference (same budget for every type)")
    restarts: int = Field(1, ge=1, description="EM runs from different seeds; the best log-likelihood wins")
    seed: int | None = None


def seed_policies(backend: Any, data: ComparisonSet, ref: np.ndarray, K: int, seed: int,
                  executor: Executor = LOCAL) -> list[Any]:
    """k-means++ in likelihood space: one annotator's comparisons per type, spread-out annotators."""
    rng = np.random.default_rng(seed)
    idx, n = data.annotator_index, data.n_annotators
    per_annotator = np.bincount(idx, minlength=n)
    nll = np.full(n, np.inf)
    chosen = [int(rng.integers(n))]
    policies: list[Any] = []
    for k in range(K):
        policy = backend.new_policy(seed + 1000 * k)
        backend.fit(policy, data, (idx == chosen[-1]).astype(np.float64), warm=False, desc=f"seed type{k}")
        policies.append(policy)
        if k == K - 1:
            break
        ll = executor.loglik_many(backend, [policy], data, ref)
        nll = np.minimum(nll, -annotator_loglik(ll, idx, n)[:, 0] / np.maximum(per_annotator, 1))
        d2 = np.where(np.isin(np.arange(n), chosen), 0.0, nll**2)
        chosen.append(int(rng.choice(n, p=d2 / d2.sum())) if d2.sum() > 0 else int(rng.integers(n)))
    return policies


class _Checkpoint:
    """One restart's state after its last finished iteration, replaced atomically."""

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root, self.fingerprint = root, fingerprint

    def load(self, backend: Any) -> tuple[dict[str, Any], list[Any], np.ndarray] | None:
        state_file = self.root / "state.json"
        if not state_file.exists():
            return None
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") != self.fingerprint:
            return None
        policies = [backend.load(self.root / f"type{k}") for k in range(len(state["eta"]))]
        return state, policies, np.load(self.root / "comparison_ll.npy")

    def save(self, backend: Any, state: dict[str, Any], policies: list[Any], comparison_ll: np.ndarray) -> None:
        tmp = self.root.with_name(self.root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for k, p in enumerate(policies):
            backend.save(p, tmp / f"type{k}")
        np.save(tmp / "comparison_ll.npy", comparison_ll)
        (tmp / "state.json").write_text(json.dumps({**state, "fingerprint": self.fingerprint}))
        old = self.root.with_name(self.root.name + ".old")
        if self.root.exists():
            self.root.rename(old)
        tmp.rename(self.root)
        shutil.rmtree(old, ignore_errors=True)


def m_step(backend: Any, policies: list[Any], data: ComparisonSet, weights: np.ndarray, ref: np.ndarray,
           prev_ll: np.ndarray | None, warm: bool, desc: str,
           executor: Executor = LOCAL) -> tuple[list[Any], np.ndarray, list[dict[str, Any]]]:
    """Weighted DPO per type, then score every comparison under the new policies.

    Generalised-EM guard: a type whose new policy lowers its weighted objective
    `sum_j w_jk ll_k(j)` keeps its previous policy, so the observed log-likelihood can only grow
    (an M-step solved by a few epochs of SGD is not guaranteed to improve it).
    """
    previous = [copy.deepcopy(p) for p in policies] if prev_ll is not None else None
    fits = executor.fit_many(backend, data, [FitJob(p, weights[:, k], warm, f"{desc} type{k}")
                                             for k, p in enumerate(policies)])
    ll = executor.loglik_many(backend, policies, data, ref)
    if previous is not None:
        for k in range(len(policies)):
            if weights[:, k] @ ll[:, k] < weights[:, k] @ prev_ll[:, k]:
                policies[k], ll[:, k] = previous[k], prev_ll[:, k]
                fits[k] = {**fits[k], "kept_previous": True}
    return policies, ll, fits


def run_em(backend: Any, data: ComparisonSet, cfg: EMConfig, seed: int, ckpt: _Checkpoint, desc: str,
           init_resp: np.ndarray | None = None, executor: Executor = LOCAL) -> tuple[dict[str, Any], list[Any]]:
    """One EM run from one seed; returns (state, policies). Resumes from `ckpt` if present.

    `init_resp` (annotators x K), e.g. another stage's clustering, replaces the seeded start."""
    ref = backend.ref_score(data)  # once per dataset, never inside the loop
    loaded = ckpt.load(backend)
    if loaded is not None:
        state, policies, ll = loaded
        if state["done"]:
            return state, policies
        state.setdefault("resumed_from_iteration", []).append(state["iteration"])
        log_resp = np.array(state["log_resp"])
    else:
        ll = None
        if init_resp is not None:
            policies = [backend.new_policy(seed + 1000 * k) for k in range(cfg.K)]
            log_resp = np.log((1 - cfg.init_smoothing) * init_resp + cfg.init_smoothing / cfg.K)
        elif cfg.init == "seeded":
            policies = seed_policies(backend, data, ref, cfg.K, seed, executor)
            ll = executor.loglik_many(backend, policies, data, ref)
            log_resp = e_step(ll, data.annotator_index, data.n_annotators, np.full(cfg.K, 1.0 / cfg.K)).log_resp
        else:
            policies = [backend.new_policy(seed + 1000 * k) for k in range(cfg.K)]
            log_resp = np.log(dirichlet_responsibilities(data.n_annotators, cfg.K, seed, cfg.init_concentration))
        state = {"iteration": 0, "log_likelihood": [], "eta_trace": [], "fit": [], "done": False}
    bar = tqdm(total=cfg.iterations, initial=state["iteration"], desc=desc, leave=False)
    while state["iteration"] < cfg.iterations:
        eta = update_eta(log_resp)
        weights = comparison_weights(np.exp(log_resp), data.annotator_index, cfg.min_responsibility)
        warm = cfg.warm_start and (state["iteration"] > 0 or (cfg.init == "seeded" and init_resp is None))
        policies, ll, fits = m_step(backend, policies, data, weights, ref, ll, warm, desc, executor)
        est = e_step(ll, data.annotator_index, data.n_annotators, eta)
        log_resp = est.log_resp
        trace = state["log_likelihood"]
        gain = est.log_likelihood - trace[-1] if trace else float("inf")
        trace.append(est.log_likelihood)
        state["eta_trace"].append(eta.tolist())
        state["fit"].append(fits)
        state["iteration"] += 1
        state.update(eta=eta.tolist(), log_resp=log_resp.tolist())
        converged = abs(gain) <= cfg.tol * abs(est.log_likelihood)
        state["done"] = converged or state["iteration"] >= cfg.iterations
        ckpt.save(backend, state, policies, ll)
        bar.update(1)
        bar.set_postfix(loglik=f"{est.log_likelihood:.3f}", eta=np.round(eta, 3).tolist())
        if converged:
            break
    bar.close()
    return state, policies


def clustering_from(ctx: StageContext, outputs: dict[str, Any], annotator_ids: list[str], K: int) -> np.ndarray:
    """Responsibilities recorded by a clustering stage, aligned to this dataset's annotators."""
    from ..errors import RecipeError

    if not outputs.get("clustering"):
        raise RecipeError(f"stages.{ctx.stage_name}.inputs.init: that stage produced no clustering")
    cl = json.loads(run_path(ctx, outputs["clustering"]).read_text())
    resp = np.asarray(cl["responsibilities"], dtype=np.float64)
    if resp.shape[1] != K:
        raise RecipeError(f"stages.{ctx.stage_name}.inputs.init: that clustering has {resp.shape[1]} types, config.K is {K}")
    pos = {a: i for i, a in enumerate(cl["annotator_ids"])}
    missing = [a for a in annotator_ids if a not in pos]
    if missing:
        raise RecipeError(f"stages.{ctx.stage_name}.inputs.init: annotators {missing[:3]} are not in that clustering")
    return resp[[pos[a] for a in annotator_ids]]


class EMDPOStage(Trainer):
    name = "em_dpo"
    description = "EM-DPO: soft EM over K latent annotator types, each M-step a weighted DPO."
    Config = EMConfig
    input_slots = {"dataset": "a stage that produced a dataset (data)",
                   "init": "a clustering stage (cluster_dpo) whose assignments start EM"}
    required_inputs = ("dataset",)

    def run(self, ctx: StageContext, config: EMConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        data = dataset_from(ctx, inputs["dataset"]).train
        init_resp = None
        if "init" in inputs:
            init_resp = clustering_from(ctx, inputs["init"], data.annotator_ids, config.K)
        backend = ctx.backend
        base_seed = ctx.seed if config.seed is None else config.seed
        fingerprint = hashlib.sha256(json.dumps([config.model_dump(), ctx.recipe.get("model", {}),
                                                 inputs["dataset"]], sort_keys=True, default=str).encode()).hexdigest()
        runs = []
        for r in range(config.restarts):
            ckpt = _Checkpoint(ctx.out_dir / "restarts" / f"r{r}", fingerprint)
            state, policies = run_em(backend, data, config, base_seed + r, ckpt, f"{ctx.stage_name} restart {r}", init_resp,
                                     ctx.executor)
            runs.append((state["log_likelihood"][-1], r, state, policies))
        best_ll, best_r, state, policies = max(runs, key=lambda t: t[0])
        out = ctx.out_dir
        names = {}
        for k, p in enumerate(policies):
            backend.save(p, out / f"type{k}")
            names[f"{ctx.stage_name}/type{k}"] = rel_path(ctx, out / f"type{k}")
        clustering = {
            "annotator_ids": data.annotator_ids,
            "responsibilities": np.exp(np.array(state["log_resp"])).tolist(),
            "eta": state["eta"],
            "log_likelihood": state["log_likelihood"],
            "eta_trace": state["eta_trace"],
            "restarts": [{"restart": r, "final_log_likelihood": ll} for ll, r, _, _ in runs],
            "chosen_restart": best_r,
            "resumed_from_iteration": state.get("resumed_from_iteration", []),
        }
        (out / "clustering.json").write_text(json.dumps(clustering))
        return {"policies": names, "clustering": rel_path(ctx, out / "clustering.json"),
                "rows_trained_per_iteration": [[f.get("rows") for f in it] for it in state["fit"]],
                "backend_stats": dict(getattr(backend, "stats", {})),
                "iterations": state["iteration"], "log_likelihood": best_ll, "eta": state["eta"]}
