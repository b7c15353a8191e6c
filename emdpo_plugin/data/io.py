"""Reading and writing format-v1 comparison files (DESIGN.md section 3).

Every reader turns its source into plain dict rows and passes them through `rows.parse_rows`
(optionally with a column mapping, `keys`), so JSONL, parquet and HF `datasets` folders obey
exactly the same rules and produce the same error messages. Errors are one line,
`<file>: row <N>: field '<name>': <reason>`, and stop at the first problem: nothing is
silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emdpo_plugin import safe_json
from emdpo_plugin.data.keys import DataKeys
from emdpo_plugin.data.manifest import (
    check_disjoint_prompts,
    check_manifest,
    content_hash,
    read_manifest,
    write_manifest,
)
from emdpo_plugin.data.rows import KNOWN_FIELDS, check_ids_across_splits, common_text_format, parse_row, parse_rows
from emdpo_plugin.data.schema import SPLITS, Comparison, ComparisonSet
from emdpo_plugin.errors import DataError

__all__ = ["KNOWN_FIELDS", "parse_row", "parse_rows", "read_comparisons", "write_jsonl", "write_parquet",
           "write_hf_dataset", "load_dataset_dir", "write_dataset_dir", "DatasetDir", "SPLITS"]

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_FORMATS = (
    "JSON Lines (.jsonl or .json, one object per line), parquet (.parquet), "
    "or an HF datasets folder written with save_to_disk"
)

_PARQUET_BATCH = 4096


# --------------------------------------------------------------------------- raw readers


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded value); blank lines are not rows and are skipped. Each line must be
    UTF-8 and strict JSON (`safe_json.loads`: finite numbers, unique keys, bounded depth)."""
    with path.open("rb") as fh:
        for number, data in enumerate(fh, start=1):
            if not data.strip():
                continue
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: line {number}: invalid UTF-8: byte 0x{data[exc.start]:02x} "
                                f"at column {exc.start + 1}") from None
            try:
                yield number, safe_json.loads(line)
            except json.JSONDecodeError as exc:
                hint = ""
                if number == 1 and line.lstrip().startswith("["):
                    hint = " (expected one JSON object per line, not a JSON array)"
                raise DataError(f"{path}: row {number}: invalid JSON: {exc.msg} at column {exc.colno}{hint}") from None
            except safe_json.JsonInputError as exc:
                raise DataError(f"{path}: row {number}: {exc}") from None


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet file: {_first_line(exc)}") from None
    number = 0
    batches = pf.iter_batches(batch_size=_PARQUET_BATCH)
    while True:
        try:  # a damaged page fails only when it is read
            batch = next(batches, None)
            records = batch.to_pylist() if batch is not None else None
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read parquet file at row {number + 1}: {_first_line(exc)}") from None
        if records is None:
            return
        for record in records:
            number += 1
            yield number, record


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def is_hf_folder(path: Path) -> bool:
    """A folder written by datasets' save_to_disk (Dataset or DatasetDict)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def iter_hf(ds: Any) -> Iterator[tuple[int, Any]]:
    number = 0
    for batch in ds.iter(batch_size=_PARQUET_BATCH):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            number += 1
            yield number, dict(zip(columns, values))


def _load_hf(path: Path, split: str | None) -> tuple[str, Any]:
    """The chosen Dataset and the source name used in messages."""
    import datasets

    try:
        obj = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot load HF datasets folder: {exc}") from None
    if isinstance(obj, datasets.DatasetDict):
        available = ", ".join(sorted(obj))
        if split is None:
            raise DataError(f"{path}: holds a DatasetDict with splits [{available}]; choose one with split=...")
        if split not in obj:
            raise DataError(f"{path}: split {split!r} not found; available splits: [{available}]")
        return f"{path}[{split}]", obj[split]
    return str(path), obj


def require_rows(source: str, rows: list[Comparison]) -> list[Comparison]:
    """`rows`, or a DataError: training data without rows is a mistake, not an empty dataset."""
    if not rows:
        raise DataError(f"{source}: no comparisons (it holds no rows)")
    return rows


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (supported: {SUPPORTED_FORMATS})")


def _select_split(rows: list[Comparison], source: str, split: str) -> list[Comparison]:
    """Keep the rows whose `split` field equals `split` (a documented, explicit filter)."""
    kept = [r for r in rows if r.split == split]
    if not kept:
        present = sorted({r.split for r in rows if r.split is not None})
        found = f"splits present: [{', '.join(present)}]" if present else "no row has a 'split' field"
        raise DataError(f"{source}: no rows with split {split!r} ({found})")
    return kept


def read_comparisons(path: str | Path, *, split: str | None = None, keys: DataKeys | None = None,
                     allow_empty: bool = False) -> list[Comparison]:
    """Read and validate one comparison file or HF datasets folder; `keys` maps its columns.

    For an HF DatasetDict, `split` picks the sub-dataset (required). For any other source,
    `split` keeps only rows whose `split` field equals it, and it is an error if none do.
    A source without rows is an error unless `allow_empty` (a dataset folder's val/test file).
    """
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        if not is_hf_folder(path):
            raise DataError(
                f"{path}: folder is not an HF datasets folder (no dataset_dict.json or state.json); "
                f"supported: {SUPPORTED_FORMATS}. For a dataset folder with train/test files use load_dataset_dir"
            )
        source, ds = _load_hf(path, split)
        rows = parse_rows(source, iter_hf(ds), keys)
        if not allow_empty:
            require_rows(source, rows)
        is_dict_split = source != str(path)
        return rows if split is None or is_dict_split else _select_split(rows, source, split)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = parse_rows(str(path), _iter_jsonl(path), keys)
    elif suffix in PARQUET_SUFFIXES:
        rows = parse_rows(str(path), _iter_parquet(path), keys)
    else:
        raise DataError(f"{path}: unsupported file type {suffix or '(no extension)'!r}; supported: {SUPPORTED_FORMATS}")
    if not allow_empty:
        require_rows(str(path), rows)
    return rows if split is None else _select_split(rows, str(path), split)


# --------------------------------------------------------------------------- writers


def _records(rows: Iterable[Comparison], path: Path) -> list[dict]:
    """Validated plain records; refuses to write anything `read_comparisons` would reject."""
    records = []
    for comp in rows:
        rec = comp.to_record()
        rec["ranking"] = [int(i) for i in rec["ranking"]]
        records.append(rec)
    parse_rows(f"{path} (writing)", enumerate(records, start=1))
    return records


def write_jsonl(rows: Iterable[Comparison], path: str | Path) -> Path:
    """One normalised record per line, UTF-8, explicit comparison ids (so reads are exact)."""
    path = Path(path)
    records = _records(rows, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def _arrow_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("comparison_id", pa.string()),
            ("annotator_id", pa.string()),
            ("prompt", pa.string()),
            ("responses", pa.list_(pa.string())),
            ("ranking", pa.list_(pa.int64())),
            ("group", pa.string()),
            ("split", pa.string()),
            ("meta", pa.string()),  # JSON text: a column has one type, rows' metadata may differ
        ]
    )


def _arrow_table(records: list[dict], path: Path) -> Any:
    """Fixed schema so empty files and all-null optional columns keep their types."""
    import pyarrow as pa

    for number, rec in enumerate(records, start=1):
        if not isinstance(rec["prompt"], str):
            raise DataError(f"{path}: row {number}: field 'prompt': message lists are written as JSON Lines only "
                            "(write_jsonl)")
    schema = _arrow_schema()
    columns = {f.name: [rec.get(f.name) for rec in records] for f in schema}
    columns["meta"] = [json.dumps(rec["meta"], ensure_ascii=False) if "meta" in rec else None for rec in records]
    return pa.Table.from_pydict(columns, schema=schema)


def write_parquet(rows: Iterable[Comparison], path: str | Path) -> Path:
    """Parquet with a fixed schema; null `group`/`split` cells read back as absent."""
    import pyarrow.parquet as pq

    path = Path(path)
    table = _arrow_table(_records(rows, path), path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def write_hf_dataset(rows: Iterable[Comparison], path: str | Path) -> Path:
    """An HF `datasets.Dataset` saved with save_to_disk (readable by read_comparisons)."""
    import datasets

    path = Path(path)
    table = _arrow_table(_records(rows, path), path)
    features = datasets.Features(
        {
            "comparison_id": datasets.Value("string"),
            "annotator_id": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "responses": datasets.Sequence(datasets.Value("string")),
            "ranking": datasets.Sequence(datasets.Value("int64")),
            "group": datasets.Value("string"),
            "split": datasets.Value("string"),
            "meta": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(table.to_pydict(), features=features)
    ds.save_to_disk(str(path))
    return path


# --------------------------------------------------------------------------- dataset folders


def write_dataset_dir(
    folder: str | Path,
    train: list[Comparison],
    test: list[Comparison] | None,
    manifest: dict,
    val: list[Comparison] | None = None,
) -> Path:
    """Write train.jsonl, test.jsonl / val.jsonl (when given) and manifest.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, folder / "train.jsonl")
    if test is not None:
        write_jsonl(test, folder / "test.jsonl")
    if val is not None:
        write_jsonl(val, folder / "val.jsonl")
    write_manifest(folder, manifest)
    return folder


@dataclass
class DatasetDir:
    """A loaded dataset folder; test and val share train's annotator index space.

    `val` is the validation split (hyperparameters are chosen on it); user data may have none.
    `test` is read only by the final report stage, so no training choice can depend on it.
    """

    train: ComparisonSet
    test: ComparisonSet | None
    manifest: dict
    path: Path
    val: ComparisonSet | None = None

    @property
    def text_format(self) -> str:
        """`chat_template` (message-list prompts) or `plain`; every split agrees (checked on load)."""
        return self.train.text_format

    @property
    def content_hash(self) -> str:
        """The rows' identity: the manifest's content hash (checked against the files on load), or
        computed when the folder has no manifest. What every artifact built from the data keys on."""
        if self.manifest.get("content_hash"):
            return self.manifest["content_hash"]
        return content_hash(self.train.rows, self.test.rows if self.test else None, self.val.rows if self.val else None)


def find_split_file(folder: Path, split: str) -> Path | None:
    """The one data file for `split` (train/val/test) in a dataset folder, if any."""
    found = [folder / f"{split}{suf}" for suf in (".jsonl", *PARQUET_SUFFIXES) if (folder / f"{split}{suf}").is_file()]
    if len(found) > 1:
        raise DataError(f"{folder}: both {found[0].name} and {found[1].name} exist; keep one {split} file")
    return found[0] if found else None


def read_split_file(path: Path, split: str, keys: DataKeys | None = None) -> list[Comparison]:
    """Rows of a train/val/test file; a row's own `split` field, if set, must agree. Only a
    train file must hold rows (builders may write an empty test or val split)."""
    rows = read_comparisons(path, keys=keys, allow_empty=split != "train")
    for number, row in enumerate(rows, start=1):
        if row.split is not None and row.split != split:
            raise DataError(
                f"{path}: row {number}: field 'split': expected {split!r} or absent (this is the {split} file), "
                f"found {row.split!r}"
            )
    return rows


def _extended(train_set: ComparisonSet, rows: list[Comparison]) -> ComparisonSet:
    """Rows indexed in train's annotator space, unseen (evaluation) annotators appended."""
    ids = list(train_set.annotator_ids)
    known = set(ids)
    ids += [a for a in dict.fromkeys(r.annotator_id for r in rows) if a not in known]
    return ComparisonSet(rows, ids)


def load_dataset_dir(path: str | Path) -> DatasetDir:
    """Load train (required), val and test (optional) and manifest.json, checking they agree."""
    folder = Path(path)
    _check_exists(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: expected a dataset folder holding train.jsonl (or train.parquet) and manifest.json")
    train_file = find_split_file(folder, "train")
    if train_file is None:
        raise DataError(f"{folder}: no train.jsonl or train.parquet in dataset folder")
    test_file = find_split_file(folder, "test")
    val_file = find_split_file(folder, "val")
    train = read_split_file(train_file, "train")
    test = read_split_file(test_file, "test") if test_file is not None else None
    val = read_split_file(val_file, "val") if val_file is not None else None
    common_text_format({f.name: r for f, r in ((train_file, train), (val_file, val), (test_file, test))
                        if f is not None and r is not None})
    check_ids_across_splits({s: (str(f), r) for s, f, r in (("train", train_file, train), ("val", val_file, val),
                                                             ("test", test_file, test)) if f is not None and r is not None})
    manifest = read_manifest(folder) if (folder / "manifest.json").is_file() else {}
    if manifest:
        check_manifest(folder / "manifest.json", manifest, train, test, val)
        files = {"train": (train_file, train), "test": (test_file, test), "val": (val_file, val)}
        check_disjoint_prompts(folder / "manifest.json", manifest,
                               {s: (f, rows) for s, (f, rows) in files.items() if f is not None and rows is not None})
    train_set = ComparisonSet(train)
    return DatasetDir(
        train=train_set,
        test=_extended(train_set, test) if test is not None else None,
        manifest=manifest,
        path=folder,
        val=_extended(train_set, val) if val is not None else None,
    )
