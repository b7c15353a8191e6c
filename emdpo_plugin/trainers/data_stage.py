"""`data` stage: materialise the recipe's dataset (a registered builder or existing data).

`data.path` may name a file, a dataset folder, a `save_to_disk` folder or a hub dataset id
(`data.sources`); `data.keys` maps its column names. The dataset folder written here always
uses format v1's names, keeps extra columns as each row's `meta`, and records `text_format`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pydantic import Field

from .. import registry
from ..data import io
from ..data.io import load_dataset_dir
from ..data.keys import DataKeys
from ..data.io import write_dataset_dir
from ..data.manifest import build_manifest
from ..data.sources import read_source
from ..errors import RecipeError
from ..fingerprint import path_digest
from .base import StageConfig, StageContext, Trainer, seed_field
from .common import rel_path, stage_seed


class DataConfig(StageConfig):
    builder: str | None = Field(None, description="a registered data builder (imdb_synthetic, bandit, ...) or "
                                                   "module:function; set this or path")
    config: dict[str, Any] = Field({}, description="the builder's config (docs/builders.md)")
    path: str | None = Field(None, description="existing data instead of a builder: a .jsonl/.parquet file, a dataset "
                                                "folder, a save_to_disk folder or a hub dataset id")
    keys: DataKeys = Field(DataKeys(), description="source column of each format-v1 field, e.g. "
                                                   "{prompt: question, annotator: user}")
    seed: int | None = seed_field("the builder")


class DataStage(Trainer):
    name = "data"
    description = "Build the dataset with a registered builder, or take an existing dataset folder/file."
    Config = DataConfig
    produces = ("dataset",)

    @classmethod
    def source_identity(cls, config: DataConfig, recipe: dict[str, Any]) -> Any:
        """`data.path`'s bytes: a file edited in place (same path, same config) is new data."""
        try:
            path = cls._merged(config, recipe).path
        except ValueError:  # a bad data section: the stage itself reports it when it runs
            return None
        found = path_digest(path) if path else None
        return {"path_digest": found} if found else None

    @staticmethod
    def _merged(config: DataConfig, recipe: dict[str, Any]) -> DataConfig:
        return DataConfig.model_validate({**(recipe.get("data") or {}), **config.model_dump(exclude_unset=True)})

    def run(self, ctx: StageContext, config: DataConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        cfg = self._merged(config, ctx.recipe)
        out = ctx.out_dir
        if cfg.builder and cfg.path:
            raise RecipeError(f"stages.{ctx.stage_name}: set either data.builder or data.path, not both")
        if cfg.builder:
            build = registry.get(registry.DATA_BUILDERS, cfg.builder)
            built = build(cfg.config, seed=stage_seed(ctx, cfg))
            manifest = build_manifest(built.train, built.test, builder=cfg.builder, config=built.config,
                                      labels=built.labels, extra=built.extra, val=built.val,
                                      disjoint_prompts=built.disjoint_prompts)
            write_dataset_dir(out, built.train, built.test, manifest, val=built.val)
        elif cfg.path:
            src = Path(cfg.path).expanduser()
            keys = cfg.keys.model_dump(exclude_none=True)
            if src.is_dir() and not keys and not io.is_hf_folder(src):  # a dataset folder: kept as is
                load_dataset_dir(src)
                shutil.copytree(src, out, dirs_exist_ok=True)
            else:
                splits = {s: rows for s, (_, rows) in read_source(cfg.path, cfg.keys).items()}
                config = {"path": cfg.path, **({"keys": keys} if keys else {})}
                manifest = build_manifest(splits["train"], splits.get("test", []), builder="file", config=config,
                                          val=splits.get("val"))
                write_dataset_dir(out, splits["train"], splits.get("test", []), manifest, val=splits.get("val"))
        else:
            raise RecipeError(f"stages.{ctx.stage_name}: the recipe names no data (set data.builder or data.path)")
        ds = load_dataset_dir(out)
        meta = sorted({k for part in (ds.train, ds.val, ds.test) if part for r in part.rows for k in r.meta})
        return {"dir": rel_path(ctx, out), "manifest": rel_path(ctx, out / "manifest.json"),
                "content_hash": ds.content_hash,
                "train": len(ds.train), "test": len(ds.test) if ds.test else 0, "val": len(ds.val) if ds.val else 0,
                "text_format": ds.text_format, "meta_columns": meta}
