"""report.md: the numbers of metrics.json as tables, with the figures beside them."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def render_report(metrics: dict[str, Any], figures: list[str], title: str | None = None) -> str:
    lines = [f"# {title or metrics.get('recipe')}", ""]
    ds = metrics["dataset"]
    lines += [f"Dataset: {ds['annotators']} annotators, {ds['comparisons']} comparisons, groups "
              + ", ".join(f"{g}: {n}" for g, n in ds.get("groups", {}).items()) + ".", ""]
    groups = sorted({g for p in metrics["policies"].values() for g in p["per_group"]})
    if groups:
        lines += ["## Policies (per group: accuracy / margin / regret)", "",
                  "| policy | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
        for name, p in metrics["policies"].items():
            cells = [" / ".join(_fmt(p["per_group"][g].get(k)) for k in ("accuracy", "margin", "regret"))
                     if g in p["per_group"] else "-" for g in groups]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if metrics["clustering"]:
        lines += ["## Clustering", "", "| stage | ARI | NMI | eta | type -> group | iterations |", "|---|---|---|---|---|---|"]
        for stage, c in metrics["clustering"].items():
            t2g = ", ".join(f"type{t}->{g}" for g, t in sorted(c.get("type_to_group", {}).items(), key=lambda x: x[1]))
            eta = ", ".join(f"{e:.3f}" for e in c["eta"])
            lines.append(f"| {stage} | {_fmt(c['ari'])} | {_fmt(c['nmi'])} | {eta} | {t2g} | {len(c['log_likelihood'])} |")
        lines.append("")
    if metrics["ensembles"]:
        lines += ["## Ensembles", "", "| stage | weights | max regret | per-group regret | Hedge value | LP value |",
                  "|---|---|---|---|---|---|"]
        for stage, e in metrics["ensembles"].items():
            w = ", ".join(f"{p}: {x:.3f}" for p, x in zip(e["policies"], e["weights"]))
            pg = ", ".join(f"{g}: {_fmt(r)}" for g, r in e["per_group_regret"].items())
            lines.append(f"| {stage} | {w} | {_fmt(e['max_regret'])} | {pg} | {_fmt(e['hedge_value'])} | {_fmt(e['lp_value'])} |")
        lines.append("")
    if metrics.get("timings_s"):
        lines += ["## Timings", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {s} | {t:.1f} |" for s, t in metrics["timings_s"].items()]
        lines.append("")
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)
