"""Build the hierarchical ``args`` namespace that OpenRLHF 0.11.2 code reads, from Python.

OpenRLHF's trainers, strategy and datasets read a nested ``SimpleNamespace`` built by
``openrlhf.utils.config.hierarchize`` from argparse dests with dots in their names
(``--ds.zero_stage`` -> ``args.ds.zero_stage``). The parsers live under
``if __name__ == "__main__"`` in ``openrlhf/cli/train_{sft,dpo}.py``, so they cannot be
reused; :data:`HOST_DEFAULTS` restates their defaults (union of the SFT and DPO CLIs of
0.11.2), :data:`OVERRIDES` holds the few values chosen here instead, and :func:`make_args`
applies both plus the caller's overrides and hierarchizes. tests/test_host_drift.py compares
:data:`HOST_DEFAULTS` (and every name here) with the installed host's argument definitions.

    args = make_args({"model.model_name_or_path": path, "train.batch_size": 16},
                     ds__zero_stage=0)          # "__" is accepted for "." in keyword names
    args.ds.zero_stage  # 0

On a machine without CUDA the defaults are adjusted (see :data:`CPU_DEFAULTS`): fp32 params
(needs :func:`emdpo_plugin.host.compat.apply_cpu_compat`), ``sdpa`` attention,
ZeRO stage 0.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

__all__ = ["HOST_DEFAULTS", "OVERRIDES", "OPENRLHF_DEFAULTS", "CPU_DEFAULTS", "make_args", "flatten_args"]

# Defaults of openrlhf 0.11.2 cli/train_sft.py + cli/train_dpo.py (where the two differ, noted:
# each value is one of the two CLIs' defaults). Values of our own go in OVERRIDES instead.
HOST_DEFAULTS: dict[str, Any] = {
    "local_rank": -1,
    "use_ms": False,
    # checkpoints
    "ckpt.output_dir": "./ckpt",
    "ckpt.save_steps": -1,
    "ckpt.save_hf": False,
    "ckpt.disable_ds": False,
    "ckpt.max_num": 3,
    "ckpt.max_mem": int(1e8),
    "ckpt.load_enable": False,
    # logging / eval
    "logger.logging_steps": 1,
    "logger.tensorboard_dir": None,
    "logger.wandb.key": None,
    "logger.wandb.org": None,
    "logger.wandb.group": None,
    "eval.steps": -1,
    "eval.dataset": None,
    "eval.split": "train",  # dpo: "test"
    # training
    "train.micro_batch_size": 8,
    "train.batch_size": 128,
    "train.seed": 42,
    "train.full_determinism_enable": False,
    "train.max_epochs": 1,  # sft: 2, dpo: 1
    # DeepSpeed
    "ds.zero_stage": 2,
    "ds.param_dtype": "bf16",
    "ds.zpg": 1,
    "ds.adam_offload": False,
    "ds.attn_implementation": "flash_attention_2",
    "ds.experts_implementation": None,
    "ds.use_liger_kernel": False,
    "ds.grad_accum_dtype": None,
    "ds.overlap_comm": False,
    "ds.deepcompile": False,
    "ds.tensor_parallel_size": 1,
    "ds.use_universal_ckpt": False,
    "ds.ring_attn_size": 1,
    "ds.ring_attn_head_stride": 1,
    "ds.load_in_4bit": False,
    "ds.lora.rank": 0,
    "ds.lora.alpha": 16,
    "ds.lora.target_modules": "all-linear",
    "ds.lora.dropout": 0.0,
    "ds.packing_samples": False,
    # model
    "model.model_name_or_path": None,
    "model.gradient_checkpointing_enable": False,
    "model.gradient_checkpointing_reentrant": False,
    "model.aux_loss_coef": 0.0,
    "model.pretrain_mode_enable": False,  # sft
    "model.beta": 0.1,  # dpo
    "model.ipo_enable": False,  # dpo
    "model.label_smoothing": 0.0,  # dpo
    "model.nll_loss_coef": 0.0,  # dpo
    "ref.model_name_or_path": None,  # dpo
    "ref.offload": False,  # dpo
    # optimizer / scheduler
    "optim": "adam",
    "muon.lr": 0.02,
    "muon.momentum": 0.95,
    "muon.ns_steps": 5,
    "muon.nesterov": True,
    "adam.lr": 5e-6,  # sft: 5e-6, dpo: 1e-5
    "adam.betas": (0.9, 0.95),
    "adam.eps": 1e-8,
    "adam.weight_decay": 0.0,
    "lr_scheduler": "cosine_with_min_lr",
    "lr_warmup_ratio": 0.03,
    "min_lr_ratio": 0.1,
    "max_norm": 1.0,
    # data
    "data.dataset": None,
    "data.dataset_probs": None,
    "data.dataset_split": "train",
    "data.max_samples": 1000000,
    "data.multiturn": False,
    "data.input_key": "input",  # sft
    "data.output_key": None,  # sft
    "data.prompt_key": None,  # dpo
    "data.chosen_key": "chosen",  # dpo
    "data.rejected_key": "rejected",  # dpo
    "data.input_template": None,  # sft CLI default: "User: {}\nAssistant: "
    "data.apply_chat_template": False,
    "data.tokenizer_chat_template": None,
    "data.max_len": 512,  # sft: 2048, dpo: 512
    "data.disable_fast_tokenizer": False,
    "data.dataloader_num_workers": 0,
}

# Values chosen here, not the host's: deliberately different from both CLIs' defaults.
OVERRIDES: dict[str, Any] = {
    "ckpt.path": "./ckpt/checkpoints",  # sft: ./ckpt/checkpoints_sft, dpo: ./ckpt/checkpoints_dpo
    "logger.wandb.project": "openrlhf_emdpo",  # the CLIs: openrlhf_train_sft / openrlhf_train_dpo
    "logger.wandb.run_name": "emdpo",  # the CLIs use a timestamp; fixed here for determinism
}

OPENRLHF_DEFAULTS: dict[str, Any] = {**HOST_DEFAULTS, **OVERRIDES}  # what make_args starts from

# Applied on top of OPENRLHF_DEFAULTS when CUDA is not available (before user overrides); also our
# own values (fp32 is not even among the CLIs' choices), so the drift guard checks only their names.
CPU_DEFAULTS: dict[str, Any] = {
    "ds.param_dtype": "fp32",
    "ds.attn_implementation": "sdpa",
    "ds.zero_stage": 0,
}


def _norm_key(key: str) -> str:
    return key.replace("__", ".")


def make_args(overrides: Mapping[str, Any] | None = None, /, *, cpu: bool | None = None,
              strict: bool = True, **dotted_overrides: Any) -> SimpleNamespace:
    """Return OpenRLHF's hierarchical args namespace with defaults + overrides.

    overrides: ``{"dotted.key": value}``; ``dotted_overrides``: the same as keywords, with
    ``__`` standing for ``.`` (``ds__lora__rank=8``); keywords win over the mapping.
    cpu: apply :data:`CPU_DEFAULTS` (``None``: when ``torch.cuda.is_available()`` is False).
    strict: reject keys not in :data:`OPENRLHF_DEFAULTS` (catches typos); pass False to add
    fields of your own (e.g. for a trainer subclass).
    The result is built with ``openrlhf.utils.config.hierarchize`` (the function the CLIs use).
    """
    flat = copy.deepcopy(OPENRLHF_DEFAULTS)
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    if cpu:
        flat.update(CPU_DEFAULTS)
    given = {_norm_key(k): v for k, v in (overrides or {}).items()}
    given.update({_norm_key(k): v for k, v in dotted_overrides.items()})
    if strict:
        unknown = sorted(k for k in given if k not in OPENRLHF_DEFAULTS)
        if unknown:
            raise KeyError(f"unknown OpenRLHF args {unknown}; pass strict=False to add new fields")
    # a new leaf must not collide with an existing group (e.g. "ds" vs "ds.zero_stage")
    for k in given:
        if k not in flat:
            prefix = k + "."
            if any(f.startswith(prefix) for f in flat):
                raise KeyError(f"{k!r} names a group of args, not a field")
    flat.update(given)
    if flat.get("ref.model_name_or_path") in (None, ""):
        flat["ref.model_name_or_path"] = flat.get("model.model_name_or_path")
    from openrlhf.utils.config import hierarchize

    return hierarchize(argparse.Namespace(**flat))


def flatten_args(args: SimpleNamespace, prefix: str = "") -> dict[str, Any]:
    """Inverse of hierarchize: ``{"ds.zero_stage": 0, ...}`` (handy for logging / run.json)."""
    out: dict[str, Any] = {}
    for k, v in vars(args).items():
        key = f"{prefix}{k}"
        if isinstance(v, SimpleNamespace):
            out.update(flatten_args(v, key + "."))
        else:
            out[key] = v
    return out
