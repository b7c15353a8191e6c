"""`openrlhf data validate PATH [--keys ...]`: check a data source against format v1.

Uses the same readers (and so the same row rules, `rows.parse_row`, and column mapping) as the
data stage, so a path that validates is a path that loads. Stops at the first problem with a
one-line DataError. The summary lists the extra columns kept as per-row metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from emdpo_plugin.data import io, sources
from emdpo_plugin.data.keys import DataKeys
from emdpo_plugin.data.manifest import (
    MANIFEST_NAME,
    check_disjoint_prompts,
    check_manifest,
    read_manifest,
    shared_prompts,
)
from emdpo_plugin.data.rows import check_ids_across_splits, common_text_format
from emdpo_plugin.data.schema import Comparison
from emdpo_plugin.errors import DataError


@dataclass
class ValidationReport:
    """What a valid path holds; `groups` maps ground-truth group -> number of annotators."""

    path: Path
    rows_per_file: dict[str, int] = field(default_factory=dict)
    annotators: int = 0
    groups: dict[str, int] = field(default_factory=dict)
    pairwise_rows: int = 0
    ranking_rows: int = 0
    manifest: bool = False
    # "val/test" -> distinct prompts shared by the two evaluation splits (dataset folders with both)
    shared_prompts: dict[str, int] = field(default_factory=dict)
    disjoint_promised: list[str] = field(default_factory=list)
    extra_columns: list[str] = field(default_factory=list)  # kept as each row's `meta`
    text_format: str = "plain"
    keys: str = ""  # the column mapping used, `prompt=question,...`

    @property
    def total_rows(self) -> int:
        return sum(self.rows_per_file.values())

    def summary(self) -> str:
        """One paragraph for humans (the CLI prints it)."""
        files = ", ".join(f"{name} ({n} rows)" for name, n in self.rows_per_file.items())
        groups = (
            "groups: " + ", ".join(f"{g} ({n} annotators)" for g, n in self.groups.items())
            if self.groups
            else "no ground-truth groups"
        )
        manifest = "manifest.json matches the data" if self.manifest else "no manifest.json checked"
        overlap = "".join(
            f"; {pair} prompts " + ("disjoint" if n == 0 else f"overlap ({n} shared)")
            for pair, n in self.shared_prompts.items()
        )
        promise = f" (disjoint prompts promised and checked: {', '.join(self.disjoint_promised)})" if self.disjoint_promised else ""
        keys = f" with keys {self.keys}" if self.keys else ""
        extra = ("extra columns kept as metadata: " + ", ".join(self.extra_columns)
                 if self.extra_columns else "no extra columns")
        return (
            f"{self.path} is valid format-v1 data{keys}: "
            f"{self.total_rows} comparisons in {files}; {self.annotators} annotators; {groups}; "
            f"{self.pairwise_rows} pairwise and {self.ranking_rows} ranking rows (3+ responses){overlap}; "
            f"prompts: {self.text_format}; {extra}; {manifest}{promise}."
        )


def _tally(report: ValidationReport, name: str, rows: list[Comparison]) -> None:
    report.rows_per_file[name] = len(rows)
    for r in rows:
        if r.is_pairwise:
            report.pairwise_rows += 1
        else:
            report.ranking_rows += 1


def _finish(report: ValidationReport, rows: list[Comparison]) -> ValidationReport:
    by_group: dict[str, set[str]] = {}
    for r in rows:
        if r.group is not None:
            by_group.setdefault(r.group, set()).add(r.annotator_id)
    report.annotators = len({r.annotator_id for r in rows})
    report.groups = {g: len(a) for g, a in sorted(by_group.items())}
    report.extra_columns = sorted({k for r in rows for k in r.meta})
    return report


def _validate_splits(path: Path, splits: sources.Splits) -> ValidationReport:
    """The summary of a source's splits (split -> (file or split name, rows)), in split order."""
    report = ValidationReport(path=path)
    local = path.exists()
    for split in io.SPLITS:
        if split in splits:
            label, rows = splits[split]
            _tally(report, Path(label).name if local else label, rows)
    if "val" in splits and "test" in splits:
        report.shared_prompts["val/test"] = shared_prompts(splits["val"][1], splits["test"][1])[0]
    report.text_format = common_text_format(dict(splits.values()))
    check_ids_across_splits({s: splits[s] for s in io.SPLITS if s in splits})
    return _finish(report, [r for _, rows in splits.values() for r in rows])


def _validate_dataset_folder(path: Path, keys: DataKeys | None) -> ValidationReport:
    """train/val/test files (each through the row rules) plus manifest.json if present."""
    files = {split: io.find_split_file(path, split) for split in io.SPLITS}
    if all(f is None for f in files.values()):
        names = "/".join(f"{s}.jsonl/{s}.parquet" for s in io.SPLITS)
        raise DataError(
            f"{path}: folder holds no {names} and is not an HF datasets folder; supported: {io.SUPPORTED_FORMATS}"
        )
    rows = {split: io.read_split_file(f, split, keys) for split, f in files.items() if f is not None}
    report = _validate_splits(path, {s: (files[s].name, r) for s, r in rows.items()})  # type: ignore[union-attr]
    if (path / MANIFEST_NAME).is_file():
        manifest = read_manifest(path)
        check_manifest(path / MANIFEST_NAME, manifest, rows.get("train", []), rows.get("test"), rows.get("val"))
        check_disjoint_prompts(path / MANIFEST_NAME, manifest, {s: (files[s], r) for s, r in rows.items()})  # type: ignore[misc]
        report.manifest = True
        report.disjoint_promised = [s for s in manifest.get("disjoint_prompts") or [] if s in rows]
    return report


def validate_path(path: str | Path, keys: DataKeys | None = None) -> ValidationReport:
    """Validate a data file, a dataset folder, an HF datasets folder or a hub dataset id;
    `keys` maps the source's column names to format v1's."""
    shown = keys.describe() if keys is not None else ""
    if sources.is_hub_id(str(path)) or io.is_hf_folder(Path(path)):
        report = _validate_splits(Path(path), sources.read_hf(path, keys))
    elif not Path(path).exists():
        raise DataError(f"{path}: no such file or folder (supported: {io.SUPPORTED_FORMATS}, or a hub dataset id)")
    elif Path(path).is_dir():
        report = _validate_dataset_folder(Path(path), keys)
    else:
        report = _validate_splits(Path(path), {"train": (str(path), io.read_comparisons(path, keys=keys))})
    report.keys = shown
    return report
