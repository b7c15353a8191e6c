"""The tiny model's SFT, run through OpenRLHF's own SFT path.

:func:`sft_through_openrlhf` takes the initialised model folder that
:func:`emdpo_plugin.models.tiny.build_tiny_lm` wrote and trains it the way ``openrlhf train_sft``
would: ``get_strategy`` -> ``Actor`` -> ``SFTDataset(pretrain_mode=True)`` -> ``strategy.prepare``
-> ``SFTTrainer.fit`` -> ``strategy.save_model``, with the arguments built by
:func:`emdpo_plugin.host.args.make_args` on a machine adapted by
:func:`emdpo_plugin.host.compat.apply_cpu_compat`. The one addition to the host is a subclass of
``SFTTrainer`` that keeps the per-step loss it already computes (the build records it).
"""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Any, Sequence

__all__ = ["sft_through_openrlhf", "mean_nll"]


def mean_nll(model, tokenizer, texts: Sequence[str], max_len: int, batch_size: int = 64) -> float:
    """Mean per-token negative log-likelihood of ``texts`` (each + " " + eos) under ``model``."""
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            chunk = [t + " " + tokenizer.eos_token for t in texts[i:i + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_len,
                            add_special_tokens=False).to(next(model.parameters()).device)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = enc["input_ids"][:, 1:]
            mask = enc["attention_mask"][:, 1:].bool()
            tok_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            total += float(-(tok_logp[mask]).sum())
            count += int(mask.sum())
    model.train(was_training)
    return total / max(count, 1)


def sft_through_openrlhf(init_dir: Path, save_dir: Path, texts: list[str], *, max_len: int, steps: int,
                         batch_size: int, lr: float, seed: int) -> dict[str, Any]:
    """SFT the model in ``init_dir`` on ``texts`` and save it (with its tokenizer) to ``save_dir``.

    ``steps`` optimizer steps of ``batch_size`` texts each (the texts repeated as needed; one
    epoch), AdamW at ``lr`` with OpenRLHF's cosine-with-min-lr schedule; fp32 and ZeRO 0 on CPU.
    Returns ``loss_before``, ``loss_after`` (:func:`mean_nll` on up to 512 of the texts),
    ``steps`` and ``step_losses``.
    """
    from .compat import apply_cpu_compat

    apply_cpu_compat()
    import datasets
    import torch
    from openrlhf.datasets import SFTDataset
    from openrlhf.models import Actor
    from openrlhf.utils import get_strategy, get_tokenizer

    from .args import make_args

    n_items = steps * batch_size
    reps = math.ceil(n_items / len(texts))
    items = (list(texts) * reps)[:n_items]

    args = make_args({
        "model.model_name_or_path": str(init_dir),
        "model.pretrain_mode_enable": True,
        "train.seed": seed,
        "train.batch_size": batch_size,
        "train.micro_batch_size": batch_size,
        "train.max_epochs": 1,
        "adam.lr": lr,
        "adam.betas": (0.9, 0.95),
        "lr_warmup_ratio": 0.05,
        "min_lr_ratio": 0.1,
        "max_norm": 1.0,
        "data.input_key": "text",
        "data.max_len": max_len,
        "ckpt.output_dir": str(save_dir),
        "ckpt.path": str(save_dir.parent / "ckpt"),
        "logger.logging_steps": 1,
        "ds.attn_implementation": "sdpa",  # a small model needs no flash-attn (nor does the GPU check)
    })
    strategy = get_strategy(args)
    strategy.setup_distributed()

    model = Actor(
        args.model.model_name_or_path,
        attn_implementation=args.ds.attn_implementation,
        param_dtype=args.ds.param_dtype,
        lora_rank=0,
        ds_config=strategy.get_ds_train_config(),
        packing_samples=False,
    )
    tokenizer = get_tokenizer(args.model.model_name_or_path, model.model, "right", strategy)

    if torch.cuda.is_available():
        model.model.to(torch.cuda.current_device())
    probe = list(texts)[:512]  # the loss before/after on a fixed subset: enough to show SFT worked
    loss_before = mean_nll(model.model, tokenizer, probe, max_len)

    eos = tokenizer.eos_token
    train_data = datasets.Dataset.from_dict({"text": [t + " " + eos for t in items]})
    train_dataset = SFTDataset(train_data, tokenizer, max_len, strategy, pretrain_mode=True, num_processors=1)
    train_dataloader = strategy.setup_dataloader(train_dataset, args.train.micro_batch_size,
                                                 pin_memory=torch.cuda.is_available(), shuffle=True,
                                                 collate_fn=train_dataset.collate_fn)
    num_update_steps_per_epoch = max(1, len(train_dataloader) // strategy.accumulated_gradient)
    cfg = dict(
        optim=args.optim,
        muon=vars(args.muon),
        adam=vars(args.adam),
        lr_scheduler=args.lr_scheduler,
        lr_warmup_ratio=args.lr_warmup_ratio,
        min_lr_ratio=args.min_lr_ratio,
        max_norm=args.max_norm,
        scheduler_steps=num_update_steps_per_epoch * args.train.max_epochs,
    )
    model, optim, scheduler = strategy.prepare((model, cfg))

    trainer = _recording_trainer_cls()(
        model=model,
        strategy=strategy,
        optim=optim,
        train_dataloader=train_dataloader,
        eval_dataloader=None,
        scheduler=scheduler,
        max_norm=args.max_norm,
        pretrain_mode=True,
        batch_size=args.train.batch_size,
        max_epochs=args.train.max_epochs,
        tokenizer=tokenizer,
        save_hf_ckpt=False,
        disable_ds_ckpt=True,
    )
    trainer.fit(args, 0, num_update_steps_per_epoch)

    raw = strategy._unwrap_model(model)
    raw.config.use_cache = True  # Actor turns the KV cache off for training; generation wants it
    loss_after = mean_nll(raw, tokenizer, probe, max_len)
    strategy.save_model(model, tokenizer, str(save_dir))

    result = {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "steps": len(trainer.step_losses),
        "step_losses": trainer.step_losses,
    }
    del trainer, model, optim, scheduler, raw
    gc.collect()
    return result


def _recording_trainer_cls():
    from openrlhf.trainer.sft_trainer import SFTTrainer

    class RecordingSFTTrainer(SFTTrainer):
        """SFTTrainer that keeps the per-optimizer-step loss it already computes."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.step_losses: list[float] = []

        def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
            if logs_dict and "loss_mean" in logs_dict:
                self.step_losses.append(float(logs_dict["loss_mean"]))
            return super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)

    return RecordingSFTTrainer

