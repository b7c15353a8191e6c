"""Reading and writing format-v1 comparison files (DESIGN.md section 3).

Every reader turns its source into plain dict rows and passes each through `parse_row`, so
JSONL, parquet and HF `datasets` folders obey exactly the same rules and produce the same
error messages. Errors are one line, `<file>: row <N>: field '<name>': <reason>`, and stop
at the first problem: nothing is silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emdpo_plugin.data.schema import Comparison, ComparisonSet, comparison_hash
from emdpo_plugin.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_FORMATS = (
    "JSON Lines (.jsonl or .json, one object per line), parquet (.parquet), "
    "or an HF datasets folder written with save_to_disk"
)
SPLITS = ("train", "val", "test")  # a dataset folder's files: <split>.jsonl or <split>.parquet

_REQUIRED = ("annotator_id", "prompt")
_RANKED = ("responses", "ranking")
_PAIRWISE = ("chosen", "rejected")
_OPTIONAL = ("group", "comparison_id", "split")
KNOWN_FIELDS = frozenset(_REQUIRED + _RANKED + _PAIRWISE + _OPTIONAL)

_PARQUET_BATCH = 4096


# --------------------------------------------------------------------------- row rules


def _kind(value: Any) -> str:
    """JSON-ish name plus a short repr, so messages say what was actually found."""
    names = {
        type(None): "null",
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "object",
    }
    name = names.get(type(value), type(value).__name__)
    if value is None:
        return name
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{name} {text}"


def _fail(where: str, field: str, reason: str) -> DataError:
    return DataError(f"{where}: field '{field}': {reason}")


def _present(row: dict, key: str) -> bool:
    """Null counts as absent: columnar formats fill missing optional cells with null."""
    return row.get(key) is not None


def _require_str(row: dict, key: str, where: str, *, allow_empty: bool) -> str:
    if key not in row:
        raise _fail(where, key, "required field missing (expected a string)")
    if row[key] is None:
        raise _fail(where, key, "expected a string, found null")
    value = row[key]
    if not isinstance(value, str):
        raise _fail(where, key, f"expected a string, found {_kind(value)}")
    if not allow_empty and not value.strip():
        raise _fail(where, key, f"expected a non-empty string, found {value!r}")
    return value


def _parse_responses(row: dict, where: str) -> list[str]:
    value = row["responses"]
    if not isinstance(value, list):
        raise _fail(where, "responses", f"expected a list of >= 2 strings, found {_kind(value)}")
    if len(value) < 2:
        raise _fail(where, "responses", f"expected a list of >= 2 strings, found {len(value)} item(s)")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _fail(where, "responses", f"expected item {i} to be a string, found {_kind(item)}")
        if not item.strip():
            raise _fail(where, "responses", f"expected item {i} to be a non-empty string, found {item!r}")
    return list(value)


def _parse_ranking(row: dict, where: str, n_responses: int) -> list[int]:
    if not _present(row, "ranking"):
        raise _fail(where, "ranking", "expected a list of response indices (best first) with 'responses', found nothing")
    value = row["ranking"]
    if not isinstance(value, list) or not value:
        found = "an empty list" if value == [] else _kind(value)
        raise _fail(where, "ranking", f"expected a non-empty list of integer indices, found {found}")
    seen: set[int] = set()
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int):
            raise _fail(where, "ranking", f"expected item {i} to be an integer index, found {_kind(item)}")
        if not 0 <= item < n_responses:
            raise _fail(
                where,
                "ranking",
                f"expected indices in 0..{n_responses - 1} ({n_responses} responses), found {item} at item {i}",
            )
        if item in seen:
            raise _fail(where, "ranking", f"expected distinct indices, found {item} twice")
        seen.add(item)
    return list(value)


def _parse_candidates(row: dict, where: str) -> tuple[list[str], list[int]]:
    """Either responses + ranking or the chosen/rejected shorthand, never both."""
    ranked = [k for k in _RANKED if _present(row, k)]
    pairwise = [k for k in _PAIRWISE if _present(row, k)]
    if ranked and pairwise:
        raise _fail(
            where,
            pairwise[0],
            f"cannot be combined with '{ranked[0]}': use either responses + ranking or chosen + rejected",
        )
    if pairwise:
        chosen = _require_str(row, "chosen", where, allow_empty=False)
        rejected = _require_str(row, "rejected", where, allow_empty=False)
        return [chosen, rejected], [0, 1]
    if not ranked:
        raise _fail(where, "responses", "expected 'responses' + 'ranking' or 'chosen' + 'rejected', found neither")
    if not _present(row, "responses"):
        raise _fail(where, "responses", "expected a list of >= 2 strings alongside 'ranking', found nothing")
    responses = _parse_responses(row, where)
    return responses, _parse_ranking(row, where, len(responses))


def _optional_str(row: dict, key: str, where: str) -> str | None:
    return _require_str(row, key, where, allow_empty=False) if _present(row, key) else None


def parse_row(row: Any, where: str) -> Comparison:
    """Validate one raw row and normalise it; `where` is the `<file>: row <N>` prefix.

    The single definition of the row rules: every reader and writer goes through it.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, found {_kind(row)}")
    for key in row:
        if key not in KNOWN_FIELDS:
            raise _fail(where, str(key), f"unknown field (expected only {', '.join(sorted(KNOWN_FIELDS))})")
    annotator_id = _require_str(row, "annotator_id", where, allow_empty=False)
    prompt = _require_str(row, "prompt", where, allow_empty=True)
    responses, ranking = _parse_candidates(row, where)
    cid = _optional_str(row, "comparison_id", where)
    return Comparison(
        annotator_id=annotator_id,
        prompt=prompt,
        responses=responses,
        ranking=ranking,
        comparison_id=cid if cid is not None else comparison_hash(annotator_id, prompt, responses, ranking),
        group=_optional_str(row, "group", where),
        split=_optional_str(row, "split", where),
    )


def parse_rows(source: str, rows: Iterable[tuple[int, Any]]) -> list[Comparison]:
    """Parse numbered raw rows from one file, rejecting duplicate comparison ids."""
    out: list[Comparison] = []
    first_seen: dict[str, int] = {}
    for number, raw in rows:
        where = f"{source}: row {number}"
        comp = parse_row(raw, where)
        if comp.comparison_id in first_seen:
            derived = "" if _present(raw, "comparison_id") else " (derived from the row content)"
            raise _fail(
                where,
                "comparison_id",
                f"expected a unique id, found {comp.comparison_id!r}{derived} "
                f"already used by row {first_seen[comp.comparison_id]}",
            )
        first_seen[comp.comparison_id] = number
        out.append(comp)
    return out


# --------------------------------------------------------------------------- raw readers


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded value); blank lines are not rows and are skipped."""
    with path.open("r", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                hint = ""
                if number == 1 and line.lstrip().startswith("["):
                    hint = " (expected one JSON object per line, not a JSON array)"
                raise DataError(f"{path}: row {number}: invalid JSON: {exc.msg} at column {exc.colno}{hint}") from None


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet file: {exc}") from None
    number = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH):
        for record in batch.to_pylist():
            number += 1
            yield number, record


def is_hf_folder(path: Path) -> bool:
    """A folder written by datasets' save_to_disk (Dataset or DatasetDict)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _iter_hf(ds: Any) -> Iterator[tuple[int, Any]]:
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


def read_comparisons(path: str | Path, *, split: str | None = None) -> list[Comparison]:
    """Read and validate one comparison file or HF datasets folder.

    For an HF DatasetDict, `split` picks the sub-dataset (required). For any other source,
    `split` keeps only rows whose `split` field equals it, and it is an error if none do.
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
        rows = parse_rows(source, _iter_hf(ds))
        is_dict_split = source != str(path)
        return rows if split is None or is_dict_split else _select_split(rows, source, split)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = parse_rows(str(path), _iter_jsonl(path))
    elif suffix in PARQUET_SUFFIXES:
        rows = parse_rows(str(path), _iter_parquet(path))
    else:
        raise DataError(f"{path}: unsupported file type {suffix or '(no extension)'!r}; supported: {SUPPORTED_FORMATS}")
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
        ]
    )


def _arrow_table(records: list[dict]) -> Any:
    """Fixed schema so empty files and all-null optional columns keep their types."""
    import pyarrow as pa

    schema = _arrow_schema()
    columns = {f.name: [rec.get(f.name) for rec in records] for f in schema}
    return pa.Table.from_pydict(columns, schema=schema)


def write_parquet(rows: Iterable[Comparison], path: str | Path) -> Path:
    """Parquet with a fixed schema; null `group`/`split` cells read back as absent."""
    import pyarrow.parquet as pq

    path = Path(path)
    table = _arrow_table(_records(rows, path))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def write_hf_dataset(rows: Iterable[Comparison], path: str | Path) -> Path:
    """An HF `datasets.Dataset` saved with save_to_disk (readable by read_comparisons)."""
    import datasets

    path = Path(path)
    table = _arrow_table(_records(rows, path))
    features = datasets.Features(
        {
            "comparison_id": datasets.Value("string"),
            "annotator_id": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "responses": datasets.Sequence(datasets.Value("string")),
            "ranking": datasets.Sequence(datasets.Value("int64")),
            "group": datasets.Value("string"),
            "split": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(table.to_pydict(), features=features)
    ds.save_to_disk(str(path))
    return path


# --------------------------------------------------------------------------- dataset folders


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


def find_split_file(folder: Path, split: str) -> Path | None:
    """The one data file for `split` (train/val/test) in a dataset folder, if any."""
    found = [folder / f"{split}{suf}" for suf in (".jsonl", *PARQUET_SUFFIXES) if (folder / f"{split}{suf}").is_file()]
    if len(found) > 1:
        raise DataError(f"{folder}: both {found[0].name} and {found[1].name} exist; keep one {split} file")
    return found[0] if found else None


def read_split_file(path: Path, split: str) -> list[Comparison]:
    """Rows of a train/val/test file; a row's own `split` field, if set, must agree."""
    rows = read_comparisons(path)
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
    from emdpo_plugin.data.manifest import check_disjoint_prompts, check_manifest, read_manifest

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
