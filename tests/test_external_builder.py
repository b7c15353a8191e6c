"""A user's own data builder, the two documented routes (docs/builders.md):

1. an entry point in the user's package, group `openrlhf.data_builders`, then
   `openrlhf data build <name>`;
2. a `module:function` reference, `openrlhf data build mypkg.mod:build`.

The package is pip-installed into the running venv (entry points are read fresh by the new
`openrlhf` process) and uninstalled afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from emdpo_plugin.data.validate import validate_path

OPENRLHF = str(Path(sys.executable).with_name("openrlhf"))

BUILDER_SOURCE = textwrap.dedent(
    '''
    """A toy builder: `n` annotators of two groups, each labelling `pairs` prompts."""
    from emdpo_plugin.config import StrictModel
    from emdpo_plugin.data.builders import BuiltDataset
    from emdpo_plugin.data.schema import Comparison


    class Config(StrictModel):
        n: int = 4
        pairs: int = 3


    def build(config, *, seed):
        cfg = Config.model_validate(config)
        train, test = [], []
        for a in range(cfg.n):
            group = "short" if a % 2 else "long"
            for j in range(cfg.pairs):
                responses = ["ok", "a much longer answer"]
                ranking = [0, 1] if group == "short" else [1, 0]
                train.append(Comparison(f"ann{a}", f"prompt {seed}-{j}", responses, ranking,
                                        f"tr-{a}-{j}", group=group))
        for g, ranking in (("short", [0, 1]), ("long", [1, 0])):
            test.append(Comparison(f"test-{g}", "held out", ["ok", "a much longer answer"], ranking,
                                   f"te-{g}", group=g))
        return BuiltDataset(train=train, test=test, config={**cfg.model_dump(), "seed": seed},
                            labels={"length": {"engine": "len", "version": "1"}}, extra={"toy": True})
    '''
)


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([OPENRLHF, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def installed_package(tmp_path_factory):
    """A tiny package with an `openrlhf.data_builders` entry point, installed for the test."""
    suffix = uuid.uuid4().hex[:8]
    dist, module, ep_name = f"emdpo-test-ext-{suffix}", f"emdpo_test_ext_{suffix}", f"ext_toy_{suffix}"
    root = tmp_path_factory.mktemp("extpkg")
    (root / module).mkdir()
    (root / module / "__init__.py").write_text("")
    (root / module / "builders.py").write_text(BUILDER_SOURCE)
    (root / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.0.1"

        [project.entry-points."openrlhf.data_builders"]
        {ep_name} = "{module}.builders:build"

        [tool.setuptools]
        packages = ["{module}"]
    """))
    pip = [sys.executable, "-m", "pip"]
    proc = subprocess.run([*pip, "install", "-q", "--no-deps", "--no-build-isolation", str(root)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    try:
        yield ep_name
    finally:
        subprocess.run([*pip, "uninstall", "-y", "-q", dist], capture_output=True, text=True, timeout=300)


def test_entry_point_builder(installed_package: str, tmp_path: Path) -> None:
    out = tmp_path / "data"
    proc = _run("data", "build", installed_package, "--set", "n=6", "--set", "seed=3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = validate_path(out)
    assert report.manifest and report.rows_per_file == {"train.jsonl": 18, "test.jsonl": 2}
    m = json.loads((out / "manifest.json").read_text())
    assert m["builder"] == {"name": installed_package, "config": {"n": 6, "pairs": 3, "seed": 3}}
    assert m["counts"]["groups"] == {"long": 3, "short": 3}
    assert m["labels"] == {"length": {"engine": "len", "version": "1"}} and m["toy"] is True
    # its config is checked like a built-in's
    bad = _run("data", "build", installed_package, "--set", "colour=red", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "config key 'colour': unknown key" in bad.stderr


def test_module_function_reference(tmp_path: Path) -> None:
    pkg = tmp_path / "src" / "mybuilders"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "toy.py").write_text(BUILDER_SOURCE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "data"
    proc = _run("data", "build", "mybuilders.toy:build", "--set", "pairs=2", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["builder"]["name"] == "mybuilders.toy:build" and m["counts"]["comparisons"] == {"train": 8, "test": 2}
    assert validate_path(out).manifest
    missing = _run("data", "build", "mybuilders.toy:nope", "--out", str(tmp_path / "x"), env=env)
    assert missing.returncode == 2 and "has no attribute 'nope'" in missing.stderr
