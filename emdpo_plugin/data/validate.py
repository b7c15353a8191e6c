"""`openrlhf data validate PATH`: check a file or dataset folder against format v1.

Uses the same readers (and so the same row rules, `io.parse_row`) as training, so a path
that validates is a path that loads. Stops at the first problem with a one-line DataError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from emdpo_plugin.data import io
from emdpo_plugin.data.manifest import MANIFEST_NAME, check_manifest, read_manifest
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
        return (
            f"{self.path} is valid format-v1 data: "
            f"{self.total_rows} comparisons in {files}; {self.annotators} annotators; {groups}; "
            f"{self.pairwise_rows} pairwise and {self.ranking_rows} ranking rows (3+ responses); {manifest}."
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
    """train/test files (each through the row rules) plus manifest.json if present."""
    train_file = io.find_split_file(path, "train")
    test_file = io.find_split_file(path, "test")
    if train_file is None and test_file is None:
        raise DataError(
            f"{path}: folder holds no train.jsonl/train.parquet/test.jsonl/test.parquet and is not an HF "
            f"datasets folder; supported: {io.SUPPORTED_FORMATS}"
        )
    report = ValidationReport(path=path)
    train = io.read_split_file(train_file, "train") if train_file is not None else []
    test = io.read_split_file(test_file, "test") if test_file is not None else None
    if train_file is not None:
        _tally(report, train_file.name, train)
    if test_file is not None and test is not None:
        _tally(report, test_file.name, test)
    if (path / MANIFEST_NAME).is_file():
        check_manifest(path / MANIFEST_NAME, read_manifest(path), train, test)
        report.manifest = True
    return _finish(report, train + (test or []))


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
