"""Test trainers and a fake backend for tests/test_recipe.py and tests/test_identity.py, referenced
as `module:Class` so the recipe machinery is tested without the built-in trainers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from emdpo_plugin.trainers.base import StageConfig, StageContext, Trainer


def bandit_em_recipe(path: Path, output_dir: Path, restarts: int = 1) -> Path:
    """A small real recipe (bandit data -> em_dpo, seed 1) written to `path`: seconds to run."""
    path.write_text(f"""name: em
seed: 1
output_dir: {output_dir}
model: {{backend: bandit, epochs: 20, warm_epochs: 20}}
data: {{builder: bandit, config: {{annotators: 16, pairs_per_annotator: 4}}}}
stages:
  - {{name: data, trainer: data}}
  - {{name: em, trainer: em_dpo, inputs: {{dataset: data}}, config: {{K: 2, iterations: 2, restarts: {restarts}}}}}
""")
    return path


def bump_count(ctx: StageContext) -> int:
    """Count runs of a stage in `RUN_DIR/counts.json`, proving which stages --resume skipped."""
    path = ctx.run_dir / "counts.json"
    counts = json.loads(path.read_text()) if path.exists() else {}
    counts[ctx.stage_name] = counts.get(ctx.stage_name, 0) + 1
    path.write_text(json.dumps(counts))
    return counts[ctx.stage_name]


class WriteTrainer(Trainer):
    """Writes `text` to out.txt; passes on what it received."""

    name = "write"
    description = "writes a file (test)"

    class Config(StageConfig):
        text: str = "hello"
        n: int = Field(1, description="a number")
        sizes: list[int] = [1, 2]

    input_slots = {"upstream": "any earlier stage"}

    def run(self, ctx: StageContext, config: Config, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        path = ctx.out_dir / "out.txt"
        path.write_text(config.text * config.n)
        return {"path": str(path), "n": config.n, "run": bump_count(ctx), "inputs": inputs}


class ConsumeTrainer(Trainer):
    """Requires an input; returns it so the test can check what the runner passed."""

    name = "consume"

    class Config(StageConfig):
        scale: float = 1.0

    input_slots = {"source": "a stage with outputs", "extra": "optional"}
    required_inputs = ("source",)

    def run(self, ctx, config, inputs):
        bump_count(ctx)
        return {"got": inputs["source"], "scale": config.scale}


class FailTrainer(Trainer):
    name = "fail"

    class Config(StageConfig):
        fail: bool = True
        message: str = "boom"

    def run(self, ctx, config, inputs):
        bump_count(ctx)
        if config.fail:
            raise RuntimeError(config.message)
        return {"ok": True}


class ResumableTrainer(Trainer):
    """Resumes from `ckpt/` (its `resume_state`); a failing attempt also leaves a half-written file."""

    name = "resumable"
    resume_state = ("ckpt",)

    class Config(StageConfig):
        fail: bool = False

    def run(self, ctx, config, inputs):
        out = ctx.out_dir
        found = sorted(p.name for p in out.iterdir())
        ckpt = out / "ckpt" / "state.txt"
        resumed = ckpt.read_text() if ckpt.exists() else None
        ckpt.parent.mkdir(exist_ok=True)
        ckpt.write_text(f"attempt {bump_count(ctx)}")
        (out / "half.txt").write_text("half")
        if config.fail:
            raise RuntimeError("killed half-way")
        return {"found_at_start": found, "resumed_from": resumed}


class BackendTrainer(Trainer):
    """Touches ctx.backend twice: the runner must build one backend per run."""

    name = "uses_backend"

    def run(self, ctx, config, inputs):
        first, second = ctx.backend, ctx.backend
        assert first is second
        return {"options": first.options, "seed": first.seed, "built": FakeBackend.built}


class FakeBackend:
    built = 0

    def __init__(self, options: dict[str, Any], seed: int = 0, run_dir=None):
        FakeBackend.built += 1
        self.options = options
        self.seed = seed


class NotATrainer:
    pass


class BadPoliciesTrainer(Trainer):
    """Declares it produces policies but returns none: the runner must refuse its outputs."""

    name = "bad_policies"
    produces = ("policies",)

    def run(self, ctx, config, inputs):
        return {"policies": {}}


class DatasetReaderTrainer(Trainer):
    """Reads the dataset slot through the shared helper, to count loads per run."""

    name = "dataset_reader"
    input_slots = {"dataset": "a data stage"}

    def run(self, ctx, config, inputs):
        from emdpo_plugin.trainers.common import dataset_from

        return {"rows": len(dataset_from(ctx, inputs["dataset"]).train)}
