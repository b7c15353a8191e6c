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

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "emdpo_plugin"
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


def _rooms() -> dict[str, set[str]]:
    """The Rooms block's `emdpo_plugin/` entries: room (a subpackage, or "" for the package root)
    -> the `.py` files its lines name."""
    block = DOC.read_text().split("## Rooms", 1)[1].split("```", 2)[1]
    rooms: dict[str, set[str]] = {}
    room = None
    for line in block.splitlines():
        if not line.startswith("  "):  # emdpo_plugin/ itself, data_builders/, recipes/
            room = None
            continue
        head = line[:24].strip()
        if head:
            dirs = re.findall(r"(\w+)/", head)
            room = ",".join(dirs)  # "export/, serve/" is one entry
        rooms.setdefault(room, set()).update(re.findall(r"(\w+\.py)\b", line))
    return rooms


def test_the_rooms_are_the_packages_that_exist():
    rooms = _rooms()
    named = {d for room in rooms for d in room.split(",") if d}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert named == packages, f"missing from the Rooms: {packages - named}; gone: {named - packages}"
    for room, files in rooms.items():
        where = [PACKAGE, *(PACKAGE / d for d in room.split(",") if d)]
        missing = sorted(f for f in files if not any((w / f).is_file() for w in where))
        assert not missing, f"the Rooms name {missing} under {room or 'emdpo_plugin/'}; no such file"


def test_the_host_room_holds_the_host_adaptation():
    rooms = _rooms()
    assert rooms["host"] >= {p.name for p in (PACKAGE / "host").glob("*.py") if p.name != "__init__.py"}
