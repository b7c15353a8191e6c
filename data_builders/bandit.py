"""The paper's contextual bandit (section 5.1), as format-v1 comparisons.

The environment itself (config, true rewards) is `emdpo_plugin.envs.bandit`: backends rebuild it
from the manifest at run time. This module draws annotators, contexts and labels from it.

Three arms; context x ~ U[0,1]^3; group i's reward r_i(y, x) = x . theta_i(y) + N(0, sigma)
with theta_i(i) = [10, 10, 10] and 0 for the other arms. Annotators are drawn from the groups
with probabilities 0.6 / 0.3 / 0.1 and label 10 pairs each; the reference policy is uniform.

Choices the paper leaves open, made here:
- A pair is two *distinct* arms drawn uniformly (a pair repeating an arm carries no preference).
- The annotator prefers the arm with the larger noisy reward, noise drawn per response.
- Groups are drawn i.i.d. per annotator (so counts vary around 120/60/20 for 200 annotators).
- The test split labels every test context by every group (one row per group), for
  per-group accuracy and margin. The val split (`val_contexts`, default `test_contexts`) is
  built the same way from fresh contexts drawn after the test ones, so train and test are the
  same as without it; hyperparameters are chosen on val, test is read only by the report.
Prompts carry the context as a JSON list, responses are `arm0`, `arm1`, ...

Options beyond the paper's section 5.1 (defaults reproduce it exactly):
- `responses_per_comparison: n` (default 2): each comparison shows n distinct arms in random
  order and records the annotator's full ranking by noisy reward, best first (n = 3 with 3 arms
  ranks every arm; the Plackett-Luce likelihood consumes these rows).
- `group_rankings`: each group's reward order, best first, instead of "group i prefers arm i":
  the arm at position j gets `theta_scale * (1 - j / (arms - 1))` (10 / 5 / 0 for three arms),
  arms not listed get 0. `[[0], [1], [2]]` is the default. Full orders make the groups' rankings
  differ below the top, which is what the later identifiability result needs (see
  recipes/bandit_ternary.yaml).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from emdpo_plugin.data.builders import BuiltDataset
from emdpo_plugin.data.schema import Comparison
from emdpo_plugin.envs.bandit import ENVIRONMENT, BanditConfig, BanditEnvironment, group_name


# Options added after the paper's setup: left out of the recorded config while at their default,
# so manifests of existing configs stay byte-identical.
_OPTIONAL_DEFAULTS = {"responses_per_comparison": 2, "group_rankings": None, "val_contexts": None}


def recorded_config(cfg: BanditConfig) -> dict[str, Any]:
    out = cfg.model_dump()
    for key, default in _OPTIONAL_DEFAULTS.items():
        if out[key] == default:
            del out[key]
    return out


def arm_name(i: int) -> str:
    return f"arm{i}"


def encode_context(x: np.ndarray) -> str:
    return json.dumps([float(v) for v in x])


def build(config: dict[str, Any], *, seed: int) -> BuiltDataset:
    cfg = BanditConfig.model_validate(config)
    env = BanditEnvironment(cfg)
    rng = np.random.default_rng(seed)
    probs = np.asarray(cfg.group_probs) / np.sum(cfg.group_probs)
    groups = rng.choice(len(probs), size=cfg.annotators, p=probs)

    n = cfg.responses_per_comparison

    def label(group: int, x: np.ndarray, pair: np.ndarray) -> list[int]:
        noisy = env.mean_rewards(group, x[None])[0, pair] + rng.normal(0.0, cfg.noise_std, size=n)
        if n == 2:
            return [0, 1] if noisy[0] >= noisy[1] else [1, 0]
        return [int(i) for i in np.argsort(-noisy, kind="stable")]  # full ranking, best first

    train: list[Comparison] = []
    for a, g in enumerate(groups):
        for j in range(cfg.pairs_per_annotator):
            x = rng.uniform(0.0, 1.0, size=cfg.dim)
            pair = rng.choice(cfg.arms, size=n, replace=False)
            train.append(Comparison(
                annotator_id=f"a{a:04d}", prompt=encode_context(x),
                responses=[arm_name(i) for i in pair], ranking=label(g, x, pair),
                comparison_id=f"train-{a:04d}-{j:03d}", group=group_name(g), split="train"))
    def labelled_by_every_group(split: str, contexts: int) -> list[Comparison]:
        rows: list[Comparison] = []
        for t in range(contexts):
            x = rng.uniform(0.0, 1.0, size=cfg.dim)
            pair = rng.choice(cfg.arms, size=n, replace=False)
            for g in range(len(probs)):
                rows.append(Comparison(
                    annotator_id=f"{split}-{group_name(g)}", prompt=encode_context(x),
                    responses=[arm_name(i) for i in pair], ranking=label(g, x, pair),
                    comparison_id=f"{split}-{t:04d}-{group_name(g)}", group=group_name(g), split=split))
        return rows

    test = labelled_by_every_group("test", cfg.test_contexts)
    val_contexts = cfg.test_contexts if cfg.val_contexts is None else cfg.val_contexts
    val = labelled_by_every_group("val", val_contexts) if val_contexts else None
    # contexts are continuous draws: splits share no prompt (with probability 1, and checked on load)
    return BuiltDataset(train=train, test=test, val=val, config=recorded_config(cfg),
                        extra={"environment": ENVIRONMENT, "synthetic": True},
                        disjoint_prompts=("train", "val", "test"))


build.Config = BanditConfig  # validated at plan time: a typo in `data.config` fails `--dry-run`
