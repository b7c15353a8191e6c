"""PolicyBackend for the paper's contextual bandit (section 5.1): a small torch MLP per type.

Policies map a context to a softmax over arms; the reference is uniform, and every new policy
starts exactly at the reference (zero output layer). `fit` is full-batch Adam on the weighted
Plackett-Luce/DPO loss and keeps the best iterate it saw (the EM loop's generalised-EM guard
then keeps the log-likelihood monotone).
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..algorithms.likelihood import comparison_loglik
from ..config import StrictModel
from ..data.schema import ComparisonSet
from ..envs import bandit as bandit_env
from ..errors import EmdpoError
from .base import FitSchedule


class BanditModelConfig(StrictModel):
    """The `model:` section of `backend: bandit` (paper section 5.1, Table 1)."""

    arms: int = Field(3, description="arms (responses) per context (paper: 3)")
    context_dim: int = Field(3, description="context dimension; contexts are uniform on [0, 1]^d (paper: 3)")
    hidden_size: int = Field(10, description="MLP width (paper: 10)")
    layers: int = Field(3, description="linear layers of the MLP (paper: 3)")
    beta: float = Field(1.0, description="DPO beta (paper: 1)")
    label_smoothing: float = Field(0.0, description="conservative DPO epsilon (OpenRLHF's label_smoothing); 0: plain "
                                                    "DPO (recipes/bandit.yaml: 0.01)")
    lr: float = Field(0.01, description="Adam learning rate (paper: 0.01)")
    epochs: int = Field(1000, description="full-batch Adam steps per fit from the reference (paper Table 1: max epochs 1000)")
    warm_epochs: int = Field(200, description="steps per warm-started fit (EM iterations after the first)")


def _mlp(cfg: BanditModelConfig) -> nn.Sequential:
    dims = [cfg.context_dim] + [cfg.hidden_size] * (cfg.layers - 1) + [cfg.arms]
    mods: list[nn.Module] = []
    for i in range(len(dims) - 1):
        mods.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            mods.append(nn.ReLU())
    last = mods[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*mods)


class BanditBackend:
    """Implements the PolicyBackend verbs for the bandit; see backends/base.py.

    Capabilities: SupportsExactExpectation (`probs`, `exact_L`) and SupportsExactRegret.
    """

    Config = BanditModelConfig

    def __init__(self, config: dict[str, Any] | None = None, *, seed: int = 0, run_dir: Path | None = None) -> None:
        self.cfg = BanditModelConfig.model_validate(config or {})
        self.beta = self.cfg.beta
        self.label_smoothing = self.cfg.label_smoothing
        self.seed = seed
        self.stats: dict[str, float] = {}  # nothing worth counting: no reference cache, no tokenizer
        self._encoding: tuple[weakref.ref, tuple[torch.Tensor, ...]] | None = None
        torch.set_num_threads(1)  # tiny MLP: threads cost more than they give

    # --- encoding -------------------------------------------------------------------------
    def _contexts(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([json.loads(p) for p in prompts], dtype=torch.float32)

    def _arms(self, responses: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in responses)
        idx = torch.zeros(len(responses), width, dtype=torch.long)
        mask = torch.zeros(len(responses), width, dtype=torch.bool)
        for i, row in enumerate(responses):
            idx[i, : len(row)] = torch.tensor([int(a.removeprefix("arm")) for a in row])
            mask[i, : len(row)] = True
        return idx, mask

    def _encoded(self, data: ComparisonSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Contexts, arm indices, response mask and rankings of a comparison set, parsed once.

        EM fits every type on the same set every iteration; re-parsing 2,000 JSON prompts per fit
        would be a per-row Python loop inside the M-step. Holds the last set only (weakly).
        """
        cached = self._encoding
        if cached is not None and cached[0]() is data:
            return cached[1]
        idx, mask = self._arms(data.responses)
        enc = (self._contexts(data.prompts), idx, mask, torch.as_tensor(data.rankings))
        self._encoding = (weakref.ref(data), enc)
        return enc

    def _logprobs(self, policy: nn.Module, ctx: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(policy(ctx).double(), dim=-1).gather(1, idx)

    def probs(self, policy: nn.Module, contexts: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(policy(torch.as_tensor(contexts, dtype=torch.float32)).double(), -1).numpy()

    # --- PolicyBackend verbs --------------------------------------------------------------
    def new_policy(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return _mlp(self.cfg)

    def ref_score(self, data: ComparisonSet) -> np.ndarray:
        out = np.full((len(data), data.max_responses), np.nan)
        out[data.response_mask] = -np.log(self.cfg.arms)
        return out

    def score(self, policy: nn.Module | None, prompts: list[str], responses: list[list[str]]) -> np.ndarray:
        idx, mask = self._arms(responses)
        if policy is None:  # the uniform reference
            return np.where(mask.numpy(), -np.log(self.cfg.arms), np.nan)
        with torch.no_grad():
            s = self._logprobs(policy, self._contexts(prompts), idx).numpy()
        return np.where(mask.numpy(), s, np.nan)

    def fit(self, policy: nn.Module, data: ComparisonSet, weights: np.ndarray, *, warm: bool = True,
            desc: str = "", schedule: FitSchedule | None = None) -> dict[str, Any]:
        """Full-batch Adam at a constant lr: one step is one pass, so `schedule.steps` and
        `schedule.epochs` (rounded) both count steps; `constant_lr` changes nothing here."""
        if self.cfg.lr <= 0:
            raise EmdpoError(f"{desc or 'fit'}: model.lr={self.cfg.lr} would train at learning rate 0")
        keep = np.asarray(weights) > 0
        ctx, idx, mask, rankings = (t[torch.as_tensor(keep)] for t in self._encoded(data))
        w = torch.as_tensor(np.asarray(weights)[keep], dtype=torch.float32)
        loss_fn = self._loss_fn(policy, ctx, idx, mask, rankings, w)

        if not warm:  # restart from the reference with the full schedule
            policy.load_state_dict(self.new_policy(self.seed).state_dict())
        steps = self.cfg.warm_epochs if warm else self.cfg.epochs
        if schedule is not None and (schedule.steps or schedule.epochs):
            steps = schedule.steps or max(1, round(schedule.epochs))
        params = list(policy.parameters())
        best = [p.detach().clone() for p in params]
        best_loss = float("inf")
        opt = torch.optim.Adam(params, lr=self.cfg.lr, fused=True)  # one kernel per step, not per tensor
        for step in range(steps + 1):
            loss = loss_fn()
            value = loss.item()
            if value < best_loss:
                best_loss = value
                with torch.no_grad():
                    for b, p in zip(best, params):
                        b.copy_(p)
            if step == steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
        return {"loss": best_loss, "rows": int(keep.sum()), "steps": steps, "epochs": float(steps)}

    def _loss_fn(self, policy: nn.Sequential, ctx: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor,
                 rankings: torch.Tensor, w: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The weighted DPO/PL loss of `fit` as a closure over full-batch tensors.

        Why not `policy(ctx)`: Table 1's schedule is ~300k Adam steps (100 EM iterations x 3 types
        x 1000 epochs) and a step on 2,000 rows is dominated by per-op overhead, not arithmetic.
        Feature-major activations (hidden x rows) make MKL's small matmuls ~4x faster than
        row-major ones. For pairs against the uniform reference, `s_w - s_ref_w - (s_l - s_ref_l)`
        is the logit difference, so the softmax drops out and conservative DPO's
        `(1-eps) log sig(m) + eps log sig(-m)` is `log sig(m) - eps m`: the same likelihood as
        `comparison_loglik` (tested), in a third of the ops. Rankings over 3+ arms take the
        general Plackett-Luce path.
        """
        linears = [m for m in policy if isinstance(m, nn.Linear)]
        x_t = ctx.T.contiguous()
        w = w / w.sum().clamp_min(1e-12)
        beta, eps = self.beta, self.label_smoothing

        def logits_t() -> torch.Tensor:  # (arms, rows)
            h = x_t
            for i, lin in enumerate(linears):
                h = torch.addmm(lin.bias[:, None], lin.weight, h)
                if i < len(linears) - 1:
                    h = torch.relu(h)
            return h

        if idx.shape[1] == 2:
            winner = rankings[:, 0].long()
            sign = torch.zeros(self.cfg.arms, len(w))
            rows = torch.arange(len(w))
            sign[idx[rows, winner], rows] = 1.0
            sign[idx[rows, 1 - winner], rows] = -1.0
            return lambda: -(w @ self._pair_loglik(beta * (logits_t() * sign).sum(0), eps))

        ref = torch.full(idx.shape, -float(np.log(self.cfg.arms)), dtype=torch.float64)

        def general() -> torch.Tensor:
            s = torch.log_softmax(logits_t().T.double(), dim=-1).gather(1, idx)
            return -(w.double() @ comparison_loglik(s, ref, rankings, mask, beta, eps))

        return general

    @staticmethod
    def _pair_loglik(margin: torch.Tensor, eps: float) -> torch.Tensor:
        """Conservative DPO on a pair: `(1-eps) log sig(m) + eps log sig(-m) = log sig(m) - eps m`."""
        ll = torch.nn.functional.logsigmoid(margin)
        return ll - eps * margin if eps > 0 else ll

    def sample(self, policy: nn.Module, prompts: list[str], n: int, seed: int) -> list[list[str]]:
        rng = np.random.default_rng(seed)
        p = self.probs(policy, self._contexts(prompts).numpy())
        return [[f"arm{rng.choice(self.cfg.arms, p=row)}" for _ in range(n)] for row in p]

    def sample_prompts(self, n: int, seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        return [json.dumps([float(v) for v in x]) for x in rng.uniform(0, 1, size=(n, self.cfg.context_dim))]

    def save(self, policy: nn.Module, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(policy.state_dict(), path / "policy.pt")
        (path / "config.json").write_text(self.cfg.model_dump_json(indent=2))

    def load(self, path: Path) -> nn.Module:
        policy = _mlp(self.cfg)
        policy.load_state_dict(torch.load(path / "policy.pt", weights_only=True))
        return policy

    # --- exact evaluation -----------------------------------------------------------------
    def exact_L(self, policies: list[nn.Module], prompts: list[str]) -> np.ndarray:
        """The min-max stage's `L[z, z'] = E_{x, y ~ pi_z'}[log pi_z(y|x) - log pi_ref(y|x)]`, exactly in y.

        Why: a policy here is a softmax over a handful of arms, so the expectation over y is a
        sum over arms and sampling y would only add noise to a game whose answer is decided by
        differences between L's entries. x is averaged over the given prompts (the contexts are
        continuous). Returns (K, K) float64.
        """
        ctx = self._contexts(prompts)
        with torch.no_grad():
            logp = torch.stack([torch.log_softmax(p(ctx).double(), dim=-1) for p in policies])  # (K, n, arms)
        log_ratio = logp + np.log(self.cfg.arms)  # uniform reference
        return torch.einsum("jna,kna->kj", logp.exp(), log_ratio).numpy() / len(prompts)

    def regret_oracle(self, manifest: dict[str, Any]) -> Callable[[list[tuple[float, nn.Module]], str], float] | None:
        """Exact regret from the bandit's true rewards (None if the data was not built on the bandit)."""
        env = bandit_env.from_manifest(manifest)
        if env is None:
            return None
        contexts = np.random.default_rng(self.seed + 7).uniform(0, 1, size=(20_000, self.cfg.context_dim))

        def regret(mixture: list[tuple[float, nn.Module]], group: str) -> float:
            probs = sum(w * self.probs(p, contexts) for w, p in mixture)
            return env.regret(env.groups.index(group), contexts, probs, self.beta)

        return regret
