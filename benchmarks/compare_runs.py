"""Compare finished runs of one recipe against a baseline run: per-policy, per-group accuracy.

How scale-out runs are checked against the single-process run of the same recipe (data parallel
under torchrun or the DeepSpeed launcher, the Ray executor): every policy's per-group accuracy
should agree within a tolerance (data-parallel training changes the order of floating-point
sums, so bit equality is not expected). Also prints each run's world size, executor, stage
times and EM ARI, and for Ray runs whether the K fits of each EM iteration overlapped in time.

    python benchmarks/compare_runs.py /tmp/seeds/seed-0 /tmp/dp2 /tmp/ray /tmp/ds2 --tol 0.05 --out FILE.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def load(run: Path) -> dict[str, Any]:
    state = json.loads((run / "run.json").read_text())
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    return {"state": state, "metrics": metrics}


def accuracies(metrics: dict[str, Any]) -> dict[tuple[str, str], float]:
    """(policy, group) -> accuracy; EM/k-means types by the group they were matched to."""
    rename = {}
    for clustering in metrics.get("clustering", {}).values():
        rename.update({name: f"{name.split('/')[0]}/{g}" for name, g in (clustering.get("matched_group") or {}).items()})
    return {(rename.get(p, p), g): v["accuracy"] for p, pol in metrics["policies"].items()
            for g, v in (pol.get("per_group") or {}).items() if v.get("accuracy") is not None}


def em_overlap(state: dict[str, Any], stage: str = "em") -> tuple[int, int]:
    """(iterations whose fits overlapped in time, iterations with several fits)."""
    timeline = state["stages"].get(stage, {}).get("fit_timeline") or []
    groups: list[list[dict[str, Any]]] = []  # one M-step: consecutive fits "<desc> type<k>", each k once
    for fit in timeline:
        prefix, _, k = fit["desc"].rpartition(" type")
        last = groups[-1] if groups else None
        if last and last[0]["desc"].rpartition(" type")[0] == prefix and k not in {f["desc"].rpartition(" type")[2] for f in last}:
            last.append(fit)
        else:
            groups.append([fit])
    several = [g for g in groups if len(g) > 1]
    overlapped = sum(1 for g in several if max(f["start"] for f in g) < min(f["end"] for f in g))
    return overlapped, len(several)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--tol", type=float, default=0.05)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    base = load(args.base)
    ref = accuracies(base["metrics"])
    runs = {r: load(r) for r in args.runs}
    lines = ["| policy | group | " + " | ".join([args.base.name] + [r.name for r in args.runs]) + " |",
             "|---|---|" + "---|" * (1 + len(args.runs))]
    worst = {r: 0.0 for r in args.runs}
    for key in sorted(ref):
        row = [f"{ref[key]:.3f}"]
        for r, data in runs.items():
            acc = accuracies(data["metrics"]).get(key)
            if acc is None:
                row.append("missing")
                worst[r] = float("inf")
                continue
            worst[r] = max(worst[r], abs(acc - ref[key]))
            row.append(f"{acc:.3f} ({acc - ref[key]:+.3f})")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(row) + " |")
    lines += ["", "| run | world size | executor | EM ARI | total s | em s | max abs diff | EM fits overlapped |",
              "|---|---|---|---|---|---|---|---|"]
    for r, data in [(args.base, base), *runs.items()]:
        st, m = data["state"], data["metrics"]
        seconds = {s: v.get("seconds") or 0.0 for s, v in st["stages"].items()}
        overlap = "%d of %d iterations" % em_overlap(st)
        diff = "-" if r == args.base else f"{worst[r]:.3f}"
        lines.append(f"| {r} | {st.get('world_size', 1)} | {(st.get('executor') or {}).get('kind', 'local')} | "
                     f"{m['clustering'].get('em', {}).get('ari')} | {sum(seconds.values()):.0f} | "
                     f"{seconds.get('em', 0):.0f} | {diff} | {overlap} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    bad = [str(r) for r, w in worst.items() if w > args.tol]
    if bad:
        print(f"accuracy differs by more than {args.tol} in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
