"""Per-test-row reward differences of every evaluated policy: `report/per_row.npz`.

metrics.json holds per-group means only. Intervals over several seeds (`eval/summary.py`)
resample test prompts within each seed, which needs the row-level values behind those means;
the report stage calls `write_per_row` once, after its own evaluation, and this module is the
only place that defines the file.

File layout (numpy .npz, no pickles):
- `policies` (P,) str: policy names as in metrics.json;
- `diff` (P, n) float64: beta * (log-ratio of the preferred response - of the other) on each
  row's top pair, the quantity whose mean is the report's `margin` and whose sign gives its
  `accuracy` (`algorithms.metrics.preference_metrics`);
- `group` (n,) str, `prompt_index` (n,) int64 (rows of one prompt share an index: the unit the
  bootstrap resamples), `comparison_id` (n,) str.
Only rows with a ground-truth group are written (the report's metrics use only those).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..algorithms.metrics import top_pair
from ..algorithms.mixture import mixture_logprob
from ..data.schema import ComparisonSet

PER_ROW_FILE = "per_row.npz"

Mixture = list[tuple[float, Any]]


def reward_differences(rewards: np.ndarray, rankings: np.ndarray) -> np.ndarray:
    """(n,) preferred-minus-other implicit reward on each row's top pair (as preference_metrics)."""
    winner, loser = top_pair(rankings)
    rows = np.arange(len(rewards))
    return rewards[rows, winner] - rewards[rows, loser]


def per_row_differences(backend: Any, data: ComparisonSet, mixtures: dict[str, Mixture]) -> dict[str, np.ndarray]:
    """{policy: (n,) reward differences} for every row of `data`, mixtures scored exactly."""
    ref = backend.ref_score(data)
    cache: dict[int, np.ndarray] = {}
    out: dict[str, np.ndarray] = {}
    for name, mix in mixtures.items():
        for _, p in mix:
            if id(p) not in cache:
                cache[id(p)] = backend.score(p, data.prompts, data.responses)
        s = mixture_logprob(np.stack([cache[id(p)] for _, p in mix]), np.array([w for w, _ in mix]))
        out[name] = reward_differences(backend.beta * (s - ref), data.rankings)
    return out


def write_per_row(path: str | Path, backend: Any, data: ComparisonSet | None, mixtures: dict[str, Mixture]) -> Path | None:
    """Score every policy on the labelled rows of `data` and save them; None when there are none."""
    if data is None or not mixtures:
        return None
    labelled = np.array([r.group is not None for r in data.rows], dtype=bool)
    if not labelled.any():
        return None
    subset = data.subset(labelled)
    diffs = per_row_differences(backend, subset, mixtures)
    index: dict[str, int] = {}
    prompt_index = np.array([index.setdefault(p, len(index)) for p in subset.prompts], dtype=np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        policies=np.array(list(diffs), dtype=str),
        diff=np.stack([diffs[n] for n in diffs]).astype(np.float64),
        group=np.array([r.group for r in subset.rows], dtype=str),
        prompt_index=prompt_index,
        comparison_id=np.array(subset.comparison_ids, dtype=str),
    )
    return path


def read_per_row(path: str | Path) -> dict[str, Any]:
    """The file as {policies: list[str], diff, group, prompt_index, comparison_id}."""
    with np.load(Path(path), allow_pickle=False) as z:
        return {
            "policies": [str(p) for p in z["policies"]],
            "diff": z["diff"],
            "group": z["group"].astype(str),
            "prompt_index": z["prompt_index"],
            "comparison_id": z["comparison_id"].astype(str),
        }
