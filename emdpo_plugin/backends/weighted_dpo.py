"""Weighted DPO / Plackett-Luce training on OpenRLHF's DPOTrainer.

The host's `DPOTrainer` averages an unweighted DPO loss over (chosen, rejected) pairs and runs
the reference model every step. EM-DPO's M-step needs per-comparison weights (the
responsibilities), rankings over more than two responses, and a reference that is computed
once and cached. `WeightedDPOTrainer` subclasses the host trainer and replaces only the
training loop; the forward pass (`concatenated`-style batching through the `Actor`),
sequence log-prob reduction (`_get_batch_logps`), DeepSpeed backward/step, logging and
checkpointing all stay the host's. The loss is `algorithms.likelihood.comparison_loglik`, the
same function the E-step uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from openrlhf.trainer.dpo_trainer import DPOTrainer
from openrlhf.utils.utils import zero_pad_sequences
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from .. import tracking
from ..algorithms.likelihood import comparison_loglik


@dataclass(frozen=True)
class Tokenized:
    """One (prompt, response) sequence in OpenRLHF's DPO convention."""

    input_ids: torch.Tensor  # (1, L) prompt + response + eos
    attention_mask: torch.Tensor  # (1, L)
    prompt_len: int


@dataclass
class ResponseBatch:
    input_ids: torch.Tensor  # (B * m, L), right padded
    attention_mask: torch.Tensor
    prompt_lens: list[int]
    width: int  # m: responses per row in this batch (short rows padded and masked)


def collate_responses(items: list[list[Tokenized]], pad_token_id: int) -> tuple[ResponseBatch, torch.Tensor]:
    """Flatten rows of responses into one right-padded batch; returns (batch, response mask (B, m))."""
    width = max(len(r) for r in items)
    seqs, masks, plens = [], [], []
    response_mask = torch.zeros(len(items), width, dtype=torch.bool)
    for i, row in enumerate(items):
        response_mask[i, : len(row)] = True
        for t in row + [row[0]] * (width - len(row)):  # filler responses are masked out
            seqs.append(t.input_ids)
            masks.append(t.attention_mask)
            plens.append(t.prompt_len)
    ids = zero_pad_sequences(seqs, side="right", value=pad_token_id).squeeze(1)
    att = zero_pad_sequences(masks, side="right").squeeze(1)
    return ResponseBatch(ids, att, plens, width), response_mask


def sequence_logps(actor, batch: ResponseBatch, ring_attn_group=None,
                   trainer: DPOTrainer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and per-token mean of response-token log-probs per sequence, each (B, m), via the
    host's reduction `DPOTrainer._get_batch_logps` (its masking of prompt tokens).

    Training passes its trainer. Scoring has none (it runs on the bare `Actor`), and the host
    has no module-level version of the reduction, so it calls the method unbound with
    `self=None`: the method reads no instance state (tests/test_host_drift.py checks that)."""
    log_probs = actor(batch.input_ids, attention_mask=batch.attention_mask, return_logprobs=True,
                      ring_attn_group=ring_attn_group)
    args = (log_probs, batch.attention_mask, batch.prompt_lens)
    sums, means = trainer._get_batch_logps(*args) if trainer is not None else DPOTrainer._get_batch_logps(None, *args)
    return sums.view(-1, batch.width), means.view(-1, batch.width)


class WeightedComparisons(Dataset):
    """Rows kept for one M-step: tokenized responses, ranking, cached reference log-probs, weight."""

    def __init__(self, tokens: list[list[Tokenized]], rankings: np.ndarray, ref_logps: np.ndarray,
                 weights: np.ndarray, pad_token_id: int) -> None:
        self.tokens, self.rankings, self.ref, self.weights = tokens, rankings, ref_logps, weights
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int):
        return self.tokens[i], self.rankings[i], self.ref[i], self.weights[i], i

    def lengths(self) -> list[int]:
        """Tokens of each row's longest response: what a batch pads to."""
        return [max(t.input_ids.shape[1] for t in row) for row in self.tokens]

    def collate_fn(self, items):
        batch, response_mask = collate_responses([t for t, *_ in items], self.pad_token_id)
        width = batch.width
        rankings = torch.as_tensor(np.stack([r[:width] for _, r, _, _, _ in items]))
        ref = torch.as_tensor(np.stack([np.nan_to_num(x[:width]) for _, _, x, _, _ in items]))
        weights = torch.as_tensor(np.array([w for _, _, _, w, _ in items], dtype=np.float64))
        index = torch.as_tensor([i for *_, i in items])
        return batch, response_mask, rankings, ref, weights, index


class LengthGroupedShard(Sampler):
    """This rank's row order for one fit: rows of similar length share a micro-batch.

    transformers' `LengthGroupedSampler` (the `group_by_length` of HF's Trainer: random
    mega-batches of 50 groups, sorted by length inside) orders the rows in groups of `group` =
    micro-batch x data-parallel ranks; rank r takes every world-th row, so each rank's
    micro-batch comes from one group. Padded by wrapping to a multiple of `world` (every rank
    runs the same number of micro-batches), as torch's DistributedSampler pads. Each epoch
    (`set_epoch`) draws a new order from `seed + epoch`."""

    def __init__(self, lengths: list[int], group: int, seed: int, world: int = 1, rank: int = 0) -> None:
        self.lengths, self.group, self.seed, self.world, self.rank = lengths, group, seed, world, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.world)

    def __iter__(self):
        from transformers.trainer_pt_utils import LengthGroupedSampler

        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = list(LengthGroupedSampler(self.group, lengths=self.lengths, generator=gen))
        order += order[: (-len(order)) % self.world]
        return iter(order[self.rank::self.world])


class WeightedDPOTrainer(DPOTrainer):
    """OpenRLHF's DPOTrainer with per-comparison weights, Plackett-Luce rankings and a cached reference."""

    def __init__(self, model, strategy, tokenizer, optim, train_dataloader, scheduler, *, beta: float,
                 label_smoothing: float, mean_weight: float, max_epochs: int, max_norm: float = 1.0,
                 nll_loss_coef: float = 0.0, max_micro_batches: int | None = None) -> None:
        super().__init__(model, None, strategy, tokenizer, optim, train_dataloader, None, scheduler,
                         max_norm=max_norm, beta=beta, max_epochs=max_epochs)
        self.label_smoothing = label_smoothing
        self.nll_loss_coef = nll_loss_coef
        self.mean_weight = mean_weight  # over the whole weighted set: minibatch losses are unbiased
        # a budget in micro-batches (whole optimiser steps) that may end inside an epoch
        self.max_micro_batches = max_micro_batches or max_epochs * len(train_dataloader)
        # each row's log-likelihood from its latest training forward (EM's incremental E-step)
        self.row_ll = np.full(len(train_dataloader.dataset), np.nan)
        tracker = tracking.active()  # the run's one tracker (recipe `logger:`), not one per fit
        if tracker is not None and self.strategy.is_rank_0():
            self._wandb, self._tensorboard = None, tracker.host_writer()

    def fit(self, args, consumed_samples=0, num_update_steps_per_epoch=None, desc: str = "M-step") -> dict:
        # the host's conventions: -1 means once per epoch (eval) and never (checkpoints)
        if args.eval.steps == -1:
            args.eval.steps = float("inf")
        if args.ckpt.save_steps == -1:
            args.ckpt.save_steps = float("inf")
        device = next(self.model.parameters()).device
        losses: list[float] = []
        step = 1
        bar = tqdm(total=self.max_micro_batches, desc=desc, leave=False,
                   disable=not self.strategy.is_rank_0())
        for epoch in range(self.epochs):
            sampler = getattr(self.train_dataloader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            self.model.train()
            for batch, response_mask, rankings, ref, weights, index in self.train_dataloader:
                if step > self.max_micro_batches:
                    break
                batch.input_ids = batch.input_ids.to(device)
                batch.attention_mask = batch.attention_mask.to(device)
                logps, token_means = sequence_logps(self.model, batch, self.strategy.ring_attn_group, self)
                rankings = rankings.to(device)
                ll = comparison_loglik(logps, ref.to(device, logps.dtype), rankings,
                                       response_mask.to(device), self.beta, self.label_smoothing)
                self.row_ll[index.numpy()] = ll.detach().double().cpu().numpy()
                if self.nll_loss_coef > 0:  # the host's nll term (RPO): per-token NLL of the top response
                    top = token_means.gather(1, rankings[:, :1]).squeeze(1)
                    ll = ll + self.nll_loss_coef * top
                w = weights.to(device, logps.dtype)
                loss = -(w * ll).sum() / (len(w) * self.mean_weight)
                self.strategy.backward(loss, self.model, self.optimizer)
                self.strategy.optimizer_step(self.optimizer, self.model, self.scheduler)
                losses.append(loss.item())
                logs = {"loss": losses[-1], "lr": self.scheduler.get_last_lr()[0]}
                bar.set_postfix(self.strategy.all_reduce(logs))
                bar.update()
                if step % self.strategy.accumulated_gradient == 0:
                    global_step = step // self.strategy.accumulated_gradient
                    self.save_logs_and_checkpoints(args, global_step, bar, logs,
                                                   {"consumed_samples": global_step * args.train.batch_size})
                step += 1
        bar.close()
        return {"steps": step - 1, "loss_first": losses[0] if losses else None,
                "loss_last": float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else None}
