"""manifest.json for dataset folders: what built the data, how much there is, and a hash.

The counts and content hash let `validate` and `load_dataset_dir` detect a manifest that no
longer describes its files (a hand-edited row, a truncated copy).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from emdpo_plugin import __version__, safe_json
from emdpo_plugin.data.rows import common_text_format
from emdpo_plugin.data.schema import FORMAT_VERSION, SPLITS, Comparison
from emdpo_plugin.errors import DataError
from emdpo_plugin.textfile import read_text

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
_RESERVED = ("format", "builder", "counts", "labels", "content_hash", "created_by", "disjoint_prompts", "text_format")


def content_hash(train: list[Comparison], test: list[Comparison] | None, val: list[Comparison] | None = None) -> str:
    """sha256 of the canonical JSON of all rows; order-sensitive, and split-aware.

    `val` enters the payload only when present, so folders written before the val split
    existed keep their hash.
    """
    payload: dict[str, Any] = {
        "train": [_canonical(r) for r in train],
        "test": None if test is None else [_canonical(r) for r in test],
    }
    if val is not None:
        payload["val"] = [_canonical(r) for r in val]
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(row: Comparison) -> dict:
    rec = row.to_record()
    rec["ranking"] = [int(i) for i in rec["ranking"]]
    return rec


def compute_counts(
    train: list[Comparison], test: list[Comparison] | None, val: list[Comparison] | None = None
) -> dict:
    """Training annotators, comparisons per split, and training annotators per ground-truth group.

    Test (and val) rows are often labelled by per-group evaluation annotators; they are counted
    apart (`test_annotators`, `val_annotators`) so `annotators` and `groups` describe the
    population trained on. The val keys appear only when there is a val split.
    """
    by_group: dict[str, set[str]] = {}
    for r in train:
        if r.group is not None:
            by_group.setdefault(r.group, set()).add(r.annotator_id)
    counts: dict[str, Any] = {
        "annotators": len({r.annotator_id for r in train}),
        "test_annotators": len({r.annotator_id for r in test or []}),
        "comparisons": {"train": len(train), "test": len(test or [])},
        "groups": {g: len(a) for g, a in sorted(by_group.items())},
    }
    if val is not None:
        counts["val_annotators"] = len({r.annotator_id for r in val})
        counts["comparisons"]["val"] = len(val)
    return counts


def build_manifest(
    train: list[Comparison],
    test: list[Comparison] | None,
    *,
    builder: str,
    config: dict,
    labels: dict | None = None,
    extra: dict | None = None,
    val: list[Comparison] | None = None,
    disjoint_prompts: tuple[str, ...] | list[str] = (),
) -> dict:
    """The manifest for a dataset folder; `extra` keys are merged at the top level.

    `disjoint_prompts` records the builder's promise that these splits share no prompt
    (checked by `check_disjoint_prompts` on every load and by `data validate`). `text_format`
    says how prompts become model text: `plain`, or `chat_template` for message lists.
    """
    unknown = sorted(set(disjoint_prompts) - set(SPLITS))
    if unknown:
        raise ValueError(f"build_manifest: disjoint_prompts names unknown split(s) {unknown} (known: {', '.join(SPLITS)})")
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "builder": {"name": builder, "config": dict(config)},
        "counts": compute_counts(train, test, val),
        "labels": dict(labels or {}),
        "content_hash": content_hash(train, test, val),
        "created_by": f"emdpo_plugin {__version__}",
        "text_format": _text_format(train, test, val),
    }
    if disjoint_prompts:
        manifest["disjoint_prompts"] = [s for s in SPLITS if s in set(disjoint_prompts)]
    clash = sorted(set(extra or {}) & set(_RESERVED))
    if clash:
        raise ValueError(f"build_manifest: extra keys {clash} would overwrite reserved manifest keys")
    manifest.update(extra or {})
    return manifest


def _text_format(train: list[Comparison], test: list[Comparison] | None, val: list[Comparison] | None) -> str:
    return common_text_format({"train": train, "val": val or [], "test": test or []})


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write manifest.json (sorted keys, indent 2) so diffs between builds stay readable."""
    path = Path(folder) / MANIFEST_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: str | Path) -> dict:
    """Parse manifest.json; a missing or malformed file is a DataError naming it."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: no such file (a dataset folder needs {MANIFEST_NAME})")
    try:
        manifest = safe_json.loads(read_text(path, max_bytes=MAX_MANIFEST_BYTES, error=DataError), allow_nan=True)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except safe_json.JsonInputError as exc:
        raise DataError(f"{path}: {exc}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    return manifest


def _lookup(manifest: dict, dotted: str, path: Path) -> Any:
    node: Any = manifest
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise DataError(f"{path}: field '{dotted}': required field missing")
        node = node[part]
    return node


def check_manifest(
    path: Path,
    manifest: dict,
    train: list[Comparison],
    test: list[Comparison] | None,
    val: list[Comparison] | None = None,
) -> None:
    """Raise DataError on the first way the manifest disagrees with the rows it describes."""
    fmt = _lookup(manifest, "format", path)
    if fmt != FORMAT_VERSION:
        raise DataError(f"{path}: field 'format': expected {FORMAT_VERSION!r}, found {fmt!r}")
    actual = compute_counts(train, test, val)
    checks = {
        "counts.comparisons.train": actual["comparisons"]["train"],
        "counts.comparisons.test": actual["comparisons"]["test"],
        "counts.annotators": actual["annotators"],
        "counts.groups": actual["groups"],
    }
    declared = (manifest.get("counts") or {}).get("comparisons") or {}
    if val is not None or "val" in declared:  # a manifest without val keys describes a folder without val
        checks["counts.comparisons.val"] = len(val) if val is not None else 0
    if "text_format" in manifest:  # manifests written before message-list prompts have none
        checks["text_format"] = _text_format(train, test, val)
    for dotted, expected in checks.items():
        found = _lookup(manifest, dotted, path)
        if found != expected:
            raise DataError(f"{path}: field '{dotted}': expected {expected!r} (from the data files), found {found!r}")
    if "content_hash" in manifest:
        expected_hash = content_hash(train, test, val)
        if manifest["content_hash"] != expected_hash:
            raise DataError(
                f"{path}: field 'content_hash': expected {expected_hash} (from the data files), "
                f"found {manifest['content_hash']!r}; the files changed after the manifest was written"
            )


def shared_prompts(a: list[Comparison], b: list[Comparison]) -> tuple[int, int | None, int | None]:
    """(number of distinct prompts in both, 1-based row in `a` and in `b` of the first shared one)."""
    first_b: dict[str, int] = {}
    for number, r in enumerate(b, start=1):
        first_b.setdefault(r.prompt, number)
    shared: set[str] = set()
    first: tuple[int | None, int | None] = (None, None)
    for number, r in enumerate(a, start=1):
        if r.prompt in first_b:
            if not shared:
                first = (number, first_b[r.prompt])
            shared.add(r.prompt)
    return len(shared), first[0], first[1]


def check_disjoint_prompts(path: Path, manifest: dict, splits: dict[str, tuple[Path, list[Comparison]]]) -> None:
    """Enforce the manifest's `disjoint_prompts` promise on the split files present.

    `splits` maps split name -> (file, rows). Evaluation on val or test is only held out if
    no prompt was seen in another split; the error names both files and rows.
    """
    promised = manifest.get("disjoint_prompts") or []
    if not isinstance(promised, list) or not all(isinstance(s, str) and s in SPLITS for s in promised):
        raise DataError(f"{path}: field 'disjoint_prompts': expected a list of split names from {list(SPLITS)}, "
                        f"found {promised!r}")
    present = [s for s in promised if s in splits]
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            (file_a, rows_a), (file_b, rows_b) = splits[a], splits[b]
            n, row_a, row_b = shared_prompts(rows_a, rows_b)
            if n:
                raise DataError(
                    f"{file_a}: row {row_a}: field 'prompt': also the prompt of {file_b.name} row {row_b} "
                    f"({n} prompt(s) shared); {path.name} promises {a} and {b} share no prompt (disjoint_prompts)"
                )
