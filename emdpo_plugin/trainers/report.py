"""`report` stage: metrics.json, figures and report.md over every earlier stage it names.

Inputs: `dataset` (required) plus any number of stages whose `policies`, `clustering` or
`ensemble` outputs should be evaluated, e.g. `inputs: {dataset: data, dpo: dpo, em: em,
minmax: minmax, oracle: oracle}`. Ground-truth groups are read here, for evaluation only.

Regret comes from one independent source, recorded under `metrics.json["regret"]`: the
backend's true rewards (`exact`, the bandit), or appendix E's estimate against the `oracle`
input, a `group_dpo` stage (one policy per labelled group), on held-out prompts with a standard
error. Never from the evaluated method's own types: EM's types would get regret 0 by
construction and the ensemble would be judged by the game it minimised. Without labels or
without an oracle the report gives no regret and says why.

Unlabelled data is the normal case: then the report gives held-out accuracy over all rows,
type sizes, responsibility sharpness (mean largest responsibility) and entropy, the EM
log-likelihood trace, agreement between restarts, and the ensembles' weights and game values.
With labels it adds, per clustering stage, ARI/NMI and the Hungarian matching
(`type_to_group`: group -> type index; `matched_group`: "<stage>/typeK" -> group).

`identifiability` (optional, synthetic data with a known truth such as the bandit): for each
label, an EM stage and the dataset stage it was trained on, both among `inputs`; the recovered
eta and type policies are compared with the true mixture (eval/identifiability.py) under
`metrics.json["identifiability"][label]` and in report.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_serializer

from .. import tracking
from ..artifacts import Slot
from ..backends.base import SupportsExactRegret
from ..config import StrictModel
from ..errors import RecipeError
from ..eval.evaluate import (clustering_report, estimate_regrets, evaluate_mixtures, responsibility_stats,
                             restart_agreement)
from ..eval.plots import grouped_bars, log_likelihood_trace, responsibility_histogram, weight_convergence
from ..eval.identifiability import identifiability_markdown, identifiability_report
from ..eval.per_row import PER_ROW_FILE, write_per_row
from ..eval.report_md import render_report
from .base import StageConfig, StageContext, Trainer
from .common import dataset_from, prompts_from, run_path


ORACLE_MIN_KL = 1e-4  # nats: below this an oracle has not moved from the reference


class IdentifiabilitySpec(StrictModel):
    em: str = Field(description="input slot of the EM stage whose eta and type policies are checked")
    dataset: str = Field(description="input slot of the dataset stage that EM stage trained on")


class ReportConfig(StageConfig):
    title: str | None = Field(None, description="heading of report.md (default: the recipe name)")
    regret: Literal["auto", "exact", "oracle", "none"] = Field("auto", description=(
        "regret source: exact (the backend's true rewards, the bandit), oracle (appendix E against the "
        "`oracle` input, a group_dpo stage), none; auto = exact if the backend has it, else oracle if given"))
    regret_prompts: int = Field(64, ge=1, description="held-out (test) prompts for the oracle regret estimate")
    samples_per_prompt: int = Field(1, ge=1, description="responses sampled per prompt and policy for the oracle regret")
    identifiability: dict[str, IdentifiabilitySpec] | None = Field(
        None, description="label -> {em, dataset} input slots: recovered mixture vs the builder's truth")

    @model_serializer(mode="wrap")
    def _omit_unset_identifiability(self, handler: Any) -> dict[str, Any]:
        # left out while unset, so existing recipes keep their stage hashes (resume) unchanged
        out = handler(self)
        if isinstance(out, dict) and out.get("identifiability") is None:
            out.pop("identifiability", None)
        return out


def _track(stage: str, policies: dict[str, Any]) -> None:
    """The per-group metrics as one table for the tracker (policy, group, accuracy, margin, regret)."""
    tracker = tracking.active()
    if tracker is None:
        return
    rows = [[name, group, m.get("accuracy"), m.get("margin"), m.get("regret")]
            for name, p in policies.items() for group, m in (p.get("per_group") or {}).items()]
    rows += [[name, "(all)", (p.get("overall") or {}).get("accuracy"), (p.get("overall") or {}).get("margin"), None]
             for name, p in policies.items() if not p.get("per_group")]
    tracker.table(f"{stage}/per_group", ["policy", "group", "accuracy", "margin", "regret"], rows)


class ReportStage(Trainer):
    name = "report"
    description = "Held-out accuracy/margin, regret against an oracle, clustering quality, ensembles: metrics.json, PNGs, report.md."
    Config = ReportConfig
    input_slots = {"dataset": Slot(("dataset",), "the test (and val) split to evaluate on"),
                   "oracle": Slot(("policies",), "a group_dpo stage: the per-group optima regret is measured against"),
                   "*": Slot((), "any earlier stage to report on (policies, clustering, ensemble)")}
    produces = ("report",)
    required_inputs = ("dataset",)

    def run(self, ctx: StageContext, config: ReportConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        ds = dataset_from(ctx, inputs["dataset"])
        backend = ctx.backend
        train_groups = ds.train.annotator_groups()
        labelled = bool(train_groups) and all(g is not None for g in train_groups)
        groups_by_annotator = dict(zip(ds.train.annotator_ids, train_groups)) if labelled else {}
        group_sizes: dict[str, int] = {}
        for g in groups_by_annotator.values():
            group_sizes[g] = group_sizes.get(g, 0) + 1
        notes: list[str] = []
        if not labelled:
            unlabelled = sum(g is None for g in train_groups)
            notes.append(f"The training data has no group label for {unlabelled} of {len(train_groups)} annotators: "
                         "per-group accuracy and margin, ARI/NMI, the type-to-group matching and regret are skipped "
                         "(they need ground-truth groups). Reported instead: held-out accuracy over all rows, type "
                         "sizes, responsibility sharpness and entropy, EM log-likelihood, agreement between restarts, "
                         "ensemble weights and game value.")
        metrics: dict[str, Any] = {
            "recipe": ctx.recipe.get("name"),
            "seed": ctx.seed,
            "dataset": {"annotators": ds.train.n_annotators, "comparisons": len(ds.train),
                        "labelled": labelled, "groups": dict(sorted(group_sizes.items())),
                        "test_comparisons": len(ds.test) if ds.test is not None else 0},
            "policies": {}, "clustering": {}, "ensembles": {}, "regret": {}, "timings_s": {},
        }
        mixtures: dict[str, list[tuple[float, Any]]] = {}
        epochs_seen: dict[str, Any] = {}
        loaded: dict[str, Any] = {}

        def load(name: str, rel: str) -> Any:
            if name not in loaded:
                loaded[name] = backend.load(run_path(ctx, rel))
            return loaded[name]

        ensembles: dict[str, dict[str, Any]] = {}
        traces: dict[str, list[float]] = {}
        largest: dict[str, np.ndarray] = {}  # per clustering stage: each annotator's largest responsibility
        for slot, out in inputs.items():
            if slot == "dataset":
                continue
            for name, rel in (out.get("policies") or {}).items():
                mixtures[name] = [(1.0, load(name, rel))]
            epochs_seen.update(out.get("epochs_seen") or {})
            if out.get("clustering"):
                stage = out["clustering"].split("/")[0]
                metrics["clustering"][stage], largest[stage] = self._clustering(ctx, out["clustering"], groups_by_annotator)
                if metrics["clustering"][stage]["log_likelihood"]:  # cluster_dpo has no likelihood trace
                    traces[stage] = metrics["clustering"][stage]["log_likelihood"]
            if out.get("ensemble"):
                ens = out["ensemble"]
                mixtures[ens["name"]] = [(w, load(n, ens["paths"][n])) for n, w in zip(ens["policies"], ens["weights"])]
                ensembles[ens["name"]] = {**ens, "game": out.get("game")}

        if ds.test is not None and len(ds.test):
            metrics["policies"] = evaluate_mixtures(backend, ds.test, mixtures)
            write_per_row(ctx.out_dir / PER_ROW_FILE, backend, ds.test, mixtures)  # for --seeds intervals (eval/summary.py)
        else:
            metrics["policies"] = {n: {"overall": None, "per_group": {}} for n in mixtures}
            notes.append("The dataset has no test split: no held-out accuracy, margin or regret.")
        for name, p in metrics["policies"].items():
            p["epochs_seen"] = epochs_seen.get(name)
        metrics["regret"] = self._regret(ctx, config, ds, inputs, mixtures, metrics, labelled, load, notes)
        for name, ens in ensembles.items():
            per_group = {g: m["regret"] for g, m in metrics["policies"][name]["per_group"].items()}
            has_regret = bool(per_group) and None not in per_group.values()
            stage = name.split("/")[0]
            metrics["ensembles"][stage] = {
                "weights": ens["weights"], "policies": ens["policies"],
                "per_group_regret": per_group if has_regret else {},
                "max_regret": max(per_group.values()) if has_regret else None,
                "hedge_value": ens["hedge_value"], "lp_value": ens["lp_value"],
            }
        ident_md = ""
        if config.identifiability:
            metrics["identifiability"] = self._identifiability(ctx, config, inputs)
            if metrics["identifiability"]:
                ident_md = identifiability_markdown(metrics["identifiability"])
        metrics["notes"] = notes
        run_json = ctx.run_dir / "run.json"
        if run_json.exists():
            stages = json.loads(run_json.read_text()).get("stages", {})
            metrics["timings_s"] = {s: v.get("seconds") for s, v in stages.items() if v.get("seconds") is not None}
            metrics["peak_rss_mib"] = {s: v["peak_rss_mib"] for s, v in stages.items() if v.get("peak_rss_mib")}

        out_dir = ctx.out_dir
        _track(ctx.stage_name, metrics["policies"])
        figures = self._figures(ctx, metrics, ensembles, traces, largest)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out_dir / "report.md").write_text(render_report(metrics, figures, title=config.title or ctx.recipe.get("name"))
                                           + (("\n" + ident_md) if ident_md else ""))
        return {"metrics": f"{ctx.stage_name}/metrics.json", "report": f"{ctx.stage_name}/report.md",
                "figures": [f"{ctx.stage_name}/{f}" for f in figures]}

    def _clustering(self, ctx: StageContext, rel: str,
                    groups_by_annotator: dict[str, str]) -> tuple[dict[str, Any], np.ndarray]:
        """Label-free summary of a clustering stage, plus ARI/NMI and the matching when labelled."""
        cl = json.loads(run_path(ctx, rel).read_text())
        stage = rel.split("/")[0]
        resp = np.asarray(cl["responsibilities"], dtype=np.float64)
        rep = clustering_report(cl["annotator_ids"], resp, groups_by_annotator)
        rep["matched_group"] = {f"{stage}/type{k}": g for g, k in rep["type_to_group"].items()}
        out = {**rep, **responsibility_stats(resp), "eta": cl["eta"], "log_likelihood": cl["log_likelihood"]}
        restarts = cl.get("restarts") or []
        if len(restarts) > 1:
            out["restart_agreement"] = restart_agreement(self._restart_assignments(run_path(ctx, rel).parent, restarts))
        return out, resp.max(axis=1)

    @staticmethod
    def _restart_assignments(stage_dir: Path, restarts: list[dict[str, Any]]) -> list[np.ndarray]:
        """Each restart's hard assignment, from the per-restart checkpoints em_dpo keeps."""
        out = []
        for r in restarts:
            state = stage_dir / "restarts" / f"r{r['restart']}" / "state.json"
            if state.exists():
                out.append(np.asarray(json.loads(state.read_text())["log_resp"]).argmax(axis=1))
        return out

    def _regret(self, ctx: StageContext, config: ReportConfig, ds: Any, inputs: dict[str, dict[str, Any]],
                mixtures: dict[str, Any], metrics: dict[str, Any], labelled: bool, load: Any,
                notes: list[str]) -> dict[str, Any]:
        """Fill per-group regret from one independent source; say which one (or why none)."""
        where = f"stages.{ctx.stage_name}"
        backend = ctx.backend
        exact = backend.regret_oracle(ds.manifest) if isinstance(backend, SupportsExactRegret) else None
        oracle_out = inputs.get("oracle")
        if oracle_out is not None and not oracle_out.get("oracle_groups"):
            raise RecipeError(f"{where}.inputs.oracle: that stage produced no per-group policies (use a group_dpo stage)")
        source = config.regret
        if source == "auto":
            source = "exact" if exact is not None else ("oracle" if oracle_out is not None else "none")
        if source == "exact" and exact is None:
            raise RecipeError(f"{where}.config.regret: 'exact' needs true rewards, which {type(backend).__name__} "
                              f"has not for this dataset; use an oracle (inputs.oracle: <group_dpo stage>)")
        if source == "oracle" and oracle_out is None:
            raise RecipeError(f"{where}.config.regret: 'oracle' needs inputs.oracle naming a group_dpo stage")
        pol = metrics["policies"]
        if not labelled:  # the general unlabelled note already says regret is skipped
            return {"method": None, "note": "the data has no group labels; regret is defined per group"}
        if source == "none" or not any(p["per_group"] for p in pol.values()):
            why = ("no oracle: give the report `inputs: {oracle: <group_dpo stage>}` (per-group DPO policies) "
                   "to measure regret; EM's own types are never used as the yardstick")
            if source != "none":
                why = "the test split has no group-labelled rows"
            notes.append(f"No regret: {why}.")
            return {"method": None, "note": why}
        if source == "exact":
            for name, p in pol.items():
                for g, m in p["per_group"].items():
                    m["regret"], m["regret_se"] = float(exact(mixtures[name], g)), None
            return {"method": "exact", "oracle": "true rewards of the synthetic environment "
                    "(each group's beta-regularised optimum)"}
        oracle_names: dict[str, str] = oracle_out["oracle_groups"]
        oracle = {g: load(n, oracle_out["policies"][n]) for g, n in oracle_names.items()}
        prompts = prompts_from(ds.test, config.regret_prompts, ctx.seed)
        est, oracle_kl = estimate_regrets(backend, oracle, mixtures, prompts, config.samples_per_prompt, ctx.seed)
        for g, kl in oracle_kl.items():
            if abs(kl) < ORACLE_MIN_KL:
                notes.append(f"The oracle for {g} ({oracle_names[g]}) is indistinguishable from the reference "
                             f"(KL estimate {kl:.2g} nats): every regret for {g} is near 0 and says nothing; "
                             "train it longer (more rows or steps).")
        for name, p in pol.items():
            for g, m in p["per_group"].items():
                e = est[name].get(g)
                m["regret"], m["regret_se"] = (e["regret"], e["se"]) if e else (None, None)
        return {"method": "appendix_e", "oracle_stage": next(iter(oracle_names.values())).split("/")[0],
                "oracle_policies": oracle_names, "oracle_kl": oracle_kl, "prompts": len(prompts), "samples_per_prompt": config.samples_per_prompt,
                "split": "test",
                "formula": "beta * (E_{y~pi*_g}[log pi*_g/pi_SFT] - E_{y~pi}[log pi*_g/pi_SFT]); mixtures: w-weighted sum over members"}

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
                 traces: dict[str, list[float]], largest: dict[str, np.ndarray]) -> list[str]:
        out, figures = ctx.out_dir, []
        pol = metrics["policies"]
        baselines = [n for n in pol if "/" not in n]  # whole-population policies, e.g. dpo
        types = [n for n in pol if "/" in n and n not in ensembles]
        # The paper's Figures 4-7: per group, after clustering (type policies) and after
        # aggregation (ensembles), each against the baseline; Figure 2: regret.
        labelled = any(p["per_group"] for p in pol.values())
        for key, label in (("accuracy", "accuracy"), ("margin", "reward margin"), ("regret", "regret")):
            for phase, names in (("clustering", baselines + types), ("aggregation", baselines + list(ensembles))):
                if labelled:
                    values = {n: {g: m[key] for g, m in pol[n]["per_group"].items()} for n in names
                              if pol[n]["per_group"] and all(m[key] is not None for m in pol[n]["per_group"].values())}
                    errors = {n: {g: m.get("regret_se") for g, m in pol[n]["per_group"].items()} for n in values}
                    title = f"per-group {label} after {phase}"
                else:  # unlabelled: every held-out row together
                    values = {n: {"all rows": pol[n]["overall"][key]} for n in names
                              if pol[n].get("overall") and pol[n]["overall"].get(key) is not None}
                    errors, title = {}, f"held-out {label} after {phase} (no group labels)"
                if len(values) > 1 or (values and phase == "clustering"):
                    fname = f"{key}_after_{phase}.png"
                    grouped_bars(values, label, title, out / fname, errors=errors if key == "regret" else None)
                    figures.append(fname)
        if largest:
            responsibility_histogram(largest, out / "responsibility_sharpness.png")
            figures.append("responsibility_sharpness.png")
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
