"""Fingerprints: what identifies a cached or checkpointed artifact, so reuse follows identity,
never location.

A stage's result is reused only when the fingerprint of what produced it matches: its config,
the seed, the content of its input data and the identity of the model it starts from. A folder
that is merely *there* (`sft/model`, `cache/ref_logps-*.npz`, `em/restarts/r0`) proves nothing,
because a resumed run with another seed, other data or another SFT config writes the same paths.

- `output_fingerprint`: a done stage's identity: its key (runner.stage_hash, which folds in its
  inputs' fingerprints, so the chain is Merkle-like) and its recorded outputs.
- `path_digest`: the bytes of a data file or folder (an external data source).
- `model_identity`: a model folder or hub id, cheaply: a `stage:NAME` model is its stage's
  fingerprint; a local folder its files' names, sizes and mtimes (hashing gigabytes of weights on
  every start would cost more than it protects); a hub id its cached snapshot, when there is one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def digest(payload: Any, length: int = 16) -> str:
    """Short sha256 of a JSON-able payload (sorted keys, so dict order never matters)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def output_fingerprint(record: dict[str, Any]) -> str | None:
    """Identity of a stage's recorded result (a run.json stage entry); None unless it is done.

    Computed from the entry itself, so a hand-edited or stale `fingerprint` field is never trusted."""
    if record.get("status") != "done" or not record.get("config_hash"):
        return None
    return digest({"key": record["config_hash"], "outputs": record.get("outputs")})


def stage_fingerprint(run_dir: Path | None, stage: str) -> str | None:
    """`output_fingerprint` of `stage` as `<run_dir>/run.json` records it (None: not done there)."""
    path = Path(run_dir or ".") / "run.json"
    if not path.is_file():
        return None
    try:
        record = (json.loads(path.read_text(encoding="utf-8")).get("stages") or {}).get(stage) or {}
    except (OSError, ValueError):
        return None
    return output_fingerprint(record)


def path_digest(path: str | Path) -> str | None:
    """sha256 of a file's bytes, or of a folder's relative paths and bytes; None if `path` is not
    local (a hub dataset id: its identity is its name)."""
    root = Path(path).expanduser()
    if not root.exists():
        return None
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(root) if f != root else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]


def folder_stat_digest(path: Path) -> str:
    """Names, sizes and mtimes of every file under `path`: changes whenever a file is rewritten."""
    rows = []
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        st = f.stat()
        rows.append([str(f.relative_to(path)), st.st_size, st.st_mtime_ns])
    return digest(rows, 32)


def model_identity(spec: str, resolved: str, run_dir: Path | None) -> dict[str, Any]:
    """Identity of the model `spec` (`stage:NAME`, a folder or a hub id) that resolved to `resolved`."""
    if spec.startswith("stage:"):
        return {"stage": spec.removeprefix("stage:"), "fingerprint": stage_fingerprint(run_dir, spec.removeprefix("stage:"))}
    local = Path(resolved).expanduser()
    if local.is_dir():
        return {"folder": str(local.resolve()), "files": folder_stat_digest(local)}
    return {"hub": resolved, "snapshot": _hub_snapshot(resolved)}


def _hub_snapshot(repo_id: str) -> str | None:
    """The commit of the cached hub snapshot `repo_id` would load from (None: not cached)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id, no hub library: identity is the name
        return None
    return os.path.basename(os.path.dirname(found)) if isinstance(found, str) else None
