"""`sft` stage: the reference policy pi_SFT every later stage starts from and compares against.

`model: tiny` builds a small Llama locally (tokenizer trained on the dataset's texts, a short
SFT through OpenRLHF's SFT path): the offline CPU default. Any other value (a model folder or
a hub id) is used as the SFT model as is; the stage records it so `model.pretrain: stage:sft`
resolves to it.

Identity: a tiny model is kept across a re-run of the stage (`resume_state`) only while its
build key (config, seed and the texts drawn from the data) matches (`models.tiny.build_key`);
anything else rebuilds it. The key is the `fingerprint` output. An existing model's folder
(or hub snapshot) enters the stage's key (`source_identity`), so a changed one re-runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from .. import dist
from ..artifacts import Slot
from ..fingerprint import model_identity
from .base import StageConfig, StageContext, Trainer, seed_field
from .common import dataset_from, rel_path, stage_seed


class SFTConfig(StageConfig):
    model: str = Field("tiny", description="'tiny' (built locally) or an existing SFT model folder / hub id")
    vocab_size: int = Field(2000, description="tiny: upper bound of the BPE vocabulary trained on the data")
    hidden_size: int = Field(64, description="tiny: hidden width")
    layers: int = Field(2, description="tiny: transformer layers")
    heads: int = Field(2, description="tiny: attention heads; hidden_size / heads must be >= 32 (vLLM's CPU attention)")
    max_position: int = Field(256, description="tiny: context length in tokens")
    sft_steps: int = Field(150, description="tiny: SFT optimiser steps through OpenRLHF's SFT path")
    batch_size: int = Field(16, description="tiny: texts per SFT step")
    lr: float = Field(3e-3, description="tiny: peak AdamW learning rate (cosine schedule with a floor)")
    max_texts: int = Field(4000, description="tiny: distinct prompt and response texts drawn from the training data")
    seed: int | None = seed_field("the tokenizer, initialisation and SFT")


class SFTStage(Trainer):
    name = "sft"
    description = "The SFT reference: build a tiny local model (offline default) or record an existing one."
    Config = SFTConfig
    input_slots = {"dataset": Slot(("dataset",), "texts for the tokenizer and SFT (model: tiny)")}
    produces = ("model",)
    resume_state = ("model",)  # the tiny build, reused only when its build key matches

    @classmethod
    def source_identity(cls, config: SFTConfig, recipe: dict[str, Any]) -> Any:
        return None if config.model == "tiny" else model_identity(config.model, config.model, None)

    def run(self, ctx: StageContext, config: SFTConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        if config.model != "tiny":
            return {"model": config.model, "built": False}
        import numpy as np

        from ..data.chat import TemplateOnly, render_pair
        from ..models.tiny import CHAT_TEMPLATE, build_tiny_lm, read_build_info

        if "dataset" not in inputs:
            from ..errors import RecipeError

            raise RecipeError(f"stages.{ctx.stage_name}.inputs.dataset: model: tiny trains on a dataset's texts")
        data = dataset_from(ctx, inputs["dataset"]).train
        template = TemplateOnly(CHAT_TEMPLATE, "tiny")  # message lists as the tiny tokenizer will render them
        texts = sorted({"".join(render_pair(template, row.prompt, r)) for row in data.rows for r in row.responses})
        seed = stage_seed(ctx, config)
        rng = np.random.default_rng(seed)
        if len(texts) > config.max_texts:
            texts = [texts[i] for i in sorted(rng.choice(len(texts), config.max_texts, replace=False))]
        kwargs = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, layers=config.layers,
                      heads=config.heads, max_position=config.max_position, sft_steps=config.sft_steps,
                      batch_size=config.batch_size, lr=config.lr, seed=seed)
        if dist.launched():  # the other ranks serve backend calls only: build in one fresh process
            path = _build_in_child(texts, ctx.out_dir / "model", kwargs)
        else:
            path = build_tiny_lm(texts, ctx.out_dir / "model", **kwargs)
        return {"model": rel_path(ctx, path), "built": True, "texts": len(texts),
                "fingerprint": read_build_info(path)["key"]}


def _build_in_child(texts: list[str], out_dir: Path, kwargs: dict[str, Any]) -> Path:
    """Run `build_tiny_lm` in a single-process child: its SFT must not join the launcher's group."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from ..errors import EmdpoError

    env = dist.single_process_env()  # torchrun's agent-store variables would make it wait on the store
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump({"texts": texts, "out_dir": str(out_dir), "kwargs": kwargs}, fh)
    code = ("import json, sys; from pathlib import Path; from emdpo_plugin.models.tiny import build_tiny_lm; "
            "a = json.load(open(sys.argv[1])); build_tiny_lm(a['texts'], Path(a['out_dir']), **a['kwargs'])")
    try:
        proc = subprocess.run([sys.executable, "-c", code, fh.name], env=env)
    finally:
        os.unlink(fh.name)
    if proc.returncode != 0:
        raise EmdpoError(f"building the tiny model in {out_dir} failed (exit {proc.returncode}); see the output above")
    return out_dir
