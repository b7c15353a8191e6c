"""`openrlhf data validate PATH`: check a file or dataset folder against format v1.

Uses the same readers (and so the same row rules, `io.parse_row`) as training, so a path
that validates is a path that loads. Stops at the first problem with a one-line DataError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from emdpo_plugin.data import io
from emdpo_plugin.data.manifest import (
    MANIFEST_NAME,
    check_disjoint_prompts,
    check_manifest,
    read_manifest,
    shared_prompts,
)
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
        return (
            f"{self.path} is valid format-v1 data: "
            f"{self.total_rows} comparisons in {files}; {self.annotators} annotators; {groups}; "
            f"{self.pairwise_rows} pairwise and {self.ranking_rows} ranking rows (3+ responses){overlap}; "
            f"{manifest}{promise}."
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
    return report


def _validate_hf_folder(path: Path) -> ValidationReport:
    """Every split of a DatasetDict, or the single Dataset."""
    import datasets

    report = ValidationReport(path=path)
    if (path / "dataset_dict.json").is_file():
        splits = list(datasets.load_from_disk(str(path)))
    else:
        splits = [None]
    all_rows: list[Comparison] = []
    for split in splits:
        rows = io.read_comparisons(path, split=split)
        _tally(report, path.name if split is None else f"{path.name}[{split}]", rows)
        all_rows += rows
    return _finish(report, all_rows)


def _validate_dataset_folder(path: Path) -> ValidationReport:
    """train/val/test files (each through the row rules) plus manifest.json if present."""
    files = {split: io.find_split_file(path, split) for split in io.SPLITS}
    if all(f is None for f in files.values()):
        names = "/".join(f"{s}.jsonl/{s}.parquet" for s in io.SPLITS)
        raise DataError(
            f"{path}: folder holds no {names} and is not an HF datasets folder; supported: {io.SUPPORTED_FORMATS}"
        )
    report = ValidationReport(path=path)
    rows = {split: io.read_split_file(f, split) for split, f in files.items() if f is not None}
    for split in io.SPLITS:
        if split in rows:
            _tally(report, files[split].name, rows[split])  # type: ignore[union-attr]
    if "val" in rows and "test" in rows:
        report.shared_prompts["val/test"] = shared_prompts(rows["val"], rows["test"])[0]
    if (path / MANIFEST_NAME).is_file():
        manifest = read_manifest(path)
        check_manifest(path / MANIFEST_NAME, manifest, rows.get("train", []), rows.get("test"), rows.get("val"))
        check_disjoint_prompts(path / MANIFEST_NAME, manifest, {s: (files[s], r) for s, r in rows.items()})  # type: ignore[misc]
        report.manifest = True
        report.disjoint_promised = [s for s in manifest.get("disjoint_prompts") or [] if s in rows]
    return _finish(report, [r for split in io.SPLITS for r in rows.get(split, [])])


def validate_path(path: str | Path) -> ValidationReport:
    """Validate a single data file, an HF datasets folder, or a dataset folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (supported: {io.SUPPORTED_FORMATS})")
    if path.is_dir():
        return _validate_hf_folder(path) if io.is_hf_folder(path) else _validate_dataset_folder(path)
    rows = io.read_comparisons(path)
    report = ValidationReport(path=path)
    _tally(report, path.name, rows)
    return _finish(report, rows)
