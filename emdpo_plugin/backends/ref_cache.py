"""The reference log-prob cache file (`<run>/cache/ref_logps-<key>.npz`): comparison id -> scores.

A cache only saves time, so a file that cannot be read (cut short by a kill, damaged on disk,
not written by us) is dropped with a warning and its rows are scored again, never a traceback.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..runlog import warn

_DAMAGED = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def _check(cache: dict[str, np.ndarray]) -> None:
    for cid, v in cache.items():
        if v.ndim != 1 or not np.issubdtype(v.dtype, np.floating) or np.isnan(v).any():
            raise ValueError(f"entry {cid!r} is not a 1-D array of log-probs")


def load_ref_cache(path: Path | None) -> dict[str, np.ndarray]:
    """The cached scores by comparison id; {} when there is no file or it is damaged (warned)."""
    if path is None or not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            cache = {cid: np.asarray(z[cid]) for cid in z.files}
        _check(cache)
    except _DAMAGED as exc:
        reason = (str(exc).splitlines() or [""])[0]
        warn(f"warning: {path}: damaged reference log-prob cache dropped ({type(exc).__name__}: {reason}); "
             "its rows are scored again")
        return {}
    return cache


def save_ref_cache(path: Path, cache: dict[str, np.ndarray]) -> None:
    """Write `cache` to `path` atomically (a kill leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **cache)
    tmp.replace(path)
