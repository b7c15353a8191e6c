"""The validation split: the bandit builder's val contexts and scoring a run on val (eval/validation.py).

Format-level val tests are in test_data_format.py, imdb_synthetic's in test_imdb_builder.py.
"""

from __future__ import annotations

import json

import pytest

from data_builders import bandit
from emdpo_plugin import cli
from emdpo_plugin.data.io import load_dataset_dir
from emdpo_plugin.errors import EmdpoError
from emdpo_plugin.eval.validation import evaluate_run

SMALL = {"annotators": 20, "pairs_per_annotator": 3, "test_contexts": 30}


def test_bandit_val_is_like_test_and_leaves_train_and_test_unchanged():
    with_val = bandit.build(SMALL, seed=5)
    without = bandit.build({**SMALL, "val_contexts": 0}, seed=5)
    assert without.val is None
    rec = lambda rows: [r.to_record() for r in rows]  # noqa: E731
    assert rec(with_val.train) == rec(without.train) and rec(with_val.test) == rec(without.test)
    assert len(with_val.val) == 30 * 3  # default: as many contexts as test, each labelled by every group
    by_prompt: dict[str, set[str]] = {}
    for r in with_val.val:
        assert r.split == "val" and r.annotator_id == f"val-{r.group}"
        by_prompt.setdefault(r.prompt, set()).add(r.group)
    assert len(by_prompt) == 30 and all(v == {"group0", "group1", "group2"} for v in by_prompt.values())
    assert not set(by_prompt) & {r.prompt for r in with_val.test + with_val.train}
    assert "val_contexts" not in with_val.config  # recorded only when set
    assert len(bandit.build({**SMALL, "val_contexts": 7}, seed=5).val) == 21


def test_data_build_writes_val_and_validate_shows_it(tmp_path, capsys):
    out = tmp_path / "b"
    assert cli.main(["data", "build", "bandit", "--set", "annotators=10", "--set", "test_contexts=12", "--out", str(out)]) == 0
    assert "100 train, 36 val and 36 test comparisons" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["comparisons"] == {"train": 100, "test": 36, "val": 36} and m["disjoint_prompts"] == ["train", "val", "test"]
    assert load_dataset_dir(out).val is not None
    assert cli.main(["data", "validate", str(out)]) == 0
    text = capsys.readouterr().out
    assert "val.jsonl (36 rows)" in text and "val/test prompts disjoint" in text


def test_validation_helper_refuses_test_and_needs_a_run(tmp_path):
    with pytest.raises(EmdpoError, match="split 'test' is read only by the report stage"):
        evaluate_run(tmp_path, split="test")
    with pytest.raises(EmdpoError, match="run.json: no such file"):
        evaluate_run(tmp_path)


def test_only_the_report_stage_reads_the_test_split():
    """Hyperparameters and training never see test: no trainer but `report` (and the `data` stage,
    which writes the folder) touches a dataset's `.test`."""
    import re
    from pathlib import Path

    import emdpo_plugin.trainers as trainers

    readers = []
    for path in sorted(Path(trainers.__file__).parent.glob("*.py")):
        if path.name in ("report.py", "data_stage.py"):
            continue
        if re.search(r"\.test\b", path.read_text(encoding="utf-8")):
            readers.append(path.name)
    assert readers == []
