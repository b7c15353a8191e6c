"""The docs stay true: the generated config reference is current, every config key is described,
and `--version` names the stack."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from emdpo_plugin import registry
from emdpo_plugin.cli import main
from emdpo_plugin.reference import REGENERATE, backend_configs, field_rows, markdown_reference, recipe_model
from emdpo_plugin.versions import STACK, installed_version

ROOT = Path(__file__).resolve().parents[1]


# --- the config reference --------------------------------------------------------------------


def test_recipes_md_is_generated(capsys):
    assert main(["trainers", "--markdown"]) == 0
    generated = capsys.readouterr().out
    assert generated == markdown_reference()
    committed = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert committed == generated, f"docs/recipes.md is out of date; regenerate it: {REGENERATE}"


def _described_models() -> dict[str, type[BaseModel]]:
    from emdpo_plugin.recipe.schema import load_trainer

    models: dict[str, type[BaseModel]] = {"recipe": recipe_model()}
    for name in registry.names(registry.TRAINERS):
        models[f"trainer {name}"] = load_trainer(name).Config
    for name, config in backend_configs().items():
        assert not isinstance(config, str), f"backend {name}: {config}"
        models[f"backend {name}"] = config
    return models


def test_every_config_key_has_a_description():
    models = _described_models()
    assert {"trainer em_dpo", "trainer data", "backend openrlhf", "backend bandit"} <= set(models)
    missing = [f"{where}: {row.key}" for where, model in models.items() for row in field_rows(model)
               if not row.description]
    assert not missing, "config keys without a pydantic description: " + ", ".join(missing)


def test_reference_expands_nested_models(capsys):
    assert main(["trainers"]) == 0
    out = capsys.readouterr().out
    for line in ("model: (backend: openrlhf)", "  train.lr: float = 5e-07  # ", "  lora.rank: int = 16  # ",
                 "  executor.kind: 'local' | 'ray' = 'local'  # ", "  stages[].trainer: str required  # ",
                 "    keys.prompt: str | None = None  # ", "em_dpo  EM-DPO"):
        assert line in out, line


# --- --version -------------------------------------------------------------------------------


def test_version_names_the_stack(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("emdpo_plugin 0.")
    for module in ("openrlhf", "torch", "deepspeed", "vllm", "transformers", "peft"):
        assert module in STACK
        assert re.search(rf"^\s+{module}\s+\S", out, re.M), module
    assert len(out.splitlines()) == 1 + len(STACK)
    assert installed_version(("no-such-distribution-emdpo",)) == "not installed"
