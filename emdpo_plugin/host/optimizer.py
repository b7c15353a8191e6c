"""A client optimiser for OpenRLHF's DeepSpeed strategy (`model.train.optimizer: rmsprop`)."""

from __future__ import annotations

from typing import Any


def use_torch_optimizer(strategy: Any, name: str, params: dict[str, Any]) -> None:
    """Make this strategy's `prepare` train with `torch.optim.<name>(**params)` instead of AdamW.

    The one hook for a client optimiser: OpenRLHF's `DeepspeedStrategy.prepare` always writes an
    AdamW (or Muon) section into the DeepSpeed config it passes to `deepspeed.initialize`, and
    DeepSpeed builds any `torch.optim` class named there (`engine._configure_basic_optimizer`).
    This wraps `get_ds_train_config` on this strategy instance only and replaces that section;
    ZeRO, clipping, the scheduler (which reads the optimiser's lr) and the engine stay the host's.
    ZeRO stages 1-2 need `zero_allow_untested_optimizer` for optimisers outside DeepSpeed's list.
    """
    import torch.optim

    if not hasattr(torch.optim, name):
        raise ValueError(f"model.train.optimizer: torch.optim has no {name}")
    original = strategy.get_ds_train_config  # the class's (CPU-compat-wrapped) bound method

    def get_ds_train_config(*args: Any, **kwargs: Any) -> dict[str, Any]:
        ds_config = original(*args, **kwargs)
        if "optimizer" in ds_config:  # absent on model-loading paths
            ds_config["optimizer"] = {"type": name, "params": dict(params)}
            ds_config["zero_allow_untested_optimizer"] = True
        return ds_config

    strategy.get_ds_train_config = get_ds_train_config
