"""`data` stage: materialise the recipe's dataset (a registered builder or existing files)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .. import registry
from ..data.io import load_dataset_dir, read_comparisons
from ..data.manifest import build_manifest, write_dataset_dir
from ..errors import RecipeError
from .base import StageConfig, StageContext, Trainer
from .common import rel_path


class DataConfig(StageConfig):
    builder: str | None = None  # registered builder name or `module:function`
    config: dict[str, Any] = {}  # the builder's config
    path: str | None = None  # an existing dataset folder or file instead of a builder
    seed: int | None = None  # defaults to the recipe seed


class DataStage(Trainer):
    name = "data"
    description = "Build the dataset with a registered builder, or take an existing dataset folder/file."
    Config = DataConfig
    produces = ("dataset",)

    def run(self, ctx: StageContext, config: DataConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        spec = {**ctx.recipe.get("data", {}), **config.model_dump(exclude_unset=True)}
        cfg = DataConfig.model_validate(spec)
        out = ctx.out_dir
        if cfg.builder and cfg.path:
            raise RecipeError(f"stages.{ctx.stage_name}: set either data.builder or data.path, not both")
        if cfg.builder:
            build = registry.get(registry.DATA_BUILDERS, cfg.builder)
            built = build(cfg.config, seed=ctx.seed if cfg.seed is None else cfg.seed)
            manifest = build_manifest(built.train, built.test, builder=cfg.builder, config=built.config,
                                      labels=built.labels, extra=built.extra, val=built.val,
                                      disjoint_prompts=built.disjoint_prompts)
            write_dataset_dir(out, built.train, built.test, manifest, val=built.val)
        elif cfg.path:
            src = Path(cfg.path).expanduser()
            if src.is_dir():
                ds = load_dataset_dir(src)
                shutil.copytree(src, out, dirs_exist_ok=True)
                train, test = ds.train.rows, ds.test.rows if ds.test else []
            else:
                train, test = read_comparisons(src), []
                manifest = build_manifest(train, test, builder="file", config={"path": str(src)})
                write_dataset_dir(out, train, test, manifest)
        else:
            raise RecipeError(f"stages.{ctx.stage_name}: the recipe names no data (set data.builder or data.path)")
        ds = load_dataset_dir(out)
        return {"dir": rel_path(ctx, out), "manifest": rel_path(ctx, out / "manifest.json"),
                "train": len(ds.train), "test": len(ds.test) if ds.test else 0, "val": len(ds.val) if ds.val else 0}
