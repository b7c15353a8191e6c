"""Typed stage artifacts: slots wired to the wrong kind, outputs that break their kind, data config
checked at plan time, and datasets loaded once per run."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

try:  # tests/ is a rootdir on sys.path, or a package
    import recipe_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import recipe_fixtures as fx

from emdpo_plugin import registry
from emdpo_plugin.artifacts import KINDS, Slot, validate_outputs
from emdpo_plugin.cli import main
from emdpo_plugin.errors import EmdpoError, RecipeError
from emdpo_plugin.recipe.loader import load_recipe
from emdpo_plugin.recipe.runner import run_plan
from emdpo_plugin.recipe.schema import validate_recipe

ROOT = Path(__file__).resolve().parents[1]
BANDIT = ROOT / "recipes" / "bandit.yaml"
M = fx.__name__


def one_line_error(capsys, *argv: str) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_dry_run_refuses_a_typo_in_the_builders_config(capsys):
    err = one_line_error(capsys, "run", BANDIT, "--dry-run", "--set", "data.config.userz=3")
    assert "data.config.userz: unknown key" in err and "annotators" in err  # names the key and the real fields


def test_dry_run_refuses_a_bad_value_in_the_builders_config(capsys):
    err = one_line_error(capsys, "run", BANDIT, "--dry-run", "--set", "data.config.annotators=many")
    assert "data.config.annotators" in err


def test_slot_wired_to_the_wrong_artifact_kind_is_refused_by_name(capsys):
    err = one_line_error(capsys, "run", BANDIT, "--dry-run", "--set", "stages.minmax.inputs={policies: data}")
    assert "stages.minmax.inputs.policies: expects a policies artifact; stage 'data' (data) produces dataset" in err


def test_every_builtin_slot_and_product_names_a_known_kind():
    for name in registry.names(registry.TRAINERS):
        trainer = registry.get(registry.TRAINERS, name)
        assert set(trainer.produces) <= set(KINDS), name
        assert trainer.produces, f"built-in trainer {name} declares no artifact kind"
        for slot in trainer.input_slots.values():
            assert isinstance(slot, Slot), (name, slot)


def test_outputs_that_break_their_declared_kind_fail_the_stage(tmp_path):
    raw = {"name": "bad", "stages": [{"name": "p", "trainer": f"{M}:BadPoliciesTrainer"}]}
    with pytest.raises(EmdpoError, match=r"stage 'p': its outputs are not a valid policies artifact \(policies:"):
        run_plan(validate_recipe(raw), tmp_path / "run")


def test_validate_outputs_accepts_extra_keys_and_names_the_missing_one():
    validate_outputs("d", ("dataset",), {"dir": "d", "manifest": "d/manifest.json", "train": 3, "mine": 1})
    with pytest.raises(EmdpoError, match=r"stage 'e': .* clustering artifact \(clustering: required key missing\)"):
        validate_outputs("e", ("policies", "clustering"), {"policies": {"e/type0": "e/type0"}})


def test_slot_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown artifact kind"):
        Slot(("adapters",))


def test_a_dataset_is_loaded_once_per_run(tmp_path, monkeypatch):
    import emdpo_plugin.trainers.common as common

    calls = []
    real = common.load_dataset_dir
    monkeypatch.setattr(common, "load_dataset_dir", lambda p: calls.append(p) or real(p))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: once
        data: {{builder: bandit, config: {{annotators: 12, pairs_per_annotator: 3, test_contexts: 8, val_contexts: 4}}}}
        stages:
          - {{name: data, trainer: data}}
          - {{name: r1, trainer: "{M}:DatasetReaderTrainer", inputs: {{dataset: data}}}}
          - {{name: r2, trainer: "{M}:DatasetReaderTrainer", inputs: {{dataset: data}}}}
        """))
    state = run_plan(validate_recipe(load_recipe(recipe)), tmp_path / "run")
    assert state["stages"]["r1"]["outputs"]["rows"] == state["stages"]["r2"]["outputs"]["rows"] == 36
    assert len(calls) == 1


def test_plugin_slot_given_as_text_accepts_any_kind():
    raw = {"name": "ok", "stages": [{"name": "a", "trainer": f"{M}:WriteTrainer"},
                                    {"name": "b", "trainer": f"{M}:ConsumeTrainer", "inputs": {"source": "a"}}]}
    assert [s.spec.name for s in validate_recipe(raw).stages] == ["a", "b"]
    with pytest.raises(RecipeError, match=r"required input missing \(any: a stage with outputs\)"):
        validate_recipe({"name": "x", "stages": [{"name": "b", "trainer": f"{M}:ConsumeTrainer"}]})
