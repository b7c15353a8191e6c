"""report.md: the numbers of metrics.json as tables, with the figures beside them.

Sections that need group labels (per-group metrics, ARI, regret) appear only when the data has
them; the notes say what was skipped and why, so an unlabelled run reads as complete.
"""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _epochs(v: Any) -> str:
    return "-" if v is None else f"{v:g}"


def _regret_cell(m: dict[str, Any]) -> str:
    r, se = m.get("regret"), m.get("regret_se")
    return _fmt(r) if se is None or r is None else f"{r:.3f} ± {se:.3f}"


def _regret_source(regret: dict[str, Any]) -> list[str]:
    method = regret.get("method")
    if method == "exact":
        return [f"Regret: exact, against {regret['oracle']}.", ""]
    if method == "appendix_e":
        oracles = ", ".join(f"{g}: `{n}`" for g, n in regret["oracle_policies"].items())
        return [f"Regret: appendix E's estimate {regret['formula']}, against the oracle stage "
                f"`{regret['oracle_stage']}` ({oracles}), on {regret['prompts']} held-out {regret['split']} prompts x "
                f"{regret['samples_per_prompt']} samples; ± is one standard error over prompts.", ""]
    if regret:
        return [f"Regret: not reported ({regret.get('note')}).", ""]
    return []


def render_report(metrics: dict[str, Any], figures: list[str], title: str | None = None) -> str:
    lines = [f"# {title or metrics.get('recipe')}", ""]
    ds = metrics["dataset"]
    if ds.get("groups"):
        lines += [f"Dataset: {ds['annotators']} annotators, {ds['comparisons']} comparisons, groups "
                  + ", ".join(f"{g}: {n}" for g, n in ds["groups"].items()) + ".", ""]
    else:
        lines += [f"Dataset: {ds['annotators']} annotators, {ds['comparisons']} comparisons, no group labels.", ""]
    if metrics.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in metrics["notes"]] + [""]
    lines += _regret_source(metrics.get("regret") or {})
    pol = metrics["policies"]
    groups = sorted({g for p in pol.values() for g in p["per_group"]})
    if groups:
        lines += ["## Policies (held-out, per group: accuracy / margin / regret)", "",
                  "| policy | epochs seen | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
        for name, p in pol.items():
            cells = [" / ".join([_fmt(p["per_group"][g].get("accuracy")), _fmt(p["per_group"][g].get("margin")),
                                 _regret_cell(p["per_group"][g])])
                     if g in p["per_group"] else "-" for g in groups]
            lines.append(f"| {name} | {_epochs(p.get('epochs_seen'))} | " + " | ".join(cells) + " |")
        lines.append("")
    elif any(p.get("overall") for p in pol.values()):
        lines += ["## Policies (held-out, all rows)", "", "| policy | epochs seen | accuracy | margin |",
                  "|---|---|---|---|"]
        for name, p in pol.items():
            o = p.get("overall") or {}
            lines.append(f"| {name} | {_epochs(p.get('epochs_seen'))} | {_fmt(o.get('accuracy'))} | {_fmt(o.get('margin'))} |")
        lines.append("")
    if metrics["clustering"]:
        lines += ["## Clustering", "",
                  "| stage | type sizes | eta | mean largest responsibility | mean entropy (max) | restart agreement (ARI) "
                  "| ARI | NMI | type -> group | iterations |", "|---|---|---|---|---|---|---|---|---|---|"]
        for stage, c in metrics["clustering"].items():
            t2g = ", ".join(f"type{t}->{g}" for g, t in sorted(c.get("type_to_group", {}).items(), key=lambda x: x[1]))
            eta = ", ".join(f"{e:.3f}" for e in c["eta"])
            ra = c.get("restart_agreement")
            agree = f"{ra['mean_ari']:.3f} (min {ra['min_ari']:.3f}, {ra['restarts']} restarts)" if ra else "-"
            sizes = ", ".join(str(n) for n in c.get("type_sizes", []))
            lines.append(f"| {stage} | {sizes} | {eta} | {_fmt(c.get('sharpness'))} "
                         f"| {_fmt(c.get('entropy'))} ({_fmt(c.get('max_entropy'))}) | {agree} | {_fmt(c['ari'])} "
                         f"| {_fmt(c['nmi'])} | {t2g or '-'} | {len(c['log_likelihood'])} |")
        lines.append("")
        ll = {s: c["log_likelihood"] for s, c in metrics["clustering"].items() if c["log_likelihood"]}
        if ll:
            lines += ["EM observed-data log-likelihood per iteration:", ""]
            lines += [f"- {s}: " + ", ".join(f"{v:.1f}" for v in trace) for s, trace in ll.items()]
            lines.append("")
    if metrics["ensembles"]:
        lines += ["## Ensembles", "",
                  "| stage | weights | max regret | per-group regret | game value (Hedge / LP) |", "|---|---|---|---|---|"]
        for stage, e in metrics["ensembles"].items():
            w = ", ".join(f"{p}: {x:.3f}" for p, x in zip(e["policies"], e["weights"]))
            pg = ", ".join(f"{g}: {_fmt(r)}" for g, r in e["per_group_regret"].items()) or "-"
            lines.append(f"| {stage} | {w} | {_fmt(e['max_regret'])} | {pg} "
                         f"| {_fmt(e['hedge_value'])} / {_fmt(e['lp_value'])} |")
        lines += ["", "The game value is the ensemble's own objective (its estimate of L between its members)"
                  + ("; the regret columns are measured independently of it." if (metrics.get("regret") or {}).get("method")
                     else "; no independent regret was measured."), ""]
    if metrics.get("timings_s"):
        lines += ["## Timings", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {s} | {t:.1f} |" for s, t in metrics["timings_s"].items()]
        lines.append("")
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)
