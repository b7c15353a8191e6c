"""Shared fixtures: a tiny local causal LM (built in seconds) and a LoRA ensemble on it."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from emdpo_plugin.models.tiny import build_tiny_lm, demo_sentences

    return build_tiny_lm(demo_sentences(200), tmp_path_factory.mktemp("tiny") / "model", sft_steps=20)


@pytest.fixture(scope="session")
def lora_routing(tiny_model: Path, tmp_path_factory) -> Path:
    """routing.yaml with two random (hence different) rank-8 PEFT adapters, weights 0.3 / 0.7."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from emdpo_plugin.export.routing import AdapterEntry, RoutingConfig, write_routing

    root = tmp_path_factory.mktemp("ensemble")
    entries = []
    for k, weight in enumerate((0.3, 0.7)):
        torch.manual_seed(k)
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        # init_lora_weights=False: B is random too, so each adapter really changes the model
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear",
                                                init_lora_weights=False))
        model.save_pretrained(root / "adapters" / f"type{k}")
        entries.append(AdapterEntry(name=f"type{k}", path=f"adapters/type{k}", weight=weight))
    return write_routing(root / "routing.yaml", RoutingConfig(base_model=str(tiny_model), adapters=entries))
