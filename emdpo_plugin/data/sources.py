"""Data people already have: `data.path` and `data validate PATH` read any of

- a file (.jsonl/.json/.parquet): all rows are the train split;
- a dataset folder (train/val/test files, optional manifest.json);
- a folder written with `datasets`' `save_to_disk`: a Dataset is the train split, a
  DatasetDict's `train`, `validation`/`val` and `test` splits are those splits;
- a hub dataset id (`owner/name`), loaded with `datasets.load_dataset` (which honours
  `HF_HUB_OFFLINE`: offline, only a cached copy loads).

Columns are mapped with `keys` as the rows are read (`rows.parse_rows`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import DataError
from . import io
from .keys import DataKeys
from .rows import check_ids_across_splits
from .schema import Comparison

HF_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}
_FILE_SUFFIXES = (".csv", ".tsv", ".txt", ".arrow")  # a missing file, not a hub id
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Splits = dict[str, tuple[str, list[Comparison]]]  # split -> (name used in messages, rows)


def is_hub_id(path: str) -> bool:
    """A string that can only mean a hub dataset: no such local path, `name` or `owner/name`."""
    return (not Path(path).expanduser().exists() and bool(_HUB_ID.match(path))
            and Path(path).suffix.lower() not in (*io.JSONL_SUFFIXES, *io.PARQUET_SUFFIXES, *_FILE_SUFFIXES))


def _hf_splits(name: str, obj: Any, keys: DataKeys | None) -> Splits:
    """A Dataset (-> train) or a DatasetDict (its train/validation/test splits) as rows."""
    import datasets

    if not isinstance(obj, datasets.DatasetDict):
        return {"train": (name, io.require_rows(name, io.parse_rows(name, io.iter_hf(obj), keys)))}
    unknown = sorted(set(obj) - set(HF_SPLITS))
    if unknown or "train" not in obj:
        raise DataError(f"{name}: holds splits [{', '.join(sorted(obj))}]; expected train (required), "
                        f"validation (or val) and test")
    if "val" in obj and "validation" in obj:
        raise DataError(f"{name}: holds both 'val' and 'validation' splits; keep one")
    out: Splits = {}
    for split, ds in obj.items():
        label = f"{name}[{split}]"
        rows = io.parse_rows(label, io.iter_hf(ds), keys)
        out[HF_SPLITS[split]] = (label, io.require_rows(label, rows) if split == "train" else rows)
    return out


def _load_hub(dataset_id: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(dataset_id)
    except Exception as exc:
        import huggingface_hub.constants as hub

        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        offline = " (HF_HUB_OFFLINE is set: only a dataset already in the local cache loads)" if hub.HF_HUB_OFFLINE else ""
        raise DataError(f"{dataset_id}: no such local file or folder, and as a hub dataset id it cannot be loaded"
                        f"{offline}: {type(exc).__name__}: {text}") from None


def read_hf(path: str | Path, keys: DataKeys | None = None) -> Splits:
    """A save_to_disk folder or (if no such path exists) a hub dataset id, as split -> rows."""
    import datasets

    local = Path(path).expanduser()
    if local.exists():
        try:
            obj = datasets.load_from_disk(str(local))
        except Exception as exc:
            raise DataError(f"{local}: cannot load HF datasets folder: {exc}") from None
        return _hf_splits(str(local), obj, keys)
    return _hf_splits(str(path), _load_hub(str(path)), keys)


def read_source(path: str, keys: DataKeys | None = None) -> Splits:
    """Every split of a user data source (see the module docstring); train is always there, and
    no comparison id is in two splits."""
    local = Path(path).expanduser()
    if is_hub_id(path) or io.is_hf_folder(local):
        splits = read_hf(path, keys)
    elif local.is_dir():
        files = {s: io.find_split_file(local, s) for s in io.SPLITS}
        if files["train"] is None:
            raise DataError(f"{local}: no train.jsonl or train.parquet, and not an HF datasets folder; "
                            f"supported: {io.SUPPORTED_FORMATS}")
        splits = {s: (f.name, io.read_split_file(f, s, keys)) for s, f in files.items() if f is not None}
    else:
        splits = {"train": (local.name, io.read_comparisons(local, keys=keys))}
    check_ids_across_splits({s: splits[s] for s in io.SPLITS if s in splits})
    return splits
