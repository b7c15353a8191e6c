"""Format v1 (DESIGN.md section 3): readers, writers, manifest and validation errors."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from emdpo_plugin.data.io import (
    load_dataset_dir,
    read_comparisons,
    write_hf_dataset,
    write_jsonl,
    write_parquet,
)
from emdpo_plugin.data.io import write_dataset_dir
from emdpo_plugin.data.manifest import build_manifest, read_manifest, write_manifest
from emdpo_plugin.data.schema import FORMAT_VERSION, Comparison, comparison_hash
from emdpo_plugin.data.validate import validate_path
from emdpo_plugin.errors import DataError


def _rows() -> list[Comparison]:
    """Pairwise, full 3-way ranking, top-1 prefix, unicode, empty prompt, optional fields, metadata."""
    return [
        Comparison("a1", "Say hi", ["hi", "go away"], [0, 1], "c1", group="g1", split="train"),
        Comparison("a1", "Rank these", ["x", "y", "z"], [2, 0, 1], "c2", group="g1",
                   meta={"source": "web", "score": [1, 2.5], "note": None}),
        Comparison("a2", "Best one?", ["p", "q", "r"], [1], "c3", group="g2"),
        Comparison("a3", "", ["élan ✓", "line\nbreak"], [1, 0], "c4"),
    ]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _ok(**over) -> dict:
    row = {"annotator_id": "a1", "prompt": "p", "responses": ["x", "y", "z"], "ranking": [0, 1]}
    row.update(over)
    return row


def _error(path: Path) -> str:
    with pytest.raises(DataError) as info:
        read_comparisons(path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("writer,name", [(write_jsonl, "d.jsonl"), (write_parquet, "d.parquet"), (write_hf_dataset, "hf")])
def test_round_trip_is_exact(tmp_path, writer, name):
    rows = _rows()
    writer(rows, tmp_path / name)
    back = read_comparisons(tmp_path / name)
    assert back == rows
    assert [type(i) for r in back for i in r.ranking] == [int] * sum(len(r.ranking) for r in rows)


def test_round_trip_of_empty_parquet_keeps_schema(tmp_path):
    write_parquet([], tmp_path / "e.parquet")
    assert read_comparisons(tmp_path / "e.parquet", allow_empty=True) == []
    with pytest.raises(DataError, match="no comparisons"):
        read_comparisons(tmp_path / "e.parquet")


def test_writer_refuses_invalid_rows(tmp_path):
    bad = Comparison("a1", "p", ["x", " "], [0, 1], "c1")
    with pytest.raises(DataError, match="row 1: field 'responses'"):
        write_jsonl([bad], tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_dot_json_is_read_as_json_lines(tmp_path):
    write_jsonl(_rows(), tmp_path / "d.jsonl")
    (tmp_path / "d.json").write_text((tmp_path / "d.jsonl").read_text("utf-8"), "utf-8")
    assert read_comparisons(tmp_path / "d.json") == _rows()


# ---------------------------------------------------------------- normalisation


def test_chosen_rejected_normalised_and_id_derived(tmp_path):
    p = _jsonl(tmp_path / "pw.jsonl", [{"annotator_id": "a", "prompt": "q", "chosen": "good", "rejected": "bad"}])
    (row,) = read_comparisons(p)
    assert row.responses == ["good", "bad"] and row.ranking == [0, 1]
    assert row.comparison_id == comparison_hash("a", "q", ["good", "bad"], [0, 1])
    assert row.group is None and row.split is None


def test_derived_id_is_stable_and_content_sensitive(tmp_path):
    p1 = _jsonl(tmp_path / "1.jsonl", [_ok()])
    p2 = _jsonl(tmp_path / "2.jsonl", [_ok(group="g")])  # group is not part of the id
    p3 = _jsonl(tmp_path / "3.jsonl", [_ok(ranking=[1, 0])])
    a, b, c = (read_comparisons(p)[0].comparison_id for p in (p1, p2, p3))
    assert a == read_comparisons(p1)[0].comparison_id == b
    assert a != c
    assert len(a) == 16 and int(a, 16) >= 0


def test_explicit_id_and_split_kept(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [_ok(comparison_id="mine", split="test")])
    (row,) = read_comparisons(p)
    assert row.comparison_id == "mine" and row.split == "test"


def test_split_filter_on_files(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [_ok(split="train"), _ok(split="test", prompt="other")])
    assert [r.prompt for r in read_comparisons(p, split="test")] == ["other"]
    with pytest.raises(DataError, match=r"no rows with split 'dev' \(splits present: \[test, train\]\)"):
        read_comparisons(p, split="dev")


def test_datasetdict_split_selection(tmp_path):
    import datasets

    write_hf_dataset(_rows()[:2], tmp_path / "tr")
    write_hf_dataset(_rows()[2:], tmp_path / "te")
    dd = datasets.DatasetDict({"train": datasets.load_from_disk(str(tmp_path / "tr")),
                               "test": datasets.load_from_disk(str(tmp_path / "te"))})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_comparisons(tmp_path / "dd", split="test") == _rows()[2:]
    assert read_comparisons(tmp_path / "dd", split="train") == _rows()[:2]
    with pytest.raises(DataError, match=r"splits \[test, train\]"):
        read_comparisons(tmp_path / "dd")
    with pytest.raises(DataError, match=r"split 'dev' not found; available splits: \[test, train\]"):
        read_comparisons(tmp_path / "dd", split="dev")
    report = validate_path(tmp_path / "dd")
    assert report.rows_per_file == {"dd[train]": 2, "dd[test]": 2}


# ---------------------------------------------------------------- row errors


@pytest.mark.parametrize(
    "row,pattern",
    [
        ({"prompt": "p", "chosen": "x", "rejected": "y"}, r"row 2: field 'annotator_id': required field missing"),
        (_ok(annotator_id=[7]), r"row 2: field 'annotator_id': expected a string or integer id, found list \[7\]"),
        (_ok(annotator_id=True), r"row 2: field 'annotator_id': expected a string or integer id, found boolean True"),
        (_ok(annotator_id=""), r"row 2: field 'annotator_id': expected a non-empty string"),
        (_ok(ranking=[0, 3]), r"row 2: field 'ranking': expected indices in 0\.\.2 \(3 responses\), found 3"),
        (_ok(ranking=[1, 1]), r"row 2: field 'ranking': expected distinct indices, found 1 twice"),
        (_ok(ranking=[]), r"row 2: field 'ranking': expected a non-empty list of integer indices, found an empty list"),
        (_ok(ranking=[0.0]), r"row 2: field 'ranking': expected item 0 to be an integer index, found number 0\.0"),
        (_ok(ranking=None), r"row 2: field 'ranking': expected a list of response indices"),
        (_ok(responses=["x", "   "]), r"row 2: field 'responses': expected item 1 to be a non-empty string"),
        (_ok(responses=["x"], ranking=[0]), r"row 2: field 'responses': expected a list of >= 2 responses, found 1 item"),
        ({"annotator_id": "a", "prompt": "p", "chosen": "", "rejected": "y"}, r"row 2: field 'chosen': expected a non-empty"),
        ({"annotator_id": "a", "prompt": "p", "chosen": "x"}, r"row 2: field 'rejected': required field missing"),
        (_ok(chosen="x", rejected="y"), r"row 2: field 'chosen': cannot be combined with 'responses'"),
        ({"annotator_id": "a", "prompt": "p"}, r"row 2: field 'responses': expected 'responses' \+ 'ranking' or"),
        ({"annotator_id": "a", "chosen": "x", "rejected": "y"}, r"row 2: field 'prompt': required field missing"),
        (_ok(prompt=None), r"row 2: field 'prompt': expected a string or a message list, found null"),
        (_ok(meta=[1]), r"row 2: field 'meta': expected an object, found list"),
        (_ok(group={"g": 1}), r"row 2: field 'group': expected a string or integer id, found object"),
        (["not", "an", "object"], r"row 2: expected a JSON object, found list"),
    ],
)
def test_row_errors_name_file_row_and_field(tmp_path, row, pattern):
    p = _jsonl(tmp_path / "bad.jsonl", [_ok(prompt="fine"), row])
    msg = _error(p)
    assert msg.startswith(f"{p}: row 2: ")
    assert re.search(pattern, msg), msg


def test_empty_prompt_string_is_allowed(tmp_path):
    assert read_comparisons(_jsonl(tmp_path / "d.jsonl", [_ok(prompt="")]))[0].prompt == ""


def test_bad_json_line_reports_line_number(tmp_path):
    p = _jsonl(tmp_path / "bad.jsonl", [_ok(), "", '{"annotator_id": "a", '])
    msg = _error(p)
    assert msg.startswith(f"{p}: row 3: invalid JSON: ")


def test_duplicate_ids_name_both_rows(tmp_path):
    p = _jsonl(tmp_path / "dup.jsonl", [_ok(comparison_id="x"), _ok(prompt="q"), _ok(comparison_id="x", prompt="r")])
    assert _error(p) == (
        f"{p}: row 3: field 'comparison_id': expected a unique id, found 'x' already used by row 1"
    )
    p2 = _jsonl(tmp_path / "dup2.jsonl", [_ok(), _ok()])
    assert "(derived from the row content) already used by row 1" in _error(p2)


def test_parquet_rows_use_the_same_rules(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([_ok(), _ok(prompt="q", ranking=[0, 5])])
    pq.write_table(table, tmp_path / "bad.parquet")
    assert _error(tmp_path / "bad.parquet").startswith(f"{tmp_path / 'bad.parquet'}: row 2: field 'ranking': ")
    pq.write_table(pa.Table.from_pylist([_ok(extra_col="z")]), tmp_path / "extra.parquet")
    assert read_comparisons(tmp_path / "extra.parquet")[0].meta == {"extra_col": "z"}  # kept, not refused


def test_hf_rows_use_the_same_rules(tmp_path):
    import datasets

    datasets.Dataset.from_list([_ok(), {**_ok(), "annotator_id": ""}]).save_to_disk(str(tmp_path / "hf"))
    assert _error(tmp_path / "hf") == (
        f"{tmp_path / 'hf'}: row 2: field 'annotator_id': expected a non-empty string, found ''"
    )


def test_missing_and_unsupported_paths(tmp_path):
    assert "no such file or folder" in _error(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    msg = _error(tmp_path / "d.csv")
    assert "unsupported file type '.csv'" in msg and ".parquet" in msg and ".jsonl" in msg
    (tmp_path / "plain").mkdir()
    assert "not an HF datasets folder" in _error(tmp_path / "plain")


# ---------------------------------------------------------------- manifest and dataset folders


def _manifest(train, test):
    return build_manifest(train, test, builder="bandit", config={"seed": 0}, labels={"judge": "v1"})


def test_manifest_counts_and_keys():
    rows = _rows()
    m = _manifest(rows[:3], rows[3:])
    assert m["format"] == FORMAT_VERSION
    assert m["builder"] == {"name": "bandit", "config": {"seed": 0}}
    assert m["counts"] == {"annotators": 2, "test_annotators": 1, "comparisons": {"train": 3, "test": 1},
                           "groups": {"g1": 1, "g2": 1}}
    assert m["labels"] == {"judge": "v1"}
    assert m["created_by"].startswith("emdpo_plugin ")
    assert len(m["content_hash"]) == 64
    assert build_manifest(rows, None, builder="b", config={})["counts"]["comparisons"] == {"train": 4, "test": 0}
    with pytest.raises(ValueError, match="reserved"):
        build_manifest(rows, None, builder="b", config={}, extra={"counts": 1})


def test_content_hash_is_content_and_order_sensitive():
    rows = _rows()
    base = _manifest(rows, None)["content_hash"]
    assert _manifest(list(rows), None)["content_hash"] == base
    changed = rows[:1] + [replace(rows[1], ranking=[2, 1, 0])] + rows[2:]
    assert _manifest(changed, None)["content_hash"] != base
    assert _manifest(rows[::-1], None)["content_hash"] != base
    assert _manifest(rows[:3], rows[3:])["content_hash"] != base


def test_manifest_file_round_trip(tmp_path):
    m = _manifest(_rows(), None)
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    text = (tmp_path / "manifest.json").read_text()
    assert text.index('"builder"') < text.index('"content_hash"') < text.index('"counts"')  # sorted keys
    assert '\n  "format"' in text  # indent 2


def test_dataset_dir_round_trip_and_validation(tmp_path):
    rows = _rows()
    train, test = rows[:3], rows[3:]
    write_dataset_dir(tmp_path / "ds", train, test, _manifest(train, test))
    d = load_dataset_dir(tmp_path / "ds")
    assert d.train.rows == train and d.test is not None and d.test.rows == test
    assert d.test.annotator_ids[: d.train.n_annotators] == d.train.annotator_ids  # shared index space
    assert d.manifest["counts"]["comparisons"] == {"train": 3, "test": 1}

    report = validate_path(tmp_path / "ds")
    assert report.rows_per_file == {"train.jsonl": 3, "test.jsonl": 1}
    assert (report.annotators, report.pairwise_rows, report.ranking_rows) == (3, 2, 2)
    assert report.groups == {"g1": 1, "g2": 1} and report.manifest
    assert "4 comparisons" in report.summary() and "\n" not in report.summary()


def test_manifest_mismatch_is_caught(tmp_path):
    rows = _rows()
    write_dataset_dir(tmp_path / "ds", rows, None, _manifest(rows[:3], None))
    with pytest.raises(DataError, match=r"manifest.json: field 'counts.comparisons.train': expected 4"):
        validate_path(tmp_path / "ds")
    write_dataset_dir(tmp_path / "ds2", rows, None, _manifest(rows, None))
    lines = (tmp_path / "ds2" / "train.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace("go away", "go home")
    (tmp_path / "ds2" / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="field 'content_hash'"):
        load_dataset_dir(tmp_path / "ds2")
    (tmp_path / "ds2" / "manifest.json").write_text("{oops")
    with pytest.raises(DataError, match="manifest.json: invalid JSON"):
        validate_path(tmp_path / "ds2")


def test_validate_single_file_and_split_mismatch(tmp_path):
    write_parquet(_rows(), tmp_path / "d.parquet")
    report = validate_path(tmp_path / "d.parquet")
    assert report.rows_per_file == {"d.parquet": 4} and report.annotators == 3
    (tmp_path / "ds").mkdir()
    write_jsonl([replace(_rows()[0], split="test")], tmp_path / "ds" / "train.jsonl")
    with pytest.raises(DataError, match=r"train.jsonl: row 1: field 'split': expected 'train' or absent"):
        validate_path(tmp_path / "ds")


# ---------------------------------------------------------------- the val split


def _eval_rows(split: str, prompts: list[str]) -> list[Comparison]:
    """Evaluation rows like the builders make: each prompt labelled by every group."""
    return [Comparison(f"{split}-{g}", p, ["x", "y"], [0, 1] if g == "g1" else [1, 0], f"{split}-{i}-{g}",
                       group=g, split=split) for i, p in enumerate(prompts) for g in ("g1", "g2")]


def test_val_split_round_trip_counts_and_validate(tmp_path):
    train = _rows()[:3]
    test, val = _eval_rows("test", ["t1", "t2"]), _eval_rows("val", ["v1", "v2", "v3"])
    m = build_manifest(train, test, builder="b", config={}, val=val, disjoint_prompts=("val", "test", "train"))
    assert m["counts"]["comparisons"] == {"train": 3, "test": 4, "val": 6} and m["counts"]["val_annotators"] == 2
    assert m["disjoint_prompts"] == ["train", "val", "test"]  # canonical order
    write_dataset_dir(tmp_path / "ds", train, test, m, val=val)
    d = load_dataset_dir(tmp_path / "ds")
    assert d.val is not None and d.val.rows == val and d.test.rows == test
    assert d.val.annotator_ids[: d.train.n_annotators] == d.train.annotator_ids  # shared index space
    report = validate_path(tmp_path / "ds")
    assert report.rows_per_file == {"train.jsonl": 3, "val.jsonl": 6, "test.jsonl": 4}
    text = report.summary()
    assert "val.jsonl (6 rows)" in text and "val/test prompts disjoint" in text
    assert "disjoint prompts promised and checked: train, val, test" in text


def test_folder_without_val_keeps_its_manifest_and_loads(tmp_path):
    """Folders written before the val split: same hash, `val` is None, no val counts demanded."""
    rows = _rows()
    m = _manifest(rows[:3], rows[3:])
    assert "val" not in m["counts"]["comparisons"] and "disjoint_prompts" not in m
    assert m["content_hash"] == build_manifest(rows[:3], rows[3:], builder="x", config={}, val=None)["content_hash"]
    write_dataset_dir(tmp_path / "ds", rows[:3], rows[3:], m)
    assert load_dataset_dir(tmp_path / "ds").val is None
    # a val file the manifest does not describe is caught
    write_jsonl(_eval_rows("val", ["v"]), tmp_path / "ds" / "val.jsonl")
    with pytest.raises(DataError, match=r"field 'counts.comparisons.val': required field missing"):
        load_dataset_dir(tmp_path / "ds")


def test_val_rows_must_say_val_and_count_must_match(tmp_path):
    train, val = _rows()[:3], _eval_rows("val", ["v1"])
    m = build_manifest(train, None, builder="b", config={}, val=val)
    write_dataset_dir(tmp_path / "ds", train, None, m, val=val)
    (tmp_path / "ds" / "val.jsonl").write_text((tmp_path / "ds" / "val.jsonl").read_text().replace('"val"', '"test"', 1))
    with pytest.raises(DataError, match=r"val.jsonl: row 1: field 'split': expected 'val' or absent"):
        validate_path(tmp_path / "ds")
    (tmp_path / "ds" / "val.jsonl").unlink()
    with pytest.raises(DataError, match=r"field 'counts.comparisons.val': expected 0 \(from the data files\), found 2"):
        load_dataset_dir(tmp_path / "ds")


def test_promised_disjoint_prompts_are_checked(tmp_path):
    train = _rows()[:3]
    test, val = _eval_rows("test", ["t1", "shared"]), _eval_rows("val", ["v1", "shared"])
    promised = build_manifest(train, test, builder="b", config={}, val=val, disjoint_prompts=("val", "test"))
    write_dataset_dir(tmp_path / "ds", train, test, promised, val=val)
    for check in (load_dataset_dir, validate_path):
        with pytest.raises(DataError) as info:
            check(tmp_path / "ds")
        assert str(info.value) == (
            f"{tmp_path / 'ds' / 'val.jsonl'}: row 3: field 'prompt': also the prompt of test.jsonl row 3 "
            "(1 prompt(s) shared); manifest.json promises val and test share no prompt (disjoint_prompts)"
        )
    # without the promise the overlap is reported, not refused
    write_dataset_dir(tmp_path / "ds2", train, test, build_manifest(train, test, builder="b", config={}, val=val), val=val)
    assert "val/test prompts overlap (1 shared)" in validate_path(tmp_path / "ds2").summary()
    with pytest.raises(ValueError, match="unknown split"):
        build_manifest(train, test, builder="b", config={}, disjoint_prompts=("dev",))
