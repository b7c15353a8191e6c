"""Run state: `DIR/run.json` (what ran, when, with which config, what it produced).

Written atomically on every change (tmp file + os.replace) so a crash or Ctrl-C never leaves
a half-written file, and `--resume` can always trust what it reads.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from ..errors import EmdpoError
from ..fingerprint import digest, output_fingerprint

RUN_FILE = "run.json"
RESOLVED_RECIPE = "recipe.resolved.yaml"
STATUSES = ("pending", "running", "done", "failed")


def now() -> str:
    """UTC timestamp, ISO 8601, second precision."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same folder and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def config_hash(payload: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able payload (trainer, config, inputs, run-wide settings)."""
    return digest(payload)


def save_resolved_recipe(run_dir: Path, recipe: dict[str, Any]) -> Path:
    """The recipe after extends and --set, so a run can be reproduced from its folder alone."""
    path = Path(run_dir) / RESOLVED_RECIPE
    write_atomic(path, yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    return path


class RunState:
    """In-memory view of run.json; every mutating method saves the file."""

    def __init__(self, run_dir: Path, data: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.data = data

    @property
    def path(self) -> Path:
        return self.run_dir / RUN_FILE

    @classmethod
    def load(cls, run_dir: Path) -> "RunState | None":
        """The existing state in `run_dir`, or None if there is no run.json."""
        path = Path(run_dir) / RUN_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EmdpoError(f"{path}: cannot read run state ({exc}); remove it or choose another output dir") from None
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            raise EmdpoError(f"{path}: not a run state file; remove it or choose another output dir")
        return cls(Path(run_dir), data)

    @classmethod
    def new(cls, run_dir: Path, *, recipe: str, recipe_path: str | None, seed: int) -> "RunState":
        stamp = now()
        data = {
            "recipe": recipe,
            "recipe_path": recipe_path,
            "seed": seed,
            "created": stamp,
            "updated": stamp,
            "stages": {},
        }
        return cls(Path(run_dir), data)

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def done_stages(self) -> list[str]:
        return [name for name, st in self.stages.items() if st.get("status") == "done"]

    def save(self) -> None:
        self.data["updated"] = now()
        write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=False) + "\n")

    def set_plan(self, stages: list[tuple[str, str, str | None]], keep: set[str]) -> None:
        """Lay out stages in plan order as (name, trainer, hash); entries in `keep` are kept as they are.

        A stage that will run gets its hash when it starts (`mark_running`): it folds in its
        inputs' fingerprints, known only once they are done."""
        fresh: dict[str, dict[str, Any]] = {}
        for name, trainer, key in stages:
            if name in keep:
                fresh[name] = self.stages[name]
            else:
                fresh[name] = _blank(trainer, key)
        self.data["stages"] = fresh
        self.save()

    def mark_running(self, name: str, key: str) -> None:
        st = self.stages[name]
        st.update(status="running", config_hash=key, started=now(), ended=None, seconds=None, outputs=None,
                  error=None, fingerprint=None)
        reset_peak_gpu()
        self.save()

    def mark_done(self, name: str, outputs: dict[str, Any], seconds: float) -> None:
        self.stages[name].update(status="done", ended=now(), seconds=round(seconds, 3), outputs=outputs, error=None,
                                 peak_rss_mib=peak_rss_mib(), **peak_gpu_mib())
        self.stages[name]["fingerprint"] = output_fingerprint(self.stages[name])  # what later stages key on
        self.save()

    def mark_failed(self, name: str, error: str, seconds: float) -> None:
        self.stages[name].update(status="failed", ended=now(), seconds=round(seconds, 3), error=error)
        self.save()


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB), for run.json."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _cuda():
    """torch, if this process has initialised CUDA (never imports torch just to ask)."""
    import sys

    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None


def reset_peak_gpu() -> None:
    """Start a stage's peak from what is allocated now, so `peak_gpu_mib` is that stage's own
    (earlier stages in the same process, e.g. a full-model SFT, would otherwise dominate it)."""
    if (torch := _cuda()) is not None:
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_mib() -> dict[str, float]:
    """`{"peak_gpu_mib": ...}`: the peak CUDA allocation of this process since the stage began,
    when it used a GPU (RSS, by contrast, is the process's peak so far: Linux cannot reset it)."""
    torch = _cuda()
    return {"peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if torch is not None else {}


def _blank(trainer: str, key: str | None) -> dict[str, Any]:
    return {
        "status": "pending",
        "trainer": trainer,
        "config_hash": key,
        "started": None,
        "ended": None,
        "seconds": None,
        "outputs": None,
        "error": None,
    }
