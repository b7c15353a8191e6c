"""One DeepSpeed training engine shared by every fit of a backend, and each policy's optimiser state.

EM fits K type policies T times each. Building a DeepSpeed engine per fit would cost K x T engine
set-ups (ZeRO flat buffers, fp32 master copies, optimiser state allocation) and, on GPU, memory
fragmentation. Here the backend builds one engine through OpenRLHF's `strategy.prepare` on first
use and keeps it: a fit copies its policy's tensors into the model (the backend's `_activate`),
then `begin` points the engine at that policy: the fp32 master weights are refreshed from the
model, the optimiser state is the policy's own (`carry`) or a fresh one, and the fit gets its own
learning-rate schedule. `end` reads the state back out. The backend releases the engine when a
stage ends (`release`), so generation and serving get the memory back.

What "the optimiser state" is, whatever the ZeRO stage or precision: the torch optimiser inside
DeepSpeed's wrapper (`engine.basic_optimizer`) holds, in its param groups, the fp32 master
tensors (flat ZeRO partitions, fp32 copies, or the model's own parameters at ZeRO 0 in fp32) and,
in its `state`, their moments and step counts. Every policy trains the same parameters (one
adapter slot, or the full model), so that layout is the same for every policy and every engine
built on the model: a state is saved and restored by position. A fresh engine's state is zeros
(DeepSpeed's wrappers run one zero-gradient step at set-up) or empty; `reset` restores exactly
that, so a fit with `optimizer_state: fresh` on the shared engine is the fit a new engine would run
(tests/test_train_engine.py).

ZeRO-3 partitions the model's own parameters while an engine holds them, and policies are copied
into the model between fits; at stage 3 the engine is therefore released after every fit.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import EmdpoError

STATE_FILE = "optimizer.pt"  # beside a policy's adapter / model files, as HF Trainer checkpoints keep it
_ZERO = "zero"  # template marker: a moment tensor that starts at zeros


def _inner_params(optimizer: Any) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _set_group_steps(optimizer: Any, steps: list[Any]) -> None:
    """Step counts some optimisers keep per param group (DeepSpeed's FusedAdam) rather than per tensor."""
    for group, step in zip(optimizer.param_groups, steps):
        if step is None:
            group.pop("step", None)
        else:
            group["step"] = step.clone() if torch.is_tensor(step) else step


class TrainEngine:
    """A DeepSpeed engine over the backend's model, built on first use, reused by every fit."""

    def __init__(self, strategy: Any, actor: Any, module: Any, *, per_fit: bool) -> None:
        self.strategy, self.actor, self.module = strategy, actor, module
        self.per_fit = per_fit  # ZeRO-3: one engine per fit (see the module docstring)
        self.engine: Any = None
        self.optim: Any = None
        self._template: list[dict[str, Any]] = []
        self._group_steps: list[Any] = []
        self.builds = 0  # engines built (run.json: engine_builds)

    def _build(self, optim_cfg: dict[str, Any]) -> None:
        self.actor.model = self.module
        actor, self.optim, _ = self.strategy.prepare((self.actor, {**optim_cfg, "scheduler_steps": 1}))
        self.engine = actor.model
        self.actor.model = self.module  # scoring and saving use the plain module; fits use the engine
        self.builds += 1
        inner = self.engine.basic_optimizer
        self._template = [{k: (v.clone() if (not torch.is_tensor(v) or v.numel() == 1 or bool(v.any())) else _ZERO)
                           for k, v in inner.state.get(p, {}).items()} for p in _inner_params(inner)]
        self._group_steps = [g["step"].clone() if torch.is_tensor(g.get("step")) else g.get("step")
                             for g in inner.param_groups]

    def begin(self, optim_cfg: dict[str, Any], steps: int, state: dict[str, Any] | None, where: str) -> tuple[Any, Any, Any]:
        """The engine (inside the actor), optimiser and a new scheduler for a fit of `steps` optimiser
        steps, starting from `state` (a policy's `end` result) or a fresh optimiser state. Call it
        after the policy's tensors were copied into the model."""
        if self.engine is None:
            self._build(optim_cfg)
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:  # bf16/fp16 and ZeRO wrappers keep fp32 masters: take the model's tensors
            refresh()
        if state is None:
            self.reset()
        else:
            self.restore(state, where)
        self.actor.model = self.engine
        return self.actor, self.optim, self._scheduler(optim_cfg, steps)

    def _scheduler(self, cfg: dict[str, Any], steps: int) -> Any:
        """The schedule OpenRLHF's `prepare` builds (transformers' `get_scheduler`), for this fit,
        installed as the engine's scheduler (DeepSpeed steps it after every optimiser step)."""
        from transformers import get_scheduler

        name = cfg.get("lr_scheduler", "cosine_with_min_lr")
        kwargs = {"min_lr_rate": cfg.get("min_lr_ratio", 0.1)} if name in {"cosine_with_min_lr",
                                                                           "cosine_warmup_with_min_lr"} else {}
        inner = self.engine.basic_optimizer
        for group in inner.param_groups:  # every fit starts from the configured peak lr
            group["lr"] = group.get("initial_lr", group["lr"])
        scheduler = get_scheduler(name, inner, num_warmup_steps=math.ceil(steps * cfg.get("lr_warmup_ratio", 0.03)),
                                  num_training_steps=steps, scheduler_specific_kwargs=kwargs)
        self.engine.lr_scheduler = scheduler
        return scheduler

    @torch.no_grad()
    def reset(self) -> None:
        """The optimiser state a newly built engine has."""
        inner = self.engine.basic_optimizer
        for p, template in zip(_inner_params(inner), self._template):
            if not template:
                inner.state.pop(p, None)
                continue
            current = inner.state.setdefault(p, {})
            for k, v in template.items():
                if v is _ZERO:
                    if torch.is_tensor(current.get(k)):
                        current[k].zero_()
                    else:
                        current[k] = torch.zeros_like(p)
                elif torch.is_tensor(v) and torch.is_tensor(current.get(k)):
                    current[k].copy_(v)
                else:
                    current[k] = v.clone() if torch.is_tensor(v) else v
        _set_group_steps(inner, self._group_steps)

    def end(self, keep: bool) -> dict[str, Any] | None:
        """Back to the plain module after a fit; with `keep`, the optimiser state (fp32 masters,
        moments, step counts) on CPU, for the policy's next fit."""
        self.actor.model = self.module
        state = self.snapshot() if keep else None
        if self.per_fit:
            self.release()
        return state

    @torch.no_grad()
    def snapshot(self) -> dict[str, Any]:
        inner = self.engine.basic_optimizer
        params = _inner_params(inner)
        model_params = {id(p) for p in self.module.parameters()}
        owns_master = any(id(p) not in model_params for p in params)  # else the model's tensors are the masters
        cpu = lambda v: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v  # noqa: E731
        return {"shapes": [list(p.shape) for p in params],
                "master": [cpu(p) for p in params] if owns_master else None,
                "state": [{k: cpu(v) for k, v in inner.state.get(p, {}).items()} for p in params],
                "group_steps": [cpu(g.get("step")) for g in inner.param_groups]}

    @torch.no_grad()
    def restore(self, state: dict[str, Any], where: str) -> None:
        inner = self.engine.basic_optimizer
        params = _inner_params(inner)
        if state.get("shapes") != [list(p.shape) for p in params]:
            raise EmdpoError(f"{where}: the saved optimiser state does not fit this model's trainable tensors "
                             f"(saved shapes {state.get('shapes')}, here {[list(p.shape) for p in params]}); "
                             f"delete {STATE_FILE} to train on with a fresh optimiser state")
        if state["master"] is not None:
            for p, saved in zip(params, state["master"]):
                p.copy_(saved)
        on_device = {id(p): bool(g.get("capturable") or g.get("fused")) for g in inner.param_groups for p in g["params"]}
        for p, saved in zip(params, state["state"]):
            if not saved:
                inner.state.pop(p, None)
                continue
            current = inner.state.get(p, {})
            inner.state[p] = {k: self._placed(v, current.get(k), p, on_device[id(p)]) for k, v in saved.items()}
        _set_group_steps(inner, state["group_steps"])

    @staticmethod
    def _placed(saved: Any, current: Any, param: torch.Tensor, scalars_on_device: bool) -> Any:
        """A saved state entry on the device the optimiser keeps it on: where the current entry is,
        else with the parameter (moments) or on CPU (torch keeps `step` there unless capturable/fused)."""
        if not torch.is_tensor(saved):
            return saved
        if torch.is_tensor(current):
            device = current.device
        else:
            device = param.device if (saved.numel() > 1 or scalars_on_device) else torch.device("cpu")
        return saved.to(device, copy=True)

    def release(self) -> None:
        """Destroy the engine: its ZeRO hooks on the model's parameters and its memory go with it."""
        if self.engine is not None:
            self.actor.model = self.module
            self.engine.destroy()
            self.engine = self.optim = None
            self._template, self._group_steps = [], []
