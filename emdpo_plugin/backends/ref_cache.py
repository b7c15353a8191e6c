"""Reference log-probs on disk, keyed by content: one file per reference model, one entry per
(prompt, responses).

A comparison id is not an identity: builders number rows by position, so a resumed run with
another seed or other data reuses the ids for other prompts. An entry is therefore keyed by a
hash of its prompt and responses (the only inputs of the reference's scores), and the file by
the reference model's identity (`OpenRLHFBackend.reference_identity`: the SFT stage's
fingerprint or the model folder's files, plus max_len and dtype). A changed prompt or model
misses the cache and is scored again; nothing stale can be served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..data.schema import ComparisonSet
from ..fingerprint import digest


def row_key(prompt: str, responses: list[str]) -> str:
    """The content key of one comparison's reference scores."""
    return digest([str(prompt), [str(r) for r in responses]], length=32)


def cache_file(run_dir: Path | None, identity: Any) -> Path | None:
    """`<run>/cache/ref-logps-<identity hash>.npz`; None without a run folder (nothing on disk)."""
    return None if run_dir is None else Path(run_dir) / "cache" / f"ref-logps-{digest(identity)}.npz"


class ReferenceCache:
    """The entries of one reference model, loaded from `path` on first use."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._rows: dict[str, np.ndarray] | None = None

    def _entries(self) -> dict[str, np.ndarray]:
        if self._rows is None:
            found = self.path is not None and self.path.exists()
            self._rows = dict(np.load(self.path, allow_pickle=False)) if found else {}
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
        """(scores (n, max_responses) NaN-padded, rows computed): missing rows are scored by
        `compute(row indices)` once per distinct content and saved (atomically) when `write`."""
        keys, rows = self.keys(data), self._entries()
        missing = [i for i, k in enumerate(keys) if k not in rows]
        if missing:
            distinct = list({keys[i]: i for i in missing}.values())
            computed = compute(distinct)
            for row, i in enumerate(distinct):
                rows[keys[i]] = computed[row, : len(data.responses[i])]
            if write and self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp.npz")
                np.savez(tmp, **rows)
                tmp.replace(self.path)
        out = np.full((len(data), data.max_responses), np.nan)
        for i, k in enumerate(keys):
            out[i, : len(rows[k])] = rows[k]
        return out, len(missing)
