"""One summary over several seeds of a recipe: `D/summary/metrics.json`, `report.md`, figures.

`openrlhf run RECIPE --seeds 0,1,2 -o D` runs the recipe once per seed into `D/seed-<s>/`
(`recipe/seeds.py`), then calls `write_summary(D, seeds)`. With one seed and 128 test prompts a
group's accuracy has a standard error near 0.04, so a single run cannot separate most of the
differences the paper's Figures 4-5 are about; this module gives every number an interval.

Names. Type indices are arbitrary per seed, so a type policy `<stage>/typeK` is summarised under
the group it was matched to in that seed: `em/grammar`, `kmeans/sentiment`. The matching comes
from the report's `clustering[stage].matched_group` ({"<stage>/typeK": group}); for older
metrics.json files from its `type_to_group`, else it is recomputed here (Hungarian matching of
the stage's clustering.json responsibilities against the dataset's groups). Ensembles keep their
names (`minmax/ensemble`); a type left unmatched (K > groups) keeps `<stage>/typeK` and is noted.

Intervals (two-level bootstrap). One replicate draws S seeds with replacement from the S
seeds, and within each drawn seed resamples its test prompts with replacement (all rows of a
prompt, i.e. every group's label of it, move together), recomputes each group's accuracy and
margin from the per-row values the report saved (`report/per_row.npz`, eval/per_row.py), and
averages over the drawn seeds. `ci95` is the 2.5/97.5 percentile of the replicates; `mean` is
the mean of the per-seed values in metrics.json. Every policy present in the same seeds gets the
same draws, so intervals of different policies are comparable. Regret is one number per seed and
group (the report's estimate): its inner level is a normal draw with the report's standard error
(`regret_se`) when it gives one, none otherwise. A seed without per_row.npz contributes its
per-group means only (noted). `worst_group` is computed inside each replicate: the lowest
accuracy and margin and the highest regret over groups, averaged over seeds.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from ..errors import EmdpoError
from .per_row import PER_ROW_FILE, read_per_row

METRICS = ("accuracy", "margin", "regret")
WORST = {"accuracy": "min", "margin": "min", "regret": "max"}  # the worst group for each metric
SE_KEYS = ("regret_se", "regret_stderr")
SUMMARY_DIR = "summary"
_TYPE = re.compile(r"^(?P<stage>.+)/type(?P<k>\d+)$")


def seed_dir(root: str | Path, seed: int) -> Path:
    """Where `--seeds` puts seed `seed`'s run."""
    return Path(root) / f"seed-{seed}"


# --------------------------------------------------------------------------- reading runs


@dataclass
class SeedRun:
    """One seed's run as the summary needs it."""

    seed: int
    run_dir: Path
    metrics: dict[str, Any]
    per_row: dict[str, Any] | None
    names: dict[str, str] = field(default_factory=dict)  # metrics.json policy name -> summary name
    matched: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> {"stage/typeK": group}
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmdpoError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise EmdpoError(f"{path}: invalid JSON: {exc.msg} at line {exc.lineno}") from None


def _stages(run_dir: Path) -> dict[str, dict[str, Any]]:
    return (_read_json(run_dir / "run.json").get("stages") or {}) if (run_dir / "run.json").is_file() else {}


def report_metrics_path(run_dir: Path, stages: dict[str, dict[str, Any]]) -> Path:
    """metrics.json of the run's last finished `report` stage (report/metrics.json if unrecorded)."""
    reports = [s for s in stages.values() if s.get("trainer") == "report" and s.get("status") == "done"
               and (s.get("outputs") or {}).get("metrics")]
    path = run_dir / reports[-1]["outputs"]["metrics"] if reports else run_dir / "report" / "metrics.json"
    if not path.is_file():
        raise EmdpoError(f"{path}: no such file (did the seed's report stage finish?)")
    return path


def _recomputed_matching(run_dir: Path, stages: dict[str, dict[str, Any]], stage: str) -> dict[str, str]:
    """Hungarian matching of `stage`'s clustering.json against its dataset's groups (old reports)."""
    from ..algorithms.metrics import match_types_to_groups
    from ..data.io import load_dataset_dir

    out = (stages.get(stage) or {}).get("outputs") or {}
    if not out.get("clustering"):
        return {}
    cl = _read_json(run_dir / out["clustering"])
    data_stages = [n for n, s in stages.items() if s.get("trainer") == "data" and (s.get("outputs") or {}).get("dir")]
    resolved = run_dir / "recipe.resolved.yaml"
    if resolved.is_file():  # the stage's own dataset input, when the recipe names it
        for spec in (yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}).get("stages") or []:
            if spec.get("name") == stage and (spec.get("inputs") or {}).get("dataset") in data_stages:
                data_stages = [spec["inputs"]["dataset"]]
    if not data_stages:
        return {}
    train = load_dataset_dir(run_dir / stages[data_stages[0]]["outputs"]["dir"]).train
    by_annotator = dict(zip(train.annotator_ids, train.annotator_groups()))
    truth = [by_annotator.get(a) for a in cl["annotator_ids"]]
    if any(g is None for g in truth):
        return {}
    resp = np.asarray(cl["responsibilities"])
    t2g = match_types_to_groups(truth, resp.argmax(axis=1), resp.shape[1])
    return {f"{stage}/type{k}": g for g, k in t2g.items()}


def matched_groups(metrics: dict[str, Any], run_dir: Path, stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """stage -> {"<stage>/typeK": group}: the report's `matched_group`, else `type_to_group`, else recomputed."""
    out: dict[str, dict[str, str]] = {}
    type_stages = {m.group("stage") for n in metrics.get("policies", {}) if (m := _TYPE.match(n))}
    for stage in sorted(type_stages | set(metrics.get("clustering") or {})):
        cl = (metrics.get("clustering") or {}).get(stage) or {}
        if cl.get("matched_group"):
            out[stage] = {str(p): str(g) for p, g in cl["matched_group"].items()}
        elif cl.get("type_to_group"):
            out[stage] = {f"{stage}/type{int(k)}": str(g) for g, k in cl["type_to_group"].items()}
        else:
            out[stage] = _recomputed_matching(run_dir, stages, stage)
    return out


def load_seed_run(run_dir: str | Path, seed: int) -> SeedRun:
    """metrics.json, per_row.npz (if the report wrote one) and the summary names of one seed."""
    run_dir = Path(run_dir)
    stages = _stages(run_dir)
    mpath = report_metrics_path(run_dir, stages)
    metrics = _read_json(mpath)
    run = SeedRun(seed=seed, run_dir=run_dir, metrics=metrics, per_row=None)
    if (mpath.parent / PER_ROW_FILE).is_file():
        run.per_row = read_per_row(mpath.parent / PER_ROW_FILE)
    else:
        run.notes.append(f"seed {seed}: no {PER_ROW_FILE} beside {mpath.name}; its accuracy and margin enter the "
                         "intervals as per-group means (no resampling of test prompts)")
    run.matched = matched_groups(metrics, run_dir, stages)
    policies = list(metrics.get("policies") or {})
    taken = set(policies)
    for name in policies:
        m = _TYPE.match(name)
        group = run.matched.get(m.group("stage"), {}).get(name) if m else None
        new = f"{m.group('stage')}/{group}" if m and group else name
        if m and not group:
            run.notes.append(f"seed {seed}: {name} matched no group; summarised under its type index")
        elif new != name and new in taken:
            run.notes.append(f"seed {seed}: {name} -> {new} would clash with an existing policy; kept as {name}")
            new = name
        taken.add(new)
        run.names[name] = new
    return run


# --------------------------------------------------------------------------- the bootstrap


@dataclass
class PolicySeed:
    """One policy in one seed: per-group values and, when saved, its per-row reward differences."""

    values: dict[str, dict[str, float | None]]  # group -> {accuracy, margin, regret}
    diff: np.ndarray | None = None  # (n,) per-row reward differences
    group: np.ndarray | None = None  # (n,) group of each row
    prompt_index: np.ndarray | None = None  # (n,) prompt of each row (the resampling unit)
    regret_se: dict[str, float] = field(default_factory=dict)


class TwoLevelBootstrap:
    """Seeds, then prompts within each drawn seed; draws depend only on the seeds' prompt counts,
    so every policy present in the same seeds is resampled identically."""

    def __init__(self, prompts_per_seed: list[int | None], n_groups: int, n_boot: int, rng_seed: int) -> None:
        rng = np.random.default_rng([rng_seed, len(prompts_per_seed), *[p or 0 for p in prompts_per_seed]])
        s = len(prompts_per_seed)
        self.n_boot = n_boot
        self.idx = rng.integers(0, s, size=(n_boot, s))
        # draws[j][k] = (replicates whose j-th drawn seed is k, prompt counts or None, normal draws)
        self.draws: list[list[tuple[np.ndarray, np.ndarray | None, np.ndarray]]] = []
        for j in range(s):
            per_seed = []
            for k, p in enumerate(prompts_per_seed):
                rows = np.flatnonzero(self.idx[:, j] == k)
                counts = rng.multinomial(p, np.full(p, 1.0 / p), size=len(rows)) if p else None
                per_seed.append((rows, counts, rng.standard_normal((len(rows), n_groups))))
            self.draws.append(per_seed)

    def replicates(self, inner: Callable[[int, np.ndarray | None, np.ndarray], dict[str, np.ndarray]],
                   metrics: tuple[str, ...], n_groups: int) -> dict[str, np.ndarray]:
        """metric -> (S, B, G): the j-th drawn seed's resampled per-group value in each replicate."""
        out = {m: np.full((len(self.draws), self.n_boot, n_groups), np.nan) for m in metrics}
        for j, per_seed in enumerate(self.draws):
            for k, (rows, counts, z) in enumerate(per_seed):
                if len(rows) == 0:
                    continue
                values = inner(k, counts, z)
                for m in metrics:
                    out[m][j, rows] = values[m]
        return out


def _interval(reps: np.ndarray) -> list[float] | None:
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return None
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return [float(lo), float(hi)]


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(present)) if present else None


def _nanreduce(x: np.ndarray, how: str, axis: int) -> np.ndarray:
    """nanmin/nanmax/nanmean; an all-NaN slice means 'no value' and stays NaN without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.nanmin if how == "min" else np.nanmax if how == "max" else np.nanmean)(x, axis=axis)


def summarize_policy(per_seed: list[PolicySeed | None], groups: list[str], *, n_boot: int = 2000,
                     rng_seed: int = 0) -> dict[str, Any]:
    """{"per_group": {g: {metric: {mean, ci95, per_seed}}}, "worst_group": {metric: {...}}}.

    `per_seed` is aligned with the run's seeds (None where the policy is absent); intervals use
    the seeds where it is present.
    """
    present = [k for k, p in enumerate(per_seed) if p is not None]
    gi = {g: i for i, g in enumerate(groups)}
    G = len(groups)

    def seed_value(p: PolicySeed | None, g: str, m: str) -> float | None:
        v = None if p is None else (p.values.get(g) or {}).get(m)
        return None if v is None else float(v)

    def seed_worst(p: PolicySeed | None, m: str) -> float | None:
        vals = [seed_value(p, g, m) for g in groups]
        vals = [v for v in vals if v is not None]
        if p is None or not vals:
            return None
        return min(vals) if WORST[m] == "min" else max(vals)

    summary: dict[str, Any] = {
        "per_group": {g: {m: {"mean": None, "ci95": None, "per_seed": [seed_value(p, g, m) for p in per_seed]}
                          for m in METRICS} for g in groups},
        "worst_group": {m: {"mean": None, "ci95": None, "per_seed": [seed_worst(p, m) for p in per_seed]}
                        for m in METRICS},
    }
    for g in groups:
        for m in METRICS:
            summary["per_group"][g][m]["mean"] = _mean(summary["per_group"][g][m]["per_seed"])
    for m in METRICS:
        summary["worst_group"][m]["mean"] = _mean(summary["worst_group"][m]["per_seed"])
    if not present:
        return summary

    pols = [per_seed[k] for k in present]
    prompts = [int(p.prompt_index.max()) + 1 if p.diff is not None and len(p.diff) else None for p in pols]
    boot = TwoLevelBootstrap(prompts, G, n_boot, rng_seed)
    sums = []  # per present seed: (prompt x group) sums of correct, of diff, and row counts
    for p, n_prompts in zip(pols, prompts):
        if n_prompts is None:
            sums.append(None)
            continue
        col = np.array([gi.get(str(g), -1) for g in p.group])
        keep = col >= 0
        shape = (n_prompts, G)
        correct, margin, count = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        np.add.at(correct, (p.prompt_index[keep], col[keep]), (p.diff[keep] > 0).astype(float))
        np.add.at(margin, (p.prompt_index[keep], col[keep]), p.diff[keep])
        np.add.at(count, (p.prompt_index[keep], col[keep]), 1.0)
        sums.append((correct, margin, count))

    def fixed(p: PolicySeed, m: str) -> np.ndarray:
        return np.array([np.nan if (v := seed_value(p, g, m)) is None else v for g in groups])

    def inner(k: int, counts: np.ndarray | None, z: np.ndarray) -> dict[str, np.ndarray]:
        p = pols[k]
        m_rows = len(z)
        out: dict[str, np.ndarray] = {}
        if counts is not None and sums[k] is not None:
            correct, margin, count = sums[k]
            with np.errstate(invalid="ignore", divide="ignore"):
                n = counts @ count
                out["accuracy"] = np.where(n > 0, (counts @ correct) / n, np.nan)
                out["margin"] = np.where(n > 0, (counts @ margin) / n, np.nan)
        else:
            out["accuracy"] = np.broadcast_to(fixed(p, "accuracy"), (m_rows, G))
            out["margin"] = np.broadcast_to(fixed(p, "margin"), (m_rows, G))
        se = np.array([p.regret_se.get(g, 0.0) or 0.0 for g in groups])
        out["regret"] = fixed(p, "regret")[None, :] + z * se[None, :]
        return out

    reps = boot.replicates(inner, METRICS, G)
    for m in METRICS:
        per_group_reps = _nanreduce(reps[m], "mean", axis=0)  # (B, G): mean over the drawn seeds
        for g in groups:
            if summary["per_group"][g][m]["mean"] is not None:
                summary["per_group"][g][m]["ci95"] = _interval(per_group_reps[:, gi[g]])
        if summary["worst_group"][m]["mean"] is not None:
            worst = _nanreduce(_nanreduce(reps[m], WORST[m], axis=2), "mean", axis=0)  # worst group, then seeds
            summary["worst_group"][m]["ci95"] = _interval(worst)
    return summary


# --------------------------------------------------------------------------- the summary


def _policy_seed(run: SeedRun, name: str) -> PolicySeed:
    per_group = run.metrics["policies"][name]["per_group"]
    ps = PolicySeed(values={g: {m: v.get(m) for m in METRICS} for g, v in per_group.items()})
    for g, v in per_group.items():
        se = next((v[k] for k in SE_KEYS if v.get(k) is not None), None)
        if se is not None:
            ps.regret_se[g] = float(se)
    if run.per_row is not None and name in run.per_row["policies"]:
        ps.diff = run.per_row["diff"][run.per_row["policies"].index(name)]
        ps.group = run.per_row["group"]
        ps.prompt_index = run.per_row["prompt_index"]
    return ps


def _stat(values: list[float | None]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    return {"mean": _mean(values), "min": float(min(present)) if present else None, "per_seed": values}


def ordered_names(names: list[str]) -> list[str]:
    """Whole-population policies first, then by stage (first appearance), groups sorted, ensembles last."""
    stages = list(dict.fromkeys(n.split("/")[0] for n in names if "/" in n))
    return [n for n in names if "/" not in n] + sorted(
        (n for n in names if "/" in n), key=lambda n: (stages.index(n.split("/")[0]), _is_ensemble(n), n))


def summarize_runs(runs: list[SeedRun], *, n_boot: int = 2000, rng_seed: int = 0) -> dict[str, Any]:
    """The summary metrics.json (DESIGN.md section 5) from loaded seed runs."""
    seeds = [r.seed for r in runs]
    names: list[str] = []
    for r in runs:
        names += [n for n in r.names.values() if n not in names]
    names = ordered_names(names)
    groups = sorted({g for r in runs for p in r.metrics.get("policies", {}).values() for g in p.get("per_group", {})})
    policies: dict[str, Any] = {}
    for name in names:
        per_seed = []
        sources = []
        for r in runs:
            orig = next((o for o, n in r.names.items() if n == name), None)
            per_seed.append(_policy_seed(r, orig) if orig is not None else None)
            sources.append(orig)
        policies[name] = {**summarize_policy(per_seed, groups, n_boot=n_boot, rng_seed=rng_seed),
                          "source": sources, "seeds_present": sum(p is not None for p in per_seed)}
    clustering: dict[str, Any] = {}
    stages = sorted({s for r in runs for s in r.metrics.get("clustering") or {}})
    for stage in stages:
        cl = [(r.metrics.get("clustering") or {}).get(stage) for r in runs]
        clustering[stage] = {
            "ari": _stat([c.get("ari") if c else None for c in cl]),
            "nmi": _stat([c.get("nmi") if c else None for c in cl]),
            "matched_group": [r.matched.get(stage) for r in runs],
        }
    ensembles: dict[str, Any] = {}
    for stage in sorted({s for r in runs for s in r.metrics.get("ensembles") or {}}):
        weights: dict[str, list[float | None]] = {}
        max_regret = []
        for k, r in enumerate(runs):
            e = (r.metrics.get("ensembles") or {}).get(stage)
            max_regret.append(e.get("max_regret") if e else None)
            for member, w in zip((e or {}).get("policies") or [], (e or {}).get("weights") or []):
                weights.setdefault(r.names.get(member, member), [None] * len(runs))[k] = float(w)
        ens_policy = policies.get(f"{stage}/ensemble", {}).get("worst_group", {}).get("regret", {})
        ensembles[stage] = {
            "weights": {m: {"mean": _mean(v), "per_seed": v} for m, v in weights.items()},
            "max_regret": {"mean": _mean(max_regret), "ci95": ens_policy.get("ci95"), "per_seed": max_regret},
        }
    timings: dict[str, Any] = {}
    for stage in dict.fromkeys(s for r in runs for s in r.metrics.get("timings_s") or {}):
        vals = [(r.metrics.get("timings_s") or {}).get(stage) for r in runs]
        timings[stage] = {"mean": _mean(vals), "per_seed": vals}
    notes = [n for r in runs for n in r.notes]
    if any(p["per_group"][g]["regret"]["mean"] is not None for p in policies.values() for g in groups):
        notes.append("regret: one estimate per seed and group; its inner bootstrap level uses the report's "
                     "standard error where given (regret_se), none otherwise")
    if len(runs) == 1:
        notes.append("one seed: intervals resample test prompts only and say nothing about seed-to-seed variation")
    return {
        "recipe": runs[0].metrics.get("recipe") if runs else None,
        "seeds": seeds,
        "runs": {str(r.seed): str(r.run_dir) for r in runs},
        "groups": groups,
        "bootstrap": {"replicates": n_boot, "levels": ["seeds", "test prompts within seed"], "interval": "percentile 95%",
                      "rng_seed": rng_seed, "per_row": [r.per_row is not None for r in runs]},
        "policies": policies,
        "clustering": clustering,
        "ensembles": ensembles,
        "timings_s": timings,
        "notes": notes,
    }


# --------------------------------------------------------------------------- figures and report.md


def _is_ensemble(name: str) -> bool:
    return name.endswith("/ensemble")


def interval_bars(values: dict[str, dict[str, dict[str, Any]]], ylabel: str, title: str, path: Path) -> Path:
    """values: {series: {group: {mean, ci95}}} -> bars per group with 95% interval error bars."""
    from .plots import _save, plt

    series = list(values)
    groups = sorted({g for v in values.values() for g in v})
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(groups) + 0.15 * len(series) * len(groups), 3.8))
    x = np.arange(len(groups))
    for i, s in enumerate(series):
        means = np.array([np.nan if (v := values[s].get(g, {}).get("mean")) is None else v for g in groups])
        lo = np.array([(values[s].get(g, {}).get("ci95") or [np.nan, np.nan])[0] for g in groups], dtype=float)
        hi = np.array([(values[s].get(g, {}).get("ci95") or [np.nan, np.nan])[1] for g in groups], dtype=float)
        yerr = np.vstack([np.clip(means - lo, 0, None), np.clip(hi - means, 0, None)])
        yerr = np.nan_to_num(yerr)
        ax.bar(x + i * width - 0.4 + width / 2, means, width, label=s, yerr=yerr, capsize=3)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, ax, path)


def summary_figures(summary: dict[str, Any], out_dir: Path) -> list[str]:
    """The paper's Figure 4 (after clustering) and Figure 5 (after aggregation), with intervals,
    for margin (the paper's choice) and for accuracy and regret."""
    pol = summary["policies"]
    baselines = [n for n in pol if "/" not in n]
    clustered = baselines + [n for n in pol if "/" in n and not _is_ensemble(n)]
    aggregated = baselines + [n for n in pol if _is_ensemble(n)]
    figures = []
    for metric, label in (("margin", "reward margin"), ("accuracy", "accuracy"), ("regret", "regret")):
        for phase, names, fig_no in (("clustering", clustered, 4), ("aggregation", aggregated, 5)):
            values = {(n.split("/")[0] if _is_ensemble(n) else n): {g: v[metric] for g, v in pol[n]["per_group"].items()}
                      for n in names}
            values = {n: v for n, v in values.items() if any(x["mean"] is not None for x in v.values())}
            if not values or (phase == "aggregation" and not any(_is_ensemble(n) for n in names)):
                continue
            fname = f"{metric}_after_{phase}.png"
            title = f"{label} after {phase} ({len(summary['seeds'])} seeds, 95% CI)"
            if metric == "margin":
                title = f"Figure {fig_no}: " + title
            interval_bars(values, label, title, out_dir / fname)
            figures.append(fname)
    return figures


def _fmt(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    ci = stat.get("ci95")
    return f"{stat['mean']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{stat['mean']:.3f}"


def _seeds_text(values: list[float | None]) -> str:
    return ", ".join("-" if v is None else f"{v:.3f}" for v in values)


def render_summary(summary: dict[str, Any], figures: list[str]) -> str:
    """report.md of the summary: mean [95% interval] tables, clustering, ensembles, timings, figures."""
    seeds, groups = summary["seeds"], summary["groups"]
    lines = [f"# {summary.get('recipe') or 'recipe'}: {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
             "Mean over seeds with a 95% percentile interval from a two-level bootstrap "
             f"({summary['bootstrap']['replicates']} replicates: seeds resampled, then test prompts within each "
             "seed). Type policies are named by the group they were matched to in each seed.", ""]
    for metric in METRICS:
        if not any(p["per_group"][g][metric]["mean"] is not None for p in summary["policies"].values() for g in groups):
            continue
        worst = "highest" if WORST[metric] == "max" else "lowest"
        lines += [f"## {metric}", "", "| policy | " + " | ".join(groups) + f" | worst group ({worst}) |",
                  "|---|" + "---|" * (len(groups) + 1)]
        for name, p in summary["policies"].items():
            cells = [_fmt(p["per_group"][g][metric]) for g in groups] + [_fmt(p["worst_group"][metric])]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if summary["clustering"]:
        lines += ["## Clustering", "", "| stage | ARI mean | ARI min | ARI per seed | NMI mean |", "|---|---|---|---|---|"]
        for stage, c in summary["clustering"].items():
            lines.append(f"| {stage} | {_fmt(c['ari'])} | {_fmt({'mean': c['ari']['min']})} | "
                         f"{_seeds_text(c['ari']['per_seed'])} | {_fmt(c['nmi'])} |")
        lines.append("")
    if summary["ensembles"]:
        lines += ["## Ensembles", "", "| stage | mean weights | max regret |", "|---|---|---|"]
        for stage, e in summary["ensembles"].items():
            w = ", ".join(f"{m}: {v['mean']:.3f}" for m, v in e["weights"].items() if v["mean"] is not None)
            lines.append(f"| {stage} | {w} | {_fmt(e['max_regret'])} |")
        lines.append("")
    if summary["timings_s"]:
        lines += ["## Timings (seconds)", "", "| stage | mean | per seed |", "|---|---|---|"]
        for stage, t in summary["timings_s"].items():
            lines.append(f"| {stage} | {_fmt(t)} | {_seeds_text(t['per_seed'])} |")
        lines.append("")
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    if summary["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in summary["notes"]] + [""]
    return "\n".join(lines)


def write_summary(root: str | Path, seeds: list[int], *, n_boot: int = 2000, rng_seed: int = 0) -> Path:
    """Read `root/seed-<s>/` for every seed and write `root/summary/` (metrics.json, report.md, PNGs)."""
    runs = [load_seed_run(seed_dir(root, s), s) for s in seeds]
    summary = summarize_runs(runs, n_boot=n_boot, rng_seed=rng_seed)
    out = Path(root) / SUMMARY_DIR
    out.mkdir(parents=True, exist_ok=True)
    figures = summary_figures(summary, out)
    summary["figures"] = figures
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_summary(summary, figures), encoding="utf-8")
    return out
