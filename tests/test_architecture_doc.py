"""docs/architecture.md stays true: its plugin module (a builder, a backend, a trainer) and
its recipe are extracted and run, and its tables name the kinds and protocols that exist."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from emdpo_plugin import artifacts
from emdpo_plugin.backends import base
from emdpo_plugin.recipe.loader import load_recipe
from emdpo_plugin.recipe.runner import run_plan
from emdpo_plugin.recipe.schema import validate_recipe

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
BLOCK = re.compile(r"```(python|yaml)\n# (\S+)\n(.*?)```", re.S)


def blocks(name: str) -> str:
    return "\n".join(body for _, file, body in BLOCK.findall(DOC.read_text()) if file == name)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "myplugin.py").write_text(blocks("myplugin.py"))
    (tmp_path / "recipe.yaml").write_text(blocks("recipe.yaml"))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("myplugin", None)


def test_the_documented_plugin_runs(plugin):
    state = run_plan(validate_recipe(load_recipe(plugin / "recipe.yaml")), plugin / "run")
    assert all(s["status"] == "done" for s in state["stages"].values())
    em = state["stages"]["em"]["outputs"]
    assert em["backend_stats"]["fits"] >= 4  # K seeding fits + K M-steps per iteration, through the plugin backend
    mix = json.loads((plugin / "run" / "mix" / "ensemble.json").read_text())
    assert mix["weights"] == [0.5, 0.5] and mix["policies"] == ["em/type0", "em/type1"]


def test_the_documented_plugin_is_checked_before_it_runs(plugin):
    from emdpo_plugin.errors import RecipeError
    from emdpo_plugin.recipe.loader import load_recipe as load

    with pytest.raises(RecipeError, match=r"data.config.users: unknown key \(fields: annotators, pairs\)"):
        validate_recipe(load(plugin / "recipe.yaml", ["data.config.users=3"]))
    with pytest.raises(RecipeError, match="stages.mix.inputs.policies: expects a policies artifact; stage 'data'"):
        validate_recipe(load(plugin / "recipe.yaml", ["stages.mix.inputs={policies: data}"]))


def test_the_tables_name_what_exists():
    text = DOC.read_text()
    for kind in artifacts.KINDS:
        assert f"| `{kind}` |" in text, kind
    for proto in base.CAPABILITIES:
        assert f"| `{proto.__name__}` |" in text, proto.__name__
