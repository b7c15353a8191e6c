"""`report` stage: metrics.json, figures and report.md over every earlier stage it names.

Inputs: `dataset` (required) plus any number of stages whose `policies`, `clustering` or
`ensemble` outputs should be evaluated, e.g. `inputs: {dataset: data, dpo: dpo, em: em,
minmax: minmax}`. Ground-truth groups are read here, for evaluation only.

`identifiability` (optional, synthetic data with a known truth such as the bandit): for each
label, an EM stage and the dataset stage it was trained on, both among `inputs`; the recovered
eta and type policies are compared with the true mixture (eval/identifiability.py) under
`metrics.json["identifiability"][label]` and in report.md.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import Field, model_serializer

from ..config import StrictModel
from ..errors import RecipeError
from ..eval.evaluate import clustering_report, estimate_regrets, evaluate_mixtures
from ..eval.plots import grouped_bars, log_likelihood_trace, weight_convergence
from ..eval.identifiability import identifiability_markdown, identifiability_report
from ..eval.per_row import PER_ROW_FILE, write_per_row
from ..eval.report_md import render_report
from .base import StageConfig, StageContext, Trainer
from .common import dataset_from, prompts_from, run_path


class IdentifiabilitySpec(StrictModel):
    em: str = Field(description="input slot of the EM stage whose eta and type policies are checked")
    dataset: str = Field(description="input slot of the dataset stage that EM stage trained on")


class ReportConfig(StageConfig):
    title: str | None = None
    regret_reference: str | None = Field("em", description="stage whose type policies, matched to groups, stand in for each group's optimum when true rewards are unknown")
    regret_prompts: int = Field(64, ge=1, description="test prompts for the regret estimate")
    samples_per_prompt: int = Field(1, ge=1)
    identifiability: dict[str, IdentifiabilitySpec] | None = Field(
        None, description="label -> {em, dataset} input slots: recovered mixture vs the builder's truth")

    @model_serializer(mode="wrap")
    def _omit_unset_identifiability(self, handler: Any) -> dict[str, Any]:
        # left out while unset, so existing recipes keep their stage hashes (resume) unchanged
        out = handler(self)
        if isinstance(out, dict) and out.get("identifiability") is None:
            out.pop("identifiability", None)
        return out


class ReportStage(Trainer):
    name = "report"
    description = "Per-group accuracy, margin and regret, clustering quality, ensembles: metrics.json, PNGs, report.md."
    Config = ReportConfig
    input_slots = {"dataset": "the dataset stage (data)", "*": "any earlier stage to report on"}
    required_inputs = ("dataset",)

    def run(self, ctx: StageContext, config: ReportConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        ds = dataset_from(ctx, inputs["dataset"])
        backend = ctx.backend
        groups_by_annotator = dict(zip(ds.train.annotator_ids, ds.train.annotator_groups()))
        group_sizes: dict[str, int] = {}
        for g in groups_by_annotator.values():
            group_sizes[g] = group_sizes.get(g, 0) + 1
        metrics: dict[str, Any] = {
            "recipe": ctx.recipe.get("name"),
            "seed": ctx.seed,
            "dataset": {"annotators": ds.train.n_annotators, "comparisons": len(ds.train),
                        "groups": dict(sorted(group_sizes.items()))},
            "policies": {}, "clustering": {}, "ensembles": {}, "timings_s": {},
        }
        mixtures: dict[str, list[tuple[float, Any]]] = {}
        loaded: dict[str, Any] = {}

        def load(name: str, rel: str) -> Any:
            if name not in loaded:
                loaded[name] = backend.load(run_path(ctx, rel))
            return loaded[name]

        ensembles: dict[str, dict[str, Any]] = {}
        traces: dict[str, list[float]] = {}
        for slot, out in inputs.items():
            if slot == "dataset":
                continue
            for name, rel in (out.get("policies") or {}).items():
                mixtures[name] = [(1.0, load(name, rel))]
            if out.get("clustering"):
                cl = json.loads(run_path(ctx, out["clustering"]).read_text())
                stage = out["clustering"].split("/")[0]
                rep = clustering_report(cl["annotator_ids"], np.array(cl["responsibilities"]), groups_by_annotator)
                metrics["clustering"][stage] = {**rep, "eta": cl["eta"], "log_likelihood": cl["log_likelihood"]}
                if cl["log_likelihood"]:  # cluster_dpo has no likelihood trace
                    traces[stage] = cl["log_likelihood"]
            if out.get("ensemble"):
                ens = out["ensemble"]
                mixtures[ens["name"]] = [(w, load(n, ens["paths"][n])) for n, w in zip(ens["policies"], ens["weights"])]
                ensembles[ens["name"]] = {**ens, "game": out.get("game")}

        oracle = backend.regret_oracle(ds.manifest) if hasattr(backend, "regret_oracle") else None
        regret_fn = None
        if oracle is not None:
            regret_fn = lambda name, mix, g: oracle(mix, g)  # noqa: E731 - exact, from true rewards
        elif config.regret_reference in metrics["clustering"]:
            ref_stage = config.regret_reference
            t2g = metrics["clustering"][ref_stage]["type_to_group"]
            group_policies = {g: mixtures[f"{ref_stage}/type{t}"][0][1] for g, t in t2g.items()}
            prompts = prompts_from(ds.test, config.regret_prompts, ctx.seed)
            estimates = estimate_regrets(backend, group_policies, mixtures, prompts, config.samples_per_prompt, ctx.seed)
            regret_fn = lambda name, mix, g: estimates[name].get(g)  # noqa: E731
        metrics["policies"] = evaluate_mixtures(backend, ds.test, mixtures, regret_fn)
        write_per_row(ctx.out_dir / PER_ROW_FILE, backend, ds.test, mixtures)  # for --seeds intervals (eval/summary.py)
        for name, ens in ensembles.items():
            per_group = {g: m["regret"] for g, m in metrics["policies"][name]["per_group"].items()}
            stage = name.split("/")[0]
            metrics["ensembles"][stage] = {
                "weights": ens["weights"], "policies": ens["policies"],
                "per_group_regret": per_group,
                "max_regret": max(per_group.values()) if None not in per_group.values() else None,
                "hedge_value": ens["hedge_value"], "lp_value": ens["lp_value"],
            }
        ident_md = ""
        if config.identifiability:
            metrics["identifiability"] = self._identifiability(ctx, config, inputs)
            if metrics["identifiability"]:
                ident_md = identifiability_markdown(metrics["identifiability"])
        run_json = ctx.run_dir / "run.json"
        if run_json.exists():
            stages = json.loads(run_json.read_text()).get("stages", {})
            metrics["timings_s"] = {s: v.get("seconds") for s, v in stages.items() if v.get("seconds") is not None}
            metrics["peak_rss_mib"] = {s: v["peak_rss_mib"] for s, v in stages.items() if v.get("peak_rss_mib")}

        out_dir = ctx.out_dir
        figures = self._figures(ctx, metrics, ensembles, traces)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out_dir / "report.md").write_text(render_report(metrics, figures, title=config.title or ctx.recipe.get("name"))
                                           + (("\n" + ident_md) if ident_md else ""))
        return {"metrics": f"{ctx.stage_name}/metrics.json", "report": f"{ctx.stage_name}/report.md",
                "figures": [f"{ctx.stage_name}/{f}" for f in figures]}

    def _identifiability(self, ctx: StageContext, config: ReportConfig,
                         inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for label, spec in (config.identifiability or {}).items():
            for slot in (spec.em, spec.dataset):
                if slot not in inputs:
                    raise RecipeError(f"stages.{ctx.stage_name}.config.identifiability.{label}: "
                                      f"{slot!r} is not one of this stage's inputs ({', '.join(inputs)})")
            em = inputs[spec.em]
            if not em.get("clustering") or not em.get("policies"):
                raise RecipeError(f"stages.{ctx.stage_name}.config.identifiability.{label}.em: "
                                  f"{spec.em!r} produced no clustering and type policies")
            ds = dataset_from(ctx, inputs[spec.dataset])
            cl = json.loads(run_path(ctx, em["clustering"]).read_text())
            names = sorted(em["policies"], key=lambda n: int(n.rsplit("type", 1)[-1]))
            policies = [ctx.backend.load(run_path(ctx, em["policies"][n])) for n in names]
            rep = identifiability_report(ctx.backend, ds.manifest, ds.train, cl["eta"], policies,
                                         cl["log_likelihood"][-1], seed=ctx.seed)
            if rep is not None:
                out[label] = {"em_stage": spec.em, "dataset_stage": spec.dataset, **rep}
        return out

    def _figures(self, ctx: StageContext, metrics: dict[str, Any], ensembles: dict[str, Any],
                 traces: dict[str, list[float]]) -> list[str]:
        out, figures = ctx.out_dir, []
        pol = metrics["policies"]
        baselines = [n for n in pol if "/" not in n]  # whole-population policies, e.g. dpo
        types = [n for n in pol if "/" in n and n not in ensembles]
        # The paper's Figures 4-7: per group, after clustering (type policies) and after
        # aggregation (ensembles), each against the baseline; Figure 2: regret.
        for key, label in (("accuracy", "accuracy"), ("margin", "reward margin"), ("regret", "regret")):
            for phase, names in (("clustering", baselines + types), ("aggregation", baselines + list(ensembles))):
                values = {n: {g: m[key] for g, m in pol[n]["per_group"].items()} for n in names
                          if all(m[key] is not None for m in pol[n]["per_group"].values())}
                if len(values) > 1 or (values and phase == "clustering"):
                    fname = f"{key}_after_{phase}.png"
                    grouped_bars(values, label, f"per-group {label} after {phase}", out / fname)
                    figures.append(fname)
        for name, ens in ensembles.items():
            if ens.get("game"):
                game = np.load(run_path(ctx, ens["game"]))
                fname = f"weights_{name.split('/')[0]}.png"
                weight_convergence(game["trajectory"], ens["policies"], f"{name}: weight convergence", out / fname)
                figures.append(fname)
        if traces:
            log_likelihood_trace(traces, out / "em_log_likelihood.png")
            figures.append("em_log_likelihood.png")
        return figures
