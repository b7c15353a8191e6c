"""Stage folders: nothing half-written is ever read by a later stage or a resumed run.

Design: run.json is the commit point. A stage writes `<run>/<stage>/` in place, and the runner
marks it done only after the trainer returned and its outputs validated; later stages read only
the outputs that done stages recorded, and `--resume` reuses only done stages. So a folder a
kill left half-written is never read as a result. Before a stage that is not done runs (again),
`reset_stage_dir` empties its folder except the trainer's `resume_state` (em_dpo's checkpoints,
sft's tiny model: each swapped in atomically and keyed by the fingerprint of what produced it),
so no file of an unfinished or superseded attempt survives into the new result.

Why not write into a temporary sibling and rename it into place: every trainer records
run-relative paths to its files (`em/type0`), which would then have to name a folder that does
not exist yet, and em_dpo resumes from checkpoints inside its own folder, which a fresh
temporary folder would lose. Readers outside a run (`serve`, `export`) should likewise take a
stage folder only once run.json says the stage is done.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

from .state import RESOLVED_RECIPE, RUN_FILE


def reset_stage_dir(stage_dir: Path, keep: Iterable[str] = ()) -> list[str]:
    """Empty `stage_dir` except the entries named in `keep`; returns the names removed."""
    if not stage_dir.is_dir():
        if stage_dir.exists() or stage_dir.is_symlink():
            stage_dir.unlink()  # a file where the folder belongs: never a result
        return []
    kept = set(keep)
    removed = []
    for entry in sorted(stage_dir.iterdir()):
        if entry.name in kept:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed


def remove_write_leftovers(run_dir: Path) -> list[str]:
    """Temp files a kill left behind in `run_dir` while writing run.json or the resolved recipe
    (`state.write_atomic`'s `.<name>.*.tmp`); safe only under the run lock."""
    removed = []
    for name in (RUN_FILE, RESOLVED_RECIPE):
        for tmp in run_dir.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed
