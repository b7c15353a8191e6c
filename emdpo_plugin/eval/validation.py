"""Score a finished run's policies on its validation split: the tool for choosing hyperparameters.

The test split is read only by the final `report` stage; a hyperparameter (a learning rate, the
NLL coefficient, K, ...) chosen by looking at test numbers makes those numbers optimistic. This
module gives the same per-group accuracy and margin as the report (`evaluate_mixtures`, one code
path) on `val.jsonl` instead, for every policy and ensemble a run produced, so a sweep is run as
several ordinary runs and compared here:

    for c in 0 0.2 1.0; do openrlhf run R.yaml --set model.nll_loss_coef=$c -o runs/nll-$c; done
    python -m emdpo_plugin.eval.validation runs/nll-0 runs/nll-0.2 runs/nll-1.0

It refuses `split="test"` on purpose. Regret is not computed here (it needs the oracle stage's
sampling, which belongs to the report).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..data.io import load_dataset_dir
from ..errors import EmdpoError
from .evaluate import Mixture, evaluate_mixtures

SPLITS = ("val", "train")


def _done_stages(run_dir: Path) -> dict[str, dict[str, Any]]:
    path = run_dir / "run.json"
    if not path.is_file():
        raise EmdpoError(f"{path}: no such file (expected a run folder written by `openrlhf run`)")
    try:
        stages = json.loads(path.read_text(encoding="utf-8")).get("stages") or {}
    except json.JSONDecodeError as exc:
        raise EmdpoError(f"{path}: invalid JSON: {exc.msg} at line {exc.lineno}") from None
    return {name: s for name, s in stages.items() if s.get("status") == "done"}


def _backend(run_dir: Path) -> Any:
    """The run's own PolicyBackend, rebuilt from the resolved recipe it saved."""
    from ..backends.factory import default_backend_factory
    from ..recipe.state import RESOLVED_RECIPE

    path = run_dir / RESOLVED_RECIPE
    if not path.is_file():
        raise EmdpoError(f"{path}: no such file (the run folder lacks its resolved recipe)")
    return default_backend_factory(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, run_dir)


def evaluate_run(run_dir: str | Path, *, split: str = "val", backend: Any = None,
                 data_stage: str | None = None) -> dict[str, Any]:
    """{"split", "rows", "policies": {name: {"per_group": {group: {accuracy, margin}}}}} for a run.

    Every policy (`outputs.policies`) and ensemble (`outputs.ensemble`) of a finished stage is
    scored; `data_stage` picks the dataset when a run has several data stages.
    """
    if split == "test":
        raise EmdpoError("split 'test' is read only by the report stage; choose hyperparameters on 'val'")
    if split not in SPLITS:
        raise EmdpoError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    run_dir = Path(run_dir)
    stages = _done_stages(run_dir)
    data_stages = [n for n, s in stages.items() if s.get("trainer") == "data" and (s.get("outputs") or {}).get("dir")]
    if data_stage is not None:
        if data_stage not in data_stages:
            raise EmdpoError(f"{run_dir}: --data-stage {data_stage!r} is not a finished data stage "
                             f"(found: {', '.join(data_stages) or 'none'})")
        data_stages = [data_stage]
    if len(data_stages) != 1:
        raise EmdpoError(f"{run_dir}: expected one finished data stage, found {len(data_stages)} "
                         f"({', '.join(data_stages) or 'none'}); name one with data_stage")
    ds = load_dataset_dir(run_dir / stages[data_stages[0]]["outputs"]["dir"])
    data = ds.val if split == "val" else ds.train
    if data is None or len(data) == 0:
        raise EmdpoError(f"{ds.path}: no {split}.jsonl; rebuild the data with a val split (e.g. imdb_synthetic "
                         f"val_size, bandit val_contexts) or add val.jsonl to your dataset folder")
    backend = backend if backend is not None else _backend(run_dir)
    loaded: dict[str, Any] = {}

    def load(rel: str) -> Any:
        if rel not in loaded:
            loaded[rel] = backend.load(run_dir / rel)
        return loaded[rel]

    mixtures: dict[str, Mixture] = {}
    for s in stages.values():
        out = s.get("outputs") or {}
        for name, rel in (out.get("policies") or {}).items():
            mixtures[name] = [(1.0, load(rel))]
        ens = out.get("ensemble")
        if ens:
            mixtures[ens["name"]] = [(w, load(ens["paths"][n])) for n, w in zip(ens["policies"], ens["weights"])]
    if not mixtures:
        raise EmdpoError(f"{run_dir}: no finished stage produced policies to score")
    per_policy = evaluate_mixtures(backend, data, mixtures)
    for p in per_policy.values():
        for m in p["per_group"].values():
            m.pop("regret", None)
            m.pop("regret_se", None)
    return {"run": str(run_dir), "split": split, "rows": len(data), "policies": per_policy}


def format_table(results: list[dict[str, Any]]) -> str:
    """One line per run and policy: accuracy / margin per group, and the worst group's accuracy."""
    lines = []
    for res in results:
        lines.append(f"{res['run']} ({res['split']}, {res['rows']} rows)")
        for name, p in res["policies"].items():
            cells = ", ".join(f"{g} {m['accuracy']:.3f} / {m['margin']:+.3f}" for g, m in p["per_group"].items())
            worst = min((m["accuracy"] for m in p["per_group"].values()), default=float("nan"))
            lines.append(f"  {name}: {cells}; worst-group accuracy {worst:.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emdpo_plugin.eval.validation",
        description="Per-group accuracy / margin of a run's policies on its val split (for choosing hyperparameters).")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--split", default="val", choices=SPLITS)
    parser.add_argument("--data-stage", default=None, help="the data stage to read (when a run has several)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    try:
        results = [evaluate_run(r, split=args.split, data_stage=args.data_stage) for r in args.runs]
    except EmdpoError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
