"""Reference log-probs on disk, keyed by content: one file per reference model, one entry per
(prompt, responses).

A comparison id is not an identity: builders number rows by position, so a resumed run with
another seed or other data reuses the ids for other prompts. An entry is therefore keyed by a
hash of its prompt and responses (the only inputs of the reference's scores), and the file by
the reference model's identity (`OpenRLHFBackend.reference_identity`: the SFT stage's
fingerprint or the model folder's files, plus max_len and dtype). A changed prompt or model
misses the cache and is scored again; nothing stale can be served. A cache only saves time, so
a file that cannot be read (cut short by a kill, damaged on disk, not written by us) is dropped
with a warning and its rows are scored again, never a traceback.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..data.schema import ComparisonSet
from ..fingerprint import digest
from ..runlog import warn

_DAMAGED = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def row_key(prompt: str, responses: list[str]) -> str:
    """The content key of one comparison's reference scores."""
    return digest([str(prompt), [str(r) for r in responses]], length=32)


def cache_file(run_dir: Path | None, identity: Any, kind: str = "logps") -> Path | None:
    """`<run>/cache/ref-<kind>-<identity hash>.npz`; None without a run folder (nothing on disk)."""
    return None if run_dir is None else Path(run_dir) / "cache" / f"ref-{kind}-{digest(identity)}.npz"


class ReferenceCache:
    """The entries of one reference model, loaded from `path` on first use."""

    def __init__(self, path: Path | None, ndim: int = 1) -> None:
        self.path, self.ndim = path, ndim  # ndim of one entry: 1 (log-prob per response), 2 (a vector each)
        self._rows: dict[str, np.ndarray] | None = None

    def _entries(self) -> dict[str, np.ndarray]:
        if self._rows is None:
            self._rows = load_entries(self.path, self.ndim)
        return self._rows

    def missing(self, data: ComparisonSet) -> list[int]:
        """Rows of `data` with no entry."""
        rows = self._entries()
        return [i for i, k in enumerate(self.keys(data)) if k not in rows]

    @staticmethod
    def keys(data: ComparisonSet) -> list[str]:
        return [row_key(p, rs) for p, rs in zip(data.prompts, data.responses)]

    def reload_if_incomplete(self, data: ComparisonSet) -> None:
        """Forget what was loaded if `data` has rows it lacks, so the file (completed by another
        process) is read again instead of every reader scoring them itself."""
        if self._rows is not None and self.missing(data):
            self._rows = None

    def scores(self, data: ComparisonSet, compute: Callable[[list[int]], np.ndarray], *,
               write: bool = True) -> tuple[np.ndarray, int]:
        """(scores (n, max_responses, ...) NaN-padded, rows computed): missing rows are scored by
        `compute(row indices)` once per distinct content and saved (atomically) when `write`."""
        keys, rows = self.keys(data), self._entries()
        missing = [i for i, k in enumerate(keys) if k not in rows]
        if missing:
            distinct = list({keys[i]: i for i in missing}.values())
            self.put(data, distinct, compute(distinct), write=write)
        tail = next(iter(rows.values())).shape[1:] if rows else ()
        out = np.full((len(data), data.max_responses, *tail), np.nan)
        for i, k in enumerate(keys):
            out[i, : len(rows[k])] = rows[k]
        return out, len(missing)

    def put(self, data: ComparisonSet, rows: list[int], values: np.ndarray, *, write: bool = True) -> None:
        """Enter `values[r]` for row `rows[r]` of `data` (a pass that computed them anyway), and
        save the file (atomically) when `write`."""
        entries, keys = self._entries(), self.keys(data)
        for r, i in enumerate(rows):
            entries[keys[i]] = np.asarray(values[r, : len(data.responses[i])])
        if write and self.path is not None:
            save_entries(self.path, entries)


def load_entries(path: Path | None, ndim: int = 1) -> dict[str, np.ndarray]:
    """A cache file's entries; {} when there is none or it is damaged (with a warning)."""
    if path is None or not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            rows = {key: np.asarray(z[key]) for key in z.files}
        for key, v in rows.items():
            if v.ndim != ndim or not np.issubdtype(v.dtype, np.floating) or np.isnan(v).any():
                raise ValueError(f"entry {key!r} is not a {ndim}-D array of finite scores")
    except _DAMAGED as exc:
        reason = (str(exc).splitlines() or [""])[0]
        what = "log-prob" if ndim == 1 else "feature"
        warn(f"warning: {path}: damaged reference {what} cache dropped ({type(exc).__name__}: {reason}); "
             "its rows are scored again")
        return {}
    return rows


def save_entries(path: Path, rows: dict[str, np.ndarray]) -> None:
    """Write the entries atomically (a kill leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **rows)
    tmp.replace(path)
