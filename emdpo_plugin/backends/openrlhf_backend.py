"""PolicyBackend for causal language models, trained through OpenRLHF's DeepSpeed strategy.

One frozen base model is loaded once. With LoRA (`lora.rank > 0`) every type policy is an
adapter on that base and the reference is the same base with adapters disabled: one copy of
the weights in memory. A policy is the set of trainable tensors (adapter weights, or all weights
for full fine-tuning); it is copied into the model to score, sample, train or save it.

Reference log-probs of the dataset are computed once and cached on disk (`<run>/cache/`,
`ref_cache`), keyed by the reference model's identity and each row's prompt and responses;
the reference model never runs inside EM iterations.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from .. import dist
from ..config import StrictModel
from ..data.chat import render_pair, render_prompt
from ..data.schema import ComparisonSet
from ..errors import EmdpoError
from ..fingerprint import model_identity
from ..host.compat import apply_cpu_compat
from ..host.optimizer import use_torch_optimizer
from .base import FitSchedule
from .ref_cache import ReferenceCache, cache_file
from .train_engine import STATE_FILE, TrainEngine

FEATURE_DIM = 256  # `ref_features` width at most: enough for a linear reward mixture, small on disk


class LoraSpec(StrictModel):
    """`model.lora`: every type policy is a LoRA adapter on one frozen base (peft)."""

    rank: int = Field(16, ge=0, description="LoRA rank; 0 = full fine-tuning (one full copy per type, as the paper)")
    alpha: int = Field(32, description="LoRA alpha (updates scaled by alpha / rank)")
    dropout: float = Field(0.0, description="LoRA dropout")
    target_modules: str | list[str] = Field("all-linear", description=(
        "modules that get adapters, by peft name; all-linear: every linear layer but the output head"))


class TrainSpec(StrictModel):
    """`model.train`: the optimisation of each fit (OpenRLHF's train.* and adam.* options)."""

    micro_batch_size: int = Field(4, description="comparisons per forward/backward pass on each process")
    batch_size: int = Field(16, description=(
        "comparisons per optimiser step over all processes (global batch; a multiple of micro_batch_size x processes)"))
    max_epochs: int = Field(1, ge=1, description=(
        "passes over its comparisons of a fit from the reference: dpo, EM seeding and cold M-steps (paper: 1)"))
    warm_epochs: int | None = Field(None, ge=1, description="passes of a warm-started EM M-step (default: max_epochs)")
    lr: float = Field(5e-7, gt=0, description="peak learning rate (paper Table 2: 5e-7)")
    optimizer: Literal["adamw", "rmsprop"] = Field("adamw", description=(
        "adamw: OpenRLHF's own DeepSpeed AdamW; rmsprop: torch.optim.RMSprop (alpha 0.99, eps 1e-8, "
        "no momentum), the paper's optimiser, handed to DeepSpeed through its optimizer config"))
    lr_warmup_steps: int = Field(150, ge=0, description="warm-up optimiser steps, capped at a fit's length (paper: 150)")
    lr_scheduler: str = Field("cosine_with_min_lr", description=(
        "a transformers scheduler name: cosine_with_min_lr (OpenRLHF's default), constant_with_warmup "
        "(the paper: warm-up then constant), linear, constant, ..."))
    min_lr_ratio: float = Field(0.1, description="cosine_with_min_lr: the final lr as a fraction of lr")
    max_norm: float = Field(1.0, description="gradient clipping: largest global gradient norm")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (optimizer: adamw)")
    weight_decay: float = Field(0.0, description="weight decay of AdamW or RMSprop")
    optimizer_state: Literal["fresh", "carry"] = Field("fresh", description=(
        "where a warm fit (EM's M-step continuing a type) starts: fresh: a new optimiser state, as a new "
        "engine would have (each M-step a weighted DPO run, as the paper); carry: the type's own optimiser "
        "state (moments, step count, fp32 master weights) from its last fit, kept in memory (twice the "
        "trainable weights per type) and saved as optimizer.pt in EM checkpoints. Chosen on the CPU "
        "recipe's validation split: fresh (docs/pipeline.md)"))
    seed: int = Field(42, description="OpenRLHF's train.seed: the training engine's torch seed")


class DSSpec(StrictModel):
    """`model.ds`: DeepSpeed and model loading (OpenRLHF's ds.* options)."""

    zero_stage: int | None = Field(None, description="DeepSpeed ZeRO stage (default: 2 on GPU, 0 on CPU)")
    param_dtype: Literal["bf16", "fp16", "fp32"] | None = Field(None, description=(
        "parameter dtype (default: bf16 on GPU, fp32 on CPU)"))
    attn_implementation: str = Field("sdpa", description=(
        "transformers attention: sdpa, eager, or flash_attention_2 (needs the flash-attn package)"))
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory, slower")
    torch_adam: bool | None = Field(None, description=(
        "DeepSpeed's torch AdamW instead of its fused op (which JIT-compiles: ~75 s on CPU, needs nvcc "
        "on GPU); default: on CPU only"))


class GenerationSpec(StrictModel):
    """`model.generation`: sampling for the regret matrix L and the oracle regret (HF generate or vLLM)."""

    max_new_tokens: int = Field(48, description="largest number of tokens sampled per response")
    temperature: float = Field(1.0, description="sampling temperature (1.0: the policy's own distribution)")
    top_p: float = Field(1.0, description="nucleus sampling p (1.0: off)")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description=(
        "sampler: vllm on GPU: vLLM's share of GPU memory (weights + KV cache), next to the training model"))
    vllm_offload_training_model: bool = Field(True, description=(
        "sampler: vllm on GPU: move the training model to CPU while vLLM samples, back after"))


class OpenRLHFModelConfig(StrictModel):
    """The `model:` section of `backend: openrlhf`: causal LMs trained through OpenRLHF."""

    pretrain: str = Field(..., description="the SFT reference: a model folder, a hub id, or stage:NAME (an sft stage's model)")
    trust_remote_code: bool = Field(False, description="run a model repository's own code when loading it")
    beta: float = Field(0.1, description="DPO beta: strength of the KL penalty to the reference (paper: 0.1)")
    label_smoothing: float = Field(0.0, description="conservative DPO epsilon (OpenRLHF's name): assumed label-flip "
                                                    "probability; 0: plain DPO")
    nll_loss_coef: float = Field(0.0, ge=0.0, description=(
        "OpenRLHF's nll_loss_coef: adds coef * per-token NLL of each comparison's top response to "
        "the (weighted) DPO loss, which keeps type policies near the reference's likelihood scale; "
        "a training regulariser only: the E-step and EM's monotonicity guard use the pure likelihood"))
    max_len: int = Field(512, description="tokens of prompt + response; longer responses are truncated (paper: 512)")
    eval_batch_size: int = Field(16, description="comparisons per scoring batch (reference, E-step); sequences per sampling batch")
    lora: LoraSpec = Field(LoraSpec(), description="LoRA adapters (rank 0: full fine-tuning)")
    train: TrainSpec = Field(TrainSpec(), description="optimisation of each fit")
    ds: DSSpec = Field(DSSpec(), description="DeepSpeed and model loading")
    generation: GenerationSpec = Field(GenerationSpec(), description="sampling for the regret matrix and oracle regret")


@dataclass
class LMPolicy:
    """The trainable tensors of one type policy (on CPU), and the optimiser state its last fit
    ended with when `model.train.optimizer_state` carries it (`TrainEngine.end`)."""

    state: dict[str, torch.Tensor]
    optim: dict[str, Any] | None = None


def fit_seed(train_seed: int, desc: str, rows: np.ndarray, weights: np.ndarray, micro_batches: int,
             start: LMPolicy | None) -> int:
    """The torch seed of one fit, derived from what the fit is: the train seed, its name, rows,
    weights, length and starting tensors (None: the reference).

    Dropout (`model.lora.dropout`, or the base model's own) draws from torch's global RNG. Unseeded,
    a fit's masks would depend on everything this process ran before it, so a run resumed after
    a kill (a new process that starts at a later stage or EM iteration) would train differently
    from one never interrupted (tests/test_faults.py). The starting tensors tell apart M-steps of
    equal weights; hashing them costs about what the snapshot every fit takes already does."""
    h = hashlib.sha256(json.dumps([train_seed, desc, int(micro_batches)]).encode())
    h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(weights, dtype=np.float64).tobytes())
    for name, tensor in sorted((start.state if start is not None else {}).items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return int.from_bytes(h.digest()[:8], "little") >> 1  # torch.manual_seed takes < 2**63


def resolve_pretrain(pretrain: str, run_dir: Path | None) -> str:
    """`stage:NAME` -> the model folder that stage recorded in run.json (e.g. the `sft` stage)."""
    if not pretrain.startswith("stage:"):
        return pretrain
    stage = pretrain.removeprefix("stage:")
    run_json = (run_dir or Path(".")) / "run.json"
    outputs = json.loads(run_json.read_text()).get("stages", {}).get(stage, {}).get("outputs", {}) if run_json.exists() else {}
    if "model" not in outputs:
        raise EmdpoError(f"model.pretrain: {pretrain!r} but stage {stage!r} has not produced a model in {run_json}")
    local = (run_dir or Path(".")) / outputs["model"]
    return str(local) if outputs.get("built") else outputs["model"]


def schedule_lrs(scheduler: Any, steps: int) -> list[float] | None:
    """The learning rate of each of the fit's optimiser steps, read from the real scheduler.

    transformers' schedulers are `LambdaLR`s: step s runs at base_lr * lr_lambda(s), and reading
    the lambdas has no side effects. None if the scheduler is of another kind."""
    lambdas, base = getattr(scheduler, "lr_lambdas", None), getattr(scheduler, "base_lrs", None)
    if not lambdas or not base:
        return None
    return [float(base[0] * lambdas[0](s)) for s in range(steps)]


class OpenRLHFBackend:
    """Implements the PolicyBackend verbs (backends/base.py) on OpenRLHF.

    Capabilities: SupportsExport (`base_model`, `adapter_type`) and SupportsVLLMSampling.
    """

    Config = OpenRLHFModelConfig

    def __init__(self, config: dict[str, Any], *, seed: int = 0, run_dir: Path | None = None) -> None:
        self.cfg = OpenRLHFModelConfig.model_validate(config)
        self.beta, self.label_smoothing, self.seed = self.cfg.beta, self.cfg.label_smoothing, seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.cpu = apply_cpu_compat()
        if self.cfg.ds.torch_adam is not None:
            from ..host import compat

            compat.TORCH_ADAM = self.cfg.ds.torch_adam
        self.pretrain = resolve_pretrain(self.cfg.pretrain, self.run_dir)
        self._tokens: dict[tuple[str, str], Any] = {}  # by text: one tokenizer per backend
        self._build()
        # what the reference's scores depend on: the model (a `stage:` model: that stage's
        # fingerprint), and how sequences are cut and computed
        self.reference_identity = {"model": model_identity(self.cfg.pretrain, self.pretrain, self.run_dir),
                                   "max_len": self.cfg.max_len, "dtype": self.args.ds.param_dtype,
                                   "attn": self.cfg.ds.attn_implementation}
        self.ref_cache = ReferenceCache(cache_file(self.run_dir, self.reference_identity))
        self.ref_feature_cache = ReferenceCache(
            cache_file(self.run_dir, {**self.reference_identity, "features": f"mean-last-hidden/{FEATURE_DIM}"},
                       "features"), ndim=2)
        self._projection: torch.Tensor | None = None  # `_pool`'s fixed map to FEATURE_DIM, drawn on first use
        # counters a stage records (run.json): the reference cache, and where fit/score time goes
        self.stats: dict[str, float] = {"ref_rows_computed": 0, "ref_rows_cached": 0, "ref_seconds": 0.0,
                                        "train_seconds": 0.0, "engine_seconds": 0.0, "score_seconds": 0.0,
                                        "sequences_scored": 0, "engine_builds": 0}

    # --- set-up -----------------------------------------------------------------------------
    def _build(self) -> None:
        from openrlhf.models import Actor
        from openrlhf.utils import get_strategy
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..host.args import make_args

        ds, tr = self.cfg.ds, self.cfg.train
        overrides = {
            "model.model_name_or_path": self.pretrain, "model.beta": self.beta,
            "model.label_smoothing": self.label_smoothing, "model.nll_loss_coef": self.cfg.nll_loss_coef,
            "train.micro_batch_size": tr.micro_batch_size, "train.batch_size": tr.batch_size,
            "train.seed": tr.seed, "train.max_epochs": tr.max_epochs, "data.max_len": self.cfg.max_len,
            "ds.attn_implementation": ds.attn_implementation, "max_norm": tr.max_norm,
            "ds.lora.rank": self.cfg.lora.rank, "ds.lora.alpha": self.cfg.lora.alpha,
            "model.gradient_checkpointing_enable": ds.gradient_checkpointing,
        }
        if ds.zero_stage is not None:
            overrides["ds.zero_stage"] = ds.zero_stage
        if ds.param_dtype is not None:
            overrides["ds.param_dtype"] = ds.param_dtype
        self.args = make_args(overrides)
        self.strategy = get_strategy(self.args)
        if tr.optimizer == "rmsprop":
            use_torch_optimizer(self.strategy, "RMSprop", {"lr": tr.lr, "alpha": 0.99, "eps": 1e-8,
                                                          "weight_decay": tr.weight_decay, "momentum": 0.0})
        self.strategy.setup_distributed()
        world = self.strategy.world_size
        if tr.batch_size % (tr.micro_batch_size * world) != 0:
            raise EmdpoError(f"model.train.batch_size ({tr.batch_size}) must be a multiple of "
                             f"micro_batch_size ({tr.micro_batch_size}) x data-parallel processes ({world})")

        from openrlhf.utils.utils import convert_to_torch_dtype

        dtype = convert_to_torch_dtype(self.args.ds.param_dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.pretrain, trust_remote_code=self.cfg.trust_remote_code)
        if self.tokenizer.pad_token is None:  # the host's get_tokenizer rule
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            self.pretrain, trust_remote_code=self.cfg.trust_remote_code,
            attn_implementation=ds.attn_implementation, dtype=dtype)
        model.config.use_cache = False
        if self.cfg.lora.rank > 0:
            from peft import LoraConfig, TaskType, get_peft_model

            model.enable_input_require_grads()
            model = get_peft_model(model, LoraConfig(
                task_type=TaskType.CAUSAL_LM, r=self.cfg.lora.rank, lora_alpha=self.cfg.lora.alpha,
                target_modules=self.cfg.lora.target_modules, lora_dropout=self.cfg.lora.dropout, bias="none"))
        if ds.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.actor = Actor(model)
        self.actor.packing_samples = False  # Actor sets this only when it loads the model itself
        self.module = model  # the raw (peft) module; DeepSpeed engines wrap it per fit
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.module.to(self.device)
        self.trainable = [n for n, p in self.module.named_parameters() if p.requires_grad]
        self.base_state = self._snapshot()  # the reference (LoRA: B = 0, so adapters are the identity)
        self.engine = TrainEngine(self.strategy, self.actor, self.module, per_fit=self.args.ds.zero_stage == 3)
        self.carry_optimizer_state = self._carry(tr.optimizer_state)

    def _carry(self, choice: str) -> bool:
        """Whether warm fits continue their policy's optimiser state (`model.train.optimizer_state`).
        Under ZeRO 1-3 with several processes each rank holds a partition of the state and only
        rank 0's policy travels back to the driver, so carrying it needs one process or ZeRO 0."""
        if choice == "carry" and self.strategy.world_size > 1 and self.args.ds.zero_stage != 0:
            raise EmdpoError(f"model.train.optimizer_state=carry: needs ds.zero_stage 0 or one process; here "
                             f"ZeRO {self.args.ds.zero_stage} partitions the state over {self.strategy.world_size} "
                             "processes (use fresh)")
        return choice == "carry"

    def release_engine(self) -> None:
        """Destroy the training engine (a stage's fits are done): its memory goes to what runs next."""
        self.engine.release()

    @property
    def lora(self) -> bool:
        return self.cfg.lora.rank > 0

    @property
    def base_model(self) -> str:
        """What routing.yaml names as the base: an absolute local folder, or the hub id."""
        local = Path(self.pretrain)
        return str(local.resolve()) if local.exists() else self.pretrain

    @property
    def adapter_type(self) -> str:
        return "lora" if self.lora else "full"

    def _snapshot(self) -> dict[str, torch.Tensor]:
        params = dict(self.module.named_parameters())
        return {n: params[n].detach().to("cpu", copy=True) for n in self.trainable}

    @torch.no_grad()
    def _activate(self, policy: LMPolicy | None) -> None:
        params = dict(self.module.named_parameters())
        state = self.base_state if policy is None else policy.state
        for n in self.trainable:
            params[n].copy_(state[n])

    def _restart(self, policy: LMPolicy) -> LMPolicy | None:
        """Where a cold fit starts: the reference. With LoRA that is the policy's own A matrices
        with B = 0 (so the start depends on the policy's seed, not on which process fits it)."""
        if not self.lora:
            return None
        return LMPolicy({n: torch.zeros_like(t) if "lora_B" in n else t for n, t in policy.state.items()})

    def _reference(self):
        """Context in which the model is the reference: adapters off (LoRA) or base weights."""
        if self.lora:
            return self.module.disable_adapter()
        self._activate(None)
        return torch.no_grad()

    # --- tokenization (OpenRLHF's DPO convention: prompt + response + eos) -------------------
    def _tokenize(self, prompt: str, response: str):
        """The one tokenization of training and scoring; message lists go through the chat
        template first (`data.chat.render_pair`), as OpenRLHF's DPO dataset renders them."""
        from .weighted_dpo import Tokenized

        key = (prompt, response)
        if key not in self._tokens:
            tok, eos = self.tokenizer, self.tokenizer.eos_token
            prompt, response = render_pair(tok, prompt, response)
            text = (prompt + response).rstrip("\n")
            if not text.endswith(eos):
                text += " " + eos
            enc = tok(text, max_length=self.cfg.max_len, truncation=True, padding=False,
                      return_tensors="pt", add_special_tokens=False)
            enc["input_ids"][0][-1] = tok.eos_token_id
            enc["attention_mask"][0][-1] = True
            plen = len(tok(prompt, add_special_tokens=False)["input_ids"])
            if plen >= self.cfg.max_len - 2:
                raise EmdpoError(f"a prompt of {plen} tokens leaves no room for its response within "
                                 f"model.max_len={self.cfg.max_len} (prompt starts {prompt[:60]!r}); raise max_len")
            self._tokens[key] = Tokenized(enc["input_ids"], enc["attention_mask"], plen)
        return self._tokens[key]

    # --- scoring --------------------------------------------------------------------------
    @torch.no_grad()
    def _score_active(self, prompts: list[str], responses: list[list[str]], desc: str,
                      features: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Log-probs under the active weights; under a launcher each rank scores a strided share.
        `features`: also each response's pooled last hidden state (`FEATURE_DIM` at most, see
        `ref_features`), from the same forward pass: returns (log-probs, features)."""
        from .weighted_dpo import collate_responses, sequence_logps

        width = max(len(r) for r in responses)
        out = np.full((len(prompts), width), np.nan)
        where: dict[tuple[str, str], list[tuple[int, int]]] = {}  # each distinct sequence is scored once
        for i, (p, rs) in enumerate(zip(prompts, responses)):
            for j, r in enumerate(rs):
                where.setdefault((p, r), []).append((i, j))
        flat = [(key, self._tokenize(*key)) for key in where]
        flat.sort(key=lambda t: t[1].input_ids.shape[1])  # length-sorted batches pad little
        mine_idx, mine = dist.shard(flat)
        self.module.eval()
        bs = self.cfg.eval_batch_size
        values: list[Any] = []
        hidden: list[torch.Tensor] = []
        hook = (self.module.get_output_embeddings().register_forward_pre_hook(lambda _m, a: hidden.append(a[0]))
                if features else None)
        try:
            for s in tqdm(range(0, len(mine), bs), desc=desc, leave=False,
                          disable=len(mine) <= bs or not dist.is_driver()):
                chunk = mine[s: s + bs]
                batch, _ = collate_responses([[t] for _, t in chunk], self.tokenizer.pad_token_id)
                batch.input_ids, batch.attention_mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
                logps = sequence_logps(self.actor, batch)[0].squeeze(1).double().cpu().tolist()
                if hook is None:
                    values.extend(logps)
                    continue
                pooled = self._pool(hidden.pop(), batch.attention_mask, batch.prompt_lens)
                values.extend(zip(logps, pooled))
        finally:
            if hook is not None:
                hook.remove()
        feats = None
        for (key, _), v in zip(flat, dist.gather(mine_idx, values, len(flat))):
            if features:
                v, f = v
                if feats is None:
                    feats = np.full((len(prompts), width, len(f)), np.nan, dtype=np.float32)
                for i, j in where[key]:
                    feats[i, j] = f
            for i, j in where[key]:
                out[i, j] = v
        return (out, feats) if features else out

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: list[int]) -> list[np.ndarray]:
        """Mean of the last hidden states that predict a sequence's response tokens (positions
        prompt_len - 1 .. length - 2), projected to `FEATURE_DIM` by a fixed Gaussian map when wider."""
        h = hidden.float()
        pos = torch.arange(h.shape[1], device=h.device)[None, :]
        length = attention_mask.sum(dim=1, keepdim=True)
        start = torch.tensor(prompt_lens, device=h.device)[:, None] - 1
        m = ((pos >= start) & (pos < length - 1)).float()
        pooled = (h * m[..., None]).sum(dim=1) / m.sum(dim=1, keepdim=True).clamp_min(1.0)
        if pooled.shape[1] > FEATURE_DIM:
            if self._projection is None:
                g = torch.Generator().manual_seed(0)
                self._projection = torch.randn(pooled.shape[1], FEATURE_DIM, generator=g) / FEATURE_DIM ** 0.5
            pooled = pooled.cpu() @ self._projection
        return list(pooled.cpu().numpy())

    def score(self, policy: LMPolicy | None, prompts: list[str], responses: list[list[str]]) -> np.ndarray:
        if policy is None:
            with self._reference():
                return self._score_active(prompts, responses, "score reference")
        t = time.perf_counter()
        self._activate(policy)
        out = self._score_active(prompts, responses, "score")
        self.stats["score_seconds"] += time.perf_counter() - t
        self.stats["sequences_scored"] += int(np.isfinite(out).sum())
        return out

    def ref_score(self, data: ComparisonSet) -> np.ndarray:
        """Reference log-probs, computed once per (prompt, responses) and kept on disk (`ref_cache`);
        the pass that computes them also fills the feature cache (`ref_features`)."""
        return self._reference_cached(data, self.ref_cache, self.ref_feature_cache, 0)

    def ref_features(self, data: ComparisonSet) -> np.ndarray:
        """(rows, responses, d) features of every response under the reference model: the mean
        last hidden state over the positions that predict its tokens, d = hidden size or
        `FEATURE_DIM` (a fixed random projection) if that is smaller. Kept on disk like the
        reference log-probs and computed in the same forward pass, so a run that scored the
        reference has them for free. `em_dpo`'s `init: features` starts from them."""
        return self._reference_cached(data, self.ref_feature_cache, self.ref_cache, 1)

    def _reference_cached(self, data: ComparisonSet, cache: ReferenceCache, other: ReferenceCache,
                          part: int) -> np.ndarray:
        t = time.perf_counter()
        write = dist.is_driver()  # under a launcher rank 0 writes

        def compute(rows: list[int]) -> np.ndarray:
            with self._reference():
                both = self._score_active([data.prompts[i] for i in rows], [data.responses[i] for i in rows],
                                          "score reference", features=True)
            other.put(data, rows, both[1 - part], write=write)
            return both[part]

        out, computed = cache.scores(data, compute, write=write)
        self.stats["ref_rows_cached"] += len(data) - computed
        if computed:
            self.stats["ref_rows_computed"] += computed
            self.stats["ref_seconds"] += time.perf_counter() - t
        return out

    # --- policies -------------------------------------------------------------------------
    def new_policy(self, seed: int) -> LMPolicy:
        """A policy equal to the reference: LoRA A re-drawn with `seed`, B = 0; or the base weights."""
        if not self.lora:
            return LMPolicy({n: t.clone() for n, t in self.base_state.items()})
        from peft.tuners.lora import LoraLayer

        torch.manual_seed(seed)
        for module in self.module.modules():
            if isinstance(module, LoraLayer):
                for name in module.active_adapters:
                    module.reset_lora_parameters(name, True)
        return LMPolicy(self._snapshot())

    def fit(self, policy: LMPolicy, data: ComparisonSet, weights: np.ndarray, *, warm: bool = True,
            desc: str = "", schedule: FitSchedule | None = None) -> dict[str, Any]:
        """Weighted DPO on the rows with weight > 0 through the backend's DeepSpeed engine
        (`TrainEngine`: one per stage; a warm fit continues the policy's optimiser state when it is
        carried, every other fit starts a fresh one).

        Budget: `schedule.steps` optimiser steps, else `schedule.epochs` passes, else
        `warm_epochs`/`max_epochs`; the micro-batch count is rounded up to whole optimiser steps
        (a partial accumulation would never step). Schedule: the configured one with
        `lr_warmup_steps` (capped at the fit's length; a warm fit's at one step less), or a constant lr for `schedule.constant_lr`.
        Refused with an `EmdpoError` if every optimiser step would run at lr 0."""
        from .weighted_dpo import LengthGroupedShard, WeightedComparisons, WeightedDPOTrainer

        keep = np.flatnonzero(np.asarray(weights) > 0)
        if len(keep) == 0:
            return {"rows": 0, "steps": 0, "epochs": 0.0}
        t = time.perf_counter()
        ref = self.ref_score(data)[keep]
        tokens = [[self._tokenize(data.prompts[i], r) for r in data.responses[i]] for i in keep]
        w = np.asarray(weights, dtype=np.float64)[keep]
        dataset = WeightedComparisons(tokens, data.rankings[keep], ref, w, self.tokenizer.pad_token_id)
        start = policy if warm else self._restart(policy)
        self._activate(start)
        tr = self.cfg.train
        schedule = schedule or FitSchedule()
        world = self.strategy.world_size
        order = LengthGroupedShard(dataset.lengths(), tr.micro_batch_size * world,
                                   tr.seed if schedule.order_seed is None else schedule.order_seed, world, dist.rank())
        loader = self.strategy.setup_dataloader(dataset, tr.micro_batch_size, True, False, dataset.collate_fn,
                                                drop_last=False, sampler=order)
        accum = self.strategy.accumulated_gradient
        if schedule.steps is not None:
            micro = schedule.steps * accum
        else:
            epochs = schedule.epochs or ((tr.warm_epochs or tr.max_epochs) if warm else tr.max_epochs)
            micro = max(1, round(len(loader) * epochs))
        steps = math.ceil(micro / accum)
        micro = steps * accum
        if schedule.constant_lr:
            sched_name, warmup = "constant", 0
        else:
            # a warm fit (an EM M-step continuing a trained type) keeps one step past its warm-up:
            # a type with few rows may get a single step, which a full warm-up would run at lr 0
            sched_name, warmup = tr.lr_scheduler, min(tr.lr_warmup_steps, steps - 1 if warm else steps)
        optim_cfg = {
            "optim": "adam",
            "adam": {"lr": tr.lr, "betas": tuple(tr.adam_betas), "eps": 1e-8, "weight_decay": tr.weight_decay},
            "lr_scheduler": sched_name, "lr_warmup_ratio": warmup / steps,
            "min_lr_ratio": tr.min_lr_ratio, "max_norm": tr.max_norm, "scheduler_steps": steps,
        }
        carry = self.carry_optimizer_state and warm and policy.optim is not None
        t_engine = time.perf_counter()  # the shared engine; built by the run's first fit
        actor, optim, scheduler = self.engine.begin(optim_cfg, steps, policy.optim if carry else None,
                                                    where=desc or "fit")
        engine_s = time.perf_counter() - t_engine
        self.stats["engine_builds"] = self.engine.builds
        lrs = schedule_lrs(scheduler, steps)
        if lrs is not None and max(lrs) <= 0:
            self.engine.end(keep=False)
            raise EmdpoError(
                f"{desc or 'fit'}: all {steps} optimiser step(s) would run at learning rate 0 under "
                f"model.train.lr_scheduler={sched_name!r} with {warmup} warm-up step(s) "
                f"(model.train.lr_warmup_steps={tr.lr_warmup_steps}, model.train.lr={tr.lr}); "
                "lower lr_warmup_steps or give the fit more steps (batch_size, epochs, seed_steps)")
        epochs_run = micro / len(loader)
        trainer = WeightedDPOTrainer(actor, self.strategy, self.tokenizer, optim, loader, scheduler,
                                     beta=self.beta, label_smoothing=self.label_smoothing,
                                     mean_weight=float(w.mean()), max_epochs=math.ceil(epochs_run),
                                     max_norm=tr.max_norm, nll_loss_coef=self.cfg.nll_loss_coef,
                                     max_micro_batches=micro)
        torch.manual_seed(fit_seed(tr.seed, desc, keep, w, micro, start))
        t_train = time.perf_counter()
        stats = trainer.fit(self.args, desc=desc or "M-step")
        self.stats["train_seconds"] += time.perf_counter() - t_train
        policy.state = self._snapshot()
        t_engine = time.perf_counter()
        policy.optim = self.engine.end(keep=self.carry_optimizer_state)
        engine_s += time.perf_counter() - t_engine
        self.stats["engine_seconds"] += engine_s
        row_ll = None
        if schedule.return_row_ll and world == 1:  # under a launcher each rank saw a share of the rows: EM scores them instead
            row_ll = np.full(len(data), np.nan)
            row_ll[keep] = trainer.row_ll
        inner = getattr(optim, "optimizer", optim)  # DeepSpeed's wrapper (ZeRO) holds the torch optimiser
        lr_info = {"scheduler": sched_name, "optimizer": type(inner).__name__, "warmup_steps": warmup}
        if lrs is not None:
            lr_info.update(mean=float(np.mean(lrs)), zero_steps=int(sum(v <= 0 for v in lrs)))
        del trainer, actor, optim, scheduler
        n_tokens = epochs_run * sum(r.input_ids.shape[1] for row in tokens for r in row)  # real (unpadded) tokens
        return {**stats, "rows": int(len(keep)), "epochs": epochs_run, "optimizer_steps": steps,
                "lr": lr_info, "tokens": int(n_tokens), "seconds": time.perf_counter() - t,
                "engine_seconds": engine_s, **({"row_ll": row_ll} if row_ll is not None else {})}

    @torch.no_grad()
    def sample(self, policy: LMPolicy, prompts: list[str], n: int, seed: int) -> list[list[str]]:
        """n completions per prompt with HF generate; under a launcher each rank samples a share."""
        self._activate(policy)
        self.module.eval()
        g = self.cfg.generation
        tok = self.tokenizer
        torch.manual_seed(seed + dist.rank())
        all_prompts = prompts
        mine_idx, prompts = dist.shard(all_prompts)
        out: list[list[str]] = []
        bs = max(1, self.cfg.eval_batch_size // n)
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            for s in tqdm(range(0, len(prompts), bs), desc="sample", leave=False, disable=not dist.is_driver()):
                rendered = [render_prompt(tok, p) for p in prompts[s: s + bs]]
                enc = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                gen = self.module.generate(**enc, do_sample=True, temperature=g.temperature, top_p=g.top_p,
                                           max_new_tokens=g.max_new_tokens, num_return_sequences=n,
                                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
                texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                out.extend(texts[i * n:(i + 1) * n] for i in range(len(texts) // n))
        finally:
            tok.padding_side = side
        return dist.gather(mine_idx, out, len(all_prompts))

    def sample_vllm(self, dirs: dict[str, Path], prompts: list[str], n: int, seed: int, *,
                    log_path: Path) -> dict[str, list[list[str]]]:
        """Like `sample`, for every saved policy at once, on vLLM's offline engine (vllm_sampler.py)."""
        from .vllm_sampler import sample_with_vllm

        g = self.cfg.generation
        offload = g.vllm_offload_training_model and self.device.type == "cuda"
        if offload:
            self.module.to("cpu")
            torch.cuda.empty_cache()
        try:
            rendered = [render_prompt(self.tokenizer, p) for p in prompts]
            return sample_with_vllm(self.base_model, dirs, self.adapter_type, rendered, n, seed,
                                    max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                    max_model_len=self.cfg.max_len + g.max_new_tokens, log_path=log_path,
                                    gpu_memory_utilization=g.vllm_gpu_memory_utilization)
        finally:
            if offload:
                self.module.to(self.device)

    def sample_prompts(self, n: int, seed: int) -> list[str]:
        raise EmdpoError("language-model backends draw regret prompts from the data: give the "
                         "minmax_ensemble stage `inputs: {dataset: <data stage>}`")

    def save(self, policy: LMPolicy, path: Path) -> None:
        """A PEFT adapter folder (LoRA) or a save_pretrained model folder (full fine-tuning)."""
        self._activate(policy)
        path.mkdir(parents=True, exist_ok=True)
        self.module.save_pretrained(path)
        if not self.lora:
            self.tokenizer.save_pretrained(path)

    def save_training_state(self, policy: LMPolicy, path: Path) -> None:
        """The policy's carried optimiser state as `optimizer.pt` in its saved folder."""
        if policy.optim is not None and dist.rank() == 0:
            torch.save(policy.optim, path / STATE_FILE)

    def load(self, path: Path) -> LMPolicy:
        from safetensors.torch import load_file

        optim = self._load_optimizer_state(path)
        if self.lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.module, load_file(str(path / "adapter_model.safetensors")))
            return LMPolicy(self._snapshot(), optim)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise EmdpoError(f"{path}: no *.safetensors model files")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for n in self.trainable:
                params[n].copy_(state[n])
        return LMPolicy(self._snapshot(), optim)

    def _load_optimizer_state(self, path: Path) -> dict[str, Any] | None:
        """`optimizer.pt` of a saved policy, when this backend carries optimiser state (tensors and
        plain values only: loaded with `weights_only`)."""
        file = path / STATE_FILE
        if not self.carry_optimizer_state or not file.exists():
            return None
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise EmdpoError(f"{file}: not a saved optimiser state ({type(e).__name__}: {e}); delete it to "
                             "train on with a fresh optimiser state") from None
        if not isinstance(state, dict) or not {"shapes", "master", "state", "group_steps"} <= set(state):
            raise EmdpoError(f"{file}: expected keys shapes, master, state, group_steps")
        return state
