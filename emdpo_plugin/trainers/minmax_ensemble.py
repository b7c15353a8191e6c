"""`minmax_ensemble` stage: min-max-regret mixture weights over type policies (paper Algorithm 2).

L[z, z'] = E_{x ~ D, y ~ pi_z'}[s_z(x, y) - s_ref(x, y)] is estimated by sampling from every
type policy, or computed exactly in y where the backend can sum over its responses (the bandit's
arms: `SupportsExactExpectation.exact_L`); the (K+1) x K regret game is solved with optimistic Hedge and cross-checked
against the exact LP value. The result is a sequence-level mixture: per request, type k with
probability w_k.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import Field
from tqdm.auto import tqdm

from ..algorithms.defaults import HEDGE_ETA, HEDGE_STEPS
from ..algorithms.minmax import game_value_lp, optimistic_hedge, regret_matrix
from ..backends.base import SupportsExactExpectation, SupportsExport, SupportsVLLMSampling
from .base import StageConfig, StageContext, Trainer, seed_field
from .. import __version__, tracking
from ..artifacts import Slot
from ..errors import EmdpoError, RecipeError
from ..export.routing import RoutingConfig, mixture_entries, write_routing
from ..eval.evaluate import clustering_report
from .common import dataset_from, policies_from, prompts_from, rel_path, run_path, stage_seed


class MinMaxConfig(StageConfig):
    eta: float = Field(HEDGE_ETA, gt=0, description="optimistic Hedge step size (paper Table 2: 0.05)")
    steps: int = Field(HEDGE_STEPS, ge=1, description="optimistic Hedge iterations (paper: 10,000)")
    priority: list[float] | dict[str, float] | None = Field(None, description=(
        "priority weights c_k of the weighted variant: a list per type, or {group: c} for data with "
        "labelled groups (each type takes the priority of the group it is matched to)"))
    prompts: int = Field(512, ge=1, description="prompts x ~ D for estimating L (paper: 512)")
    samples_per_prompt: int = Field(1, ge=1, description="responses sampled per prompt and type for L (sampled L)")
    L_method: Literal["auto", "exact", "sampled"] = Field("auto", description=(
        "how E_{y ~ pi_z'} in L is taken: exact (a sum over responses; backends with `exact_L`, e.g. the "
        "bandit's arms), sampled (y drawn from each type policy), or auto (exact where the backend offers it)"))
    sampler: Literal["hf", "vllm"] = Field("hf", description=(
        "who samples y ~ pi_k for L: the training stack (HF generate) or vLLM's offline engine with one "
        "LoRARequest per type; scoring always runs on the training stack"))
    seed: int | None = seed_field("the prompt draw and sampling")


Sampler = Callable[[int], list[list[str]]]  # type index -> completions per prompt


def estimate_L(backend: Any, policies: list[Any], prompts: list[str], sample: Sampler) -> np.ndarray:
    """L[z, z'] by sampling y ~ pi_z' and scoring under every pi_z and the reference."""
    K = len(policies)
    L = np.zeros((K, K))
    for j in tqdm(range(K), desc="regret matrix", leave=False):
        samples = sample(j)
        ref = backend.score(None, prompts, samples)
        for i, pi in enumerate(policies):
            L[i, j] = float(np.mean(backend.score(pi, prompts, samples) - ref))
    return L


def resolve_L_method(ctx: StageContext, config: MinMaxConfig, backend: Any) -> Literal["exact", "sampled"]:
    """`auto` takes the exact sum over responses whenever the backend offers `exact_L`."""
    exact = isinstance(backend, SupportsExactExpectation)
    if config.L_method == "exact" and not exact:
        raise RecipeError(f"stages.{ctx.stage_name}.config.L_method: 'exact' needs a backend that can sum over "
                          f"its responses; {type(backend).__name__} has no exact_L, use 'sampled'")
    if config.L_method == "auto":
        return "exact" if exact else "sampled"
    return config.L_method


def save_policies(ctx: StageContext, backend: Any, names: list[str], policies: list[Any]) -> dict[str, Path]:
    """Each type policy under `<stage>/adapters/<typeK>` (PEFT adapter or full model folder)."""
    dirs = {}
    for name, policy in zip(names, policies):
        short = name.split("/")[-1]
        dirs[short] = ctx.out_dir / "adapters" / short
        backend.save(policy, dirs[short])
    return dirs


def export_routing(ctx: StageContext, backend: Any, dirs: dict[str, Path], names: list[str], weights: np.ndarray,
                   config: MinMaxConfig) -> str:
    """`<stage>/routing.yaml` naming the saved type policies and their mixture weights."""
    out = ctx.out_dir
    entries = mixture_entries(list(dirs), weights)
    cfg = RoutingConfig(base_model=backend.base_model, adapter_type=backend.adapter_type, adapters=entries,
                        meta={"beta": backend.beta, "K": len(names), "policies": names, "recipe": ctx.recipe.get("name"),
                              "priority": config.priority, "created_by": f"emdpo_plugin {__version__}"})
    write_routing(out / "routing.yaml", cfg)
    return rel_path(ctx, out / "routing.yaml")


def resolve_priority(ctx: StageContext, priority: list[float] | dict[str, float] | None,
                     inputs: dict[str, dict[str, Any]], K: int) -> np.ndarray | None:
    """Per-type priorities. `{group: c}` (the paper's "(1,4)" is per group) is mapped through the
    Hungarian type-to-group matching of the policies stage's clustering against the data's labels."""
    where = f"stages.{ctx.stage_name}.config.priority"
    if priority is None:
        return None
    if isinstance(priority, list):
        if len(priority) != K or any(c <= 0 for c in priority):
            raise RecipeError(f"{where}: expected {K} positive numbers (one per type), got {priority}")
        return np.asarray(priority, dtype=np.float64)
    clustering = inputs["policies"].get("clustering")
    if clustering is None or "dataset" not in inputs:
        raise RecipeError(f"{where}: a {{group: c}} mapping needs a policies stage with a clustering (em_dpo, "
                          f"cluster_dpo) and a dataset input with annotator groups")
    train = dataset_from(ctx, inputs["dataset"]).train
    groups = dict(zip(train.annotator_ids, train.annotator_groups()))
    cl = json.loads(run_path(ctx, clustering).read_text())
    # group name -> matched type index
    matched = clustering_report(cl["annotator_ids"], np.asarray(cl["responsibilities"]), groups)["type_to_group"]
    if set(priority) != set(groups.values()) or any(c <= 0 for c in priority.values()):
        raise RecipeError(f"{where}: expected a positive priority for each group {sorted(set(groups.values()))}, "
                          f"got {priority}")
    c = np.ones(K)  # a type matched to no group (K > groups) keeps priority 1
    for group, k in matched.items():
        c[k] = priority[group]
    return c


def _track(stage: str, trajectory: np.ndarray, weights: np.ndarray, hedge_value: float, lp_value: float) -> None:
    """The weights along the Hedge steps (at most 200 points) and the final game, for the tracker."""
    tracker = tracking.active()
    if tracker is None:
        return
    every = max(1, len(trajectory) // 200)
    for t in range(0, len(trajectory), every):
        tracker.scalars(f"{stage}/hedge", {f"weight_{k}": w for k, w in enumerate(trajectory[t])}, t)
    tracker.scalars(stage, {"hedge_value": hedge_value, "lp_value": lp_value,
                            **{f"weight_{k}": w for k, w in enumerate(weights)}}, 0)


class MinMaxEnsembleStage(Trainer):
    name = "minmax_ensemble"
    description = "MinMax-DPO: min-max-regret mixture weights over an earlier stage's type policies."
    Config = MinMaxConfig
    input_slots = {"policies": Slot(("policies",), "the type policies to mix (em_dpo, cluster_dpo)"),
                   "dataset": Slot(("dataset",), "draw the prompts x ~ D from its training prompts (language models)")}
    produces = ("ensemble",)
    required_inputs = ("policies",)

    def run(self, ctx: StageContext, config: MinMaxConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        backend = ctx.backend
        named = policies_from(ctx, inputs["policies"])
        names, policies = list(named), list(named.values())
        seed = stage_seed(ctx, config)
        if "dataset" in inputs:
            prompts = prompts_from(dataset_from(ctx, inputs["dataset"]).train, config.prompts, seed)
        else:
            prompts = backend.sample_prompts(config.prompts, seed)
        n = config.samples_per_prompt
        lm = isinstance(backend, SupportsExport)  # language-model backends save adapters and export routing
        dirs = save_policies(ctx, backend, names, policies) if lm else {}
        t = time.perf_counter()
        method = resolve_L_method(ctx, config, backend)
        if method == "exact":
            L = np.asarray(backend.exact_L(policies, prompts), dtype=np.float64)
        else:
            if config.sampler == "vllm":
                if not isinstance(backend, SupportsVLLMSampling):
                    raise EmdpoError(f"stages.{ctx.stage_name}.config.sampler: 'vllm' needs a language-model "
                                     f"backend; {type(backend).__name__} has no vLLM sampler")
                by_type = backend.sample_vllm(dirs, prompts, n, seed, log_path=ctx.out_dir / "vllm-sampler.log")
                samples = list(by_type.values())
                sample: Sampler = lambda j: samples[j]  # noqa: E731
            else:
                sample = lambda j: backend.sample(policies[j], prompts, n, seed + j)  # noqa: E731
            L = estimate_L(backend, policies, prompts, sample)
        sampling = {"L_method": method, "sampler": None if method == "exact" else config.sampler,
                    "L_seconds": time.perf_counter() - t}
        priority = resolve_priority(ctx, config.priority, inputs, len(policies))
        R = regret_matrix(L, priority)
        hedge = optimistic_hedge(R, eta=config.eta, steps=config.steps)
        lp_value, lp_weights = game_value_lp(R)
        out = ctx.out_dir
        np.savez(out / "game.npz", L=L, R=R, trajectory=hedge.trajectory, weights=hedge.weights)
        _track(ctx.stage_name, hedge.trajectory, hedge.weights, hedge.value, lp_value)
        ensemble = {"name": f"{ctx.stage_name}/ensemble", "policies": names, "weights": hedge.weights.tolist(),
                    "paths": inputs["policies"]["policies"], "beta": backend.beta,
                    "hedge_value": hedge.value, "lp_value": lp_value, "lp_weights": lp_weights.tolist(),
                    "priority": None if priority is None else priority.tolist(), **sampling}
        (out / "ensemble.json").write_text(json.dumps(ensemble, indent=2))
        routing = export_routing(ctx, backend, dirs, names, hedge.weights, config) if lm else None
        if routing is not None:
            ensemble["routing"] = routing
        return {"ensemble": ensemble, "game": f"{ctx.stage_name}/game.npz", "L": L.tolist()}
