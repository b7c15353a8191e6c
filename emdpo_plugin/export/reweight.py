"""`openrlhf export`: re-solve a finished min-max stage with other priority weights.

The paper's weighted variants (e.g. (1, 4): the second group's regret counts four times) need
no retraining: the regret game is a function of the saved L matrix (`<stage>/game.npz`), so a
new priority vector only re-runs the solver. The result is a self-contained serving folder:
`routing.yaml` plus copies of the stage's adapters, and the new `game.npz`.
"""

from __future__ import annotations

import json
import math
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .. import __version__
from ..algorithms.defaults import HEDGE_ETA, HEDGE_STEPS
from ..algorithms.minmax import game_value_lp, optimistic_hedge, regret_matrix
from ..errors import EmdpoError
from .routing import RoutingConfig, adapter_dirs, load_routing, mixture_entries, write_routing


def _load_game(stage_dir: Path) -> np.ndarray:
    path = stage_dir / "game.npz"
    if not path.exists():
        raise EmdpoError(f"{stage_dir}: no game.npz; expected the folder of a finished minmax_ensemble stage")
    try:
        with np.load(path, allow_pickle=False) as game:
            if "L" not in game:
                raise EmdpoError(f"{path}: no array 'L' (the regret matrix estimate)")
            L = np.asarray(game["L"], dtype=np.float64)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise EmdpoError(f"{path}: cannot read: {type(exc).__name__}: {exc}") from None
    if L.ndim != 2 or L.shape[0] != L.shape[1]:
        raise EmdpoError(f"{path}: L has shape {L.shape}; expected a square K x K matrix")
    if not np.isfinite(L).all():
        raise EmdpoError(f"{path}: L holds non-finite values")
    return L


def reexport(stage_dir: str | Path, out_dir: str | Path, priority: list[float], *, eta: float = HEDGE_ETA,
             steps: int = HEDGE_STEPS) -> dict:
    """Solve the game for `priority` and write `out_dir/routing.yaml` (+ adapters, game.npz)."""
    stage_dir, out_dir = Path(stage_dir), Path(out_dir)
    source = load_routing(stage_dir / "routing.yaml")
    L = _load_game(stage_dir)
    K = L.shape[0]
    if len(source.adapters) != K:
        raise EmdpoError(f"{stage_dir}: routing.yaml has {len(source.adapters)} adapters but L is {K} x {K}")
    if len(priority) != K or not all(math.isfinite(c) and c > 0 for c in priority):
        raise EmdpoError(f"--priority: expected {K} positive numbers (one per type, in the order "
                         f"{[a.name for a in source.adapters]}), got {priority}")
    if out_dir.resolve() == stage_dir.resolve():
        raise EmdpoError(f"--out: {out_dir} is the source stage; choose a new folder")
    if (out_dir / "routing.yaml").exists():
        raise EmdpoError(f"--out: {out_dir / 'routing.yaml'} exists; choose a new folder")

    R = regret_matrix(L, np.asarray(priority, dtype=np.float64))
    hedge = optimistic_hedge(R, eta=eta, steps=steps)
    lp_value, lp_weights = game_value_lp(R)

    out_dir.mkdir(parents=True, exist_ok=True)
    src_dirs = adapter_dirs(stage_dir / "routing.yaml", source)
    for a in source.adapters:
        shutil.copytree(src_dirs[a.name], out_dir / "adapters" / a.name, dirs_exist_ok=True)
    entries = mixture_entries([a.name for a in source.adapters], hedge.weights)
    meta = {**source.meta, "priority": [float(c) for c in priority], "reexported_from": str(stage_dir),
            "created_by": f"emdpo_plugin {__version__}"}
    cfg = RoutingConfig(base_model=source.base_model, policy=source.policy, adapter_type=source.adapter_type,
                        adapters=entries, meta=meta)
    write_routing(out_dir / "routing.yaml", cfg)
    np.savez(out_dir / "game.npz", L=L, R=R, trajectory=hedge.trajectory, weights=hedge.weights)
    per_group = (R @ hedge.weights)[1:]
    summary = {"routing": str(out_dir / "routing.yaml"), "priority": list(priority),
               "weights": {e.name: e.weight for e in entries}, "hedge_value": float(hedge.value),
               "lp_value": float(lp_value), "lp_weights": lp_weights.tolist(),
               "weighted_regret_per_type": per_group.tolist()}
    (out_dir / "ensemble.json").write_text(json.dumps(summary, indent=2))
    return summary
