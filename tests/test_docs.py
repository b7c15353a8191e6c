"""The docs stay true: the generated config reference is current, every config key is described,
`--version` names the stack, and every example command in README.md and docs/*.md runs (as a
dry run, or with --help where the command has no dry run)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
from pydantic import BaseModel

from emdpo_plugin import registry
from emdpo_plugin.cli import build_parser, main
from emdpo_plugin.reference import REGENERATE, backend_configs, field_rows, markdown_reference, recipe_model
from emdpo_plugin.versions import STACK, installed_version

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# the CLI as written in the docs: the console script, `python -m`, or behind a launcher
CLI = re.compile(r"^(?:\.venv/bin/)?(?:openrlhf|emdpo)\s|^(?:\.venv/bin/)?python -m emdpo_plugin[\s.]"
                 r"|\s(?:-m|--module) emdpo_plugin\s")

# Commands run as dry runs or with --help need no GPU, cluster or network, so the launcher, Ray and
# hub examples are checked too. Commands shown in the docs that are not run here, and why:
NOT_RUN = {
    "openrlhf data build NAME [--config FILE] [--set key=value ...] --out DIR":
        "a synopsis with placeholders (docs/builders.md), not a command",
}
# read-only commands that run as written
AS_WRITTEN = {"trainers", "--version"}


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


# --- example commands ------------------------------------------------------------------------


def doc_commands() -> list[tuple[str, str]]:
    """(file:line, command) for every line in a fenced block that runs the CLI; `\\` continuations joined."""
    found = []
    for doc in DOCS:
        in_fence, pending, start = False, "", 0
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("```"):
                in_fence, pending, start = not in_fence, "", 0
                continue
            if not in_fence:
                continue
            if line.rstrip().endswith("\\"):
                pending, start = pending + line.rstrip()[:-1] + " ", start or n
                continue
            command, first = " ".join((pending + line).split()), start or n
            pending, start = "", 0
            if CLI.search(command):
                found.append((f"{doc.relative_to(ROOT).as_posix()}:{first}", command))
    return found


COMMANDS = doc_commands()


def test_the_docs_show_commands():
    files = {where.split(":")[0] for where, _ in COMMANDS}
    assert {"docs/recipes-guide.md", "docs/data.md", "docs/scale-out.md", "docs/serving.md",
            "docs/results.md"} <= files
    shown = {cmd for _, cmd in COMMANDS}
    assert set(NOT_RUN) <= shown, f"stale NOT_RUN entries: {set(NOT_RUN) - shown}"


def _argv(command: str) -> tuple[str, list[str]]:
    """The module to run and its arguments: comments and a shell redirection dropped."""
    tokens = shlex.split(command, comments=True)
    if ">" in tokens:
        tokens = tokens[: tokens.index(">")]
    for i, tok in enumerate(tokens):
        if tok.endswith(("openrlhf", "emdpo")) and i == 0:
            return "emdpo_plugin", tokens[1:]
        if tok in ("-m", "--module") and tokens[i + 1].startswith("emdpo_plugin"):
            return tokens[i + 1], tokens[i + 2:]
    raise AssertionError(f"not a CLI command: {command}")


@pytest.mark.parametrize("where, command", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_doc_command_runs(where, command, monkeypatch, capsys):
    if command in NOT_RUN:
        pytest.skip(NOT_RUN[command])
    monkeypatch.chdir(ROOT)
    module, argv = _argv(command)
    if module != "emdpo_plugin":  # another module's own argparse CLI: its arguments are checked by --help only
        with pytest.raises(SystemExit) as exc:
            importlib.import_module(module).main([*argv, "--help"])
        assert exc.value.code == 0, command
        return
    if argv[:1] != ["--version"]:
        build_parser().parse_args(argv)  # every option as written exists (a SystemExit fails the test)
    if argv and argv[0] == "run":
        argv = [*argv, "--dry-run"] if "--dry-run" not in argv else argv
    elif not (argv and argv[0] in AS_WRITTEN):
        argv = [*argv, "--help"]
    assert main(argv) == 0, f"{where}: {command}\n{capsys.readouterr().err}"
