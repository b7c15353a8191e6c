"""`build()` as a sequence of named steps: pool, held-out splits, annotators and their draws,
labels and ties, rows, manifest extras.

Each random step draws from its own child of the seed (`SeedSequence.spawn`), so what one step
draws never depends on how much another drew.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from emdpo_plugin.data.builders import BuiltDataset
from emdpo_plugin.data.schema import Comparison
from emdpo_plugin.errors import EmdpoError

from ..labellers import is_pairwise, make_labeller, score_items
from .config import GROUPS, TIE_RULES, ImdbConfig, config_error, engine_options
from .item import Item
from .sources import load_items, progress_disabled

_OTHER = {"sentiment": "grammar", "grammar": "sentiment"}


@dataclass
class Splits:
    """Indices into the pool: held-out test and val items (distinct prompts), and the training pool."""

    test: list[int]
    val: list[int]
    pool: list[int]


@dataclass
class Annotators:
    counts: dict[str, int]  # annotators per group
    groups: np.ndarray  # each annotator's group
    draws: list[np.ndarray]  # the pool items each annotator labels
    width: int  # digits of the annotator ids


@dataclass
class Labelled:
    """The used items (those some row shows) with scores, rankings and how ties were broken.

    Lists are by position: item `i` of the pool is at `pos[i]`."""

    used: list[int]
    pos: dict[int, int]
    prompts: list[str]
    responses: list[list[str]]
    scores: dict[str, list[np.ndarray]]
    rankings: dict[str, list[list[int]]]
    tie_how: dict[str, list[str | None]]


def build(config: dict[str, Any], *, seed: int = 0) -> BuiltDataset:
    try:
        cfg = ImdbConfig.model_validate(config or {})
    except ValidationError as exc:
        raise config_error(exc) from None
    seed = cfg.seed if cfg.seed is not None else seed
    timings: dict[str, float] = {}
    s_corpus, s_split, s_groups, s_users, s_coin, s_order = np.random.SeedSequence(seed).spawn(6)
    # labellers first: an engine that cannot run fails before any long step
    t0 = time.perf_counter()
    labellers = make_labellers(cfg)
    timings["labeller_setup"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    items, source_info = load_items(cfg, seed=seed, corpus_seed=int(s_corpus.generate_state(1)[0]),
                                    progress=cfg.progress)
    timings["source"] = time.perf_counter() - t0

    splits = hold_out(cfg, items, s_split)
    annotators = assign_annotators(cfg, splits.pool, s_groups, s_users)
    used = sorted(set(np.concatenate(annotators.draws).tolist()) | set(splits.test) | set(splits.val))
    shuffle_responses(items, used, s_order)
    labelled = label(cfg, labellers, items, used, int(s_coin.generate_state(1)[0]), timings)

    t0 = time.perf_counter()
    train, tie_rows = train_rows(cfg, annotators, labelled)
    eval_groups = [g for g in GROUPS if g in annotators.counts]
    test = eval_rows("test", splits.test, labelled, eval_groups)
    val = eval_rows("val", splits.val, labelled, eval_groups) if cfg.n_val else None
    timings["rows"] = time.perf_counter() - t0

    resolved = cfg.model_dump(mode="json")
    resolved["val_size"] = cfg.n_val
    resolved["seed"] = seed
    labels = {kind: labellers[kind].info() for kind in ("grammar", "sentiment")}
    for kind in labels:
        labels[kind]["pairwise"] = is_pairwise(labellers[kind])
    extra = manifest_extra(cfg, source_info, splits, labelled, tie_rows, timings)
    return BuiltDataset(train=train, test=test, val=val, config=resolved, labels=labels, extra=extra,
                        disjoint_prompts=("train", "val", "test"))


build.Config = ImdbConfig  # validated at plan time: a typo in `data.config` fails `--dry-run`


# --------------------------------------------------------------------------- steps


def make_labellers(cfg: ImdbConfig) -> dict[str, Any]:
    return {kind: make_labeller(kind, gcfg.engine, **engine_options(cfg, kind))
            for kind, gcfg in (("grammar", cfg.grammar), ("sentiment", cfg.sentiment))}


def hold_out(cfg: ImdbConfig, items: list[Item], seed: np.random.SeedSequence) -> Splits:
    """Test, then val: items with distinct prompts; the training pool excludes all those prompts."""
    val_size = cfg.n_val
    perm = np.random.default_rng(seed).permutation(len(items))
    test_idx: list[int] = []
    val_idx: list[int] = []
    held_prompts: set[str] = set()
    for i in perm:
        if len(test_idx) == cfg.test_size and len(val_idx) == val_size:
            break
        if items[i].prompt not in held_prompts:
            held_prompts.add(items[i].prompt)
            (test_idx if len(test_idx) < cfg.test_size else val_idx).append(int(i))
    if len(test_idx) + len(val_idx) < cfg.test_size + val_size:
        raise EmdpoError(f"test_size={cfg.test_size} + val_size={val_size} distinct prompts are held out, but the "
                         f"source has only {len(held_prompts)} distinct prompts")
    pool_idx = [int(i) for i in np.sort(perm) if items[i].prompt not in held_prompts]
    if len(pool_idx) < cfg.pairs_per_user:
        raise EmdpoError(
            f"pairs_per_user={cfg.pairs_per_user} distinct items per user, but the training pool holds only "
            f"{len(pool_idx)} items after {len(test_idx)} test and {len(val_idx)} val prompts are held out"
        )
    return Splits(test_idx, val_idx, pool_idx)


def group_counts(users: int, fractions: dict[str, float]) -> dict[str, int]:
    """Exact annotator counts per group by largest remainder (2/3, 1/3 of 1200 -> 800, 400)."""
    total = sum(fractions.values())
    raw = {g: users * f / total for g, f in fractions.items()}
    counts = {g: int(math.floor(r + 1e-9)) for g, r in raw.items()}
    left = users - sum(counts.values())
    for g in sorted(raw, key=lambda g: (-(raw[g] - counts[g]), g))[:left]:
        counts[g] += 1
    return counts


def assign_annotators(cfg: ImdbConfig, pool_idx: list[int], s_groups: np.random.SeedSequence,
                      s_users: np.random.SeedSequence) -> Annotators:
    """Each annotator's group (exact counts, shuffled) and `pairs_per_user` distinct pool items."""
    counts = group_counts(cfg.users, cfg.groups)
    groups = np.array([g for g in counts for _ in range(counts[g])], dtype=object)
    groups = groups[np.random.default_rng(s_groups).permutation(cfg.users)]
    urng = np.random.default_rng(s_users)
    pool_arr = np.asarray(pool_idx)
    draws = [pool_arr[urng.choice(len(pool_arr), size=cfg.pairs_per_user, replace=False)] for _ in range(cfg.users)]
    return Annotators(counts, groups, draws, max(4, len(str(cfg.users - 1))))


def shuffle_responses(items: list[Item], used: list[int], seed: np.random.SeedSequence) -> None:
    """Shuffle each used item's responses once, so index 0 is not the source's "chosen"."""
    rng = np.random.default_rng(seed)
    for i in used:
        p = rng.permutation(len(items[i].responses))
        items[i] = Item(items[i].prompt, [items[i].responses[j] for j in p], items[i].meta)


def label(cfg: ImdbConfig, labellers: dict[str, Any], items: list[Item], used: list[int], coin_seed: int,
          timings: dict[str, float]) -> Labelled:
    """Score the used items under both criteria and rank them per group, ties broken by `tie_break`."""
    t0 = time.perf_counter()
    prompts = [items[i].prompt for i in used]
    responses = [items[i].responses for i in used]
    scores: dict[str, list[np.ndarray]] = {}
    for kind in ("grammar", "sentiment"):
        t1 = time.perf_counter()
        scores[kind] = score_items(labellers[kind], prompts, responses, progress=cfg.progress)
        timings[f"label_{kind}"] = time.perf_counter() - t1
    timings["labelling"] = time.perf_counter() - t0

    rankings: dict[str, list[list[int]]] = {g: [] for g in GROUPS}
    tie_how: dict[str, list[str | None]] = {g: [] for g in GROUPS}
    for k, item in enumerate(used):
        coin = np.random.default_rng([coin_seed, item]).random(len(responses[k]))
        for g in GROUPS:
            secondary = scores[_OTHER[g]][k] if cfg.tie_break == "other_then_coin" else None
            ranking, how = rank_with_ties(scores[g][k], secondary, coin)
            rankings[g].append(ranking)
            tie_how[g].append(how)
    pos = {item: k for k, item in enumerate(used)}
    return Labelled(used, pos, prompts, responses, scores, rankings, tie_how)


def rank_with_ties(primary: np.ndarray, secondary: np.ndarray | None, coin: np.ndarray) -> tuple[list[int], str | None]:
    """Ranking (best first) by primary, then secondary, then coin; and how ties were broken.

    Returns (ranking, None) without ties, else "other" when the secondary score separates all
    tied responses and "coin" when the coin was needed.
    """
    keys = [-coin] if secondary is None else [-coin, -secondary]
    order = np.lexsort((*keys, -primary))
    _, counts = np.unique(primary, return_counts=True)
    if counts.max() <= 1:
        return [int(i) for i in order], None
    how = "other"
    if secondary is None:
        how = "coin"
    else:
        for value in np.unique(primary):
            idx = np.flatnonzero(primary == value)
            if len(idx) > 1 and len(np.unique(secondary[idx])) < len(idx):
                how = "coin"
    return [int(i) for i in order], how


def train_rows(cfg: ImdbConfig, annotators: Annotators, lab: Labelled) -> tuple[list[Comparison], dict[str, int]]:
    """Every annotator's rows, labelled by its group; and how many rows per group had a tie."""
    from tqdm.auto import tqdm

    train: list[Comparison] = []
    tie_rows = {g: 0 for g in annotators.counts}
    for u in tqdm(range(cfg.users), desc="building rows", unit="user", disable=progress_disabled(cfg.progress)):
        g = str(annotators.groups[u])
        uid = f"u{u:0{annotators.width}d}"
        for j, i in enumerate(annotators.draws[u]):
            k = lab.pos[int(i)]
            tie_rows[g] += lab.tie_how[g][k] is not None
            train.append(Comparison(
                annotator_id=uid, prompt=lab.prompts[k], responses=list(lab.responses[k]), ranking=lab.rankings[g][k],
                comparison_id=f"train-{uid}-{j:03d}", group=g, split="train"))
    return train, tie_rows


def eval_rows(split: str, idx: list[int], lab: Labelled, groups: list[str]) -> list[Comparison]:
    """Each held-out item once per group, by annotator `<split>-<group>`."""
    rows: list[Comparison] = []
    for t, i in enumerate(idx):
        k = lab.pos[i]
        for g in groups:
            rows.append(Comparison(
                annotator_id=f"{split}-{g}", prompt=lab.prompts[k], responses=list(lab.responses[k]),
                ranking=lab.rankings[g][k], comparison_id=f"{split}-{t:04d}-{g}", group=g, split=split))
    return rows


# --------------------------------------------------------------------------- manifest extras


def manifest_extra(cfg: ImdbConfig, source_info: dict[str, Any], splits: Splits, lab: Labelled,
                   tie_rows: dict[str, int], timings: dict[str, float]) -> dict[str, Any]:
    """What the manifest reports beyond the rows: source, ties, how often the groups disagree, score stats."""
    test_pos = [lab.pos[i] for i in splits.test]
    val_pos = [lab.pos[i] for i in splits.val]
    held = set(splits.test) | set(splits.val)
    train_pos = [lab.pos[i] for i in lab.used if i not in held]
    source_info.update({"pool_items": len(splits.pool), "test_items": len(splits.test),
                        "val_items": len(splits.val), "used_items": len(lab.used)})
    return {
        "synthetic": {"labels": True, "text": bool(source_info.get("synthetic"))},
        "source": source_info,
        "ties": {
            "rule": TIE_RULES[cfg.tie_break],
            "train_items": _tie_summary(lab, train_pos),
            "test_items": _tie_summary(lab, test_pos),
            "val_items": _tie_summary(lab, val_pos),
            "train_rows": tie_rows,
        },
        "disagreement": {"test": _disagreement(lab, test_pos), "val": _disagreement(lab, val_pos),
                         "train_items": _disagreement(lab, train_pos)},
        "label_stats": {kind: _score_stats(lab.scores[kind]) for kind in lab.scores},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def _tie_summary(lab: Labelled, positions: list[int]) -> dict[str, dict[str, int]]:
    out = {}
    for g in GROUPS:
        hows = [lab.tie_how[g][k] for k in positions]
        out[g] = {"tied_items": sum(h is not None for h in hows),
                  "broken_by_other": sum(h == "other" for h in hows),
                  "broken_by_coin": sum(h == "coin" for h in hows)}
    return out


def _disagreement(lab: Labelled, positions: list[int]) -> dict[str, float]:
    if not positions:
        return {"full_ranking": 0.0, "top1": 0.0}
    full = np.mean([lab.rankings["sentiment"][k] != lab.rankings["grammar"][k] for k in positions])
    top1 = np.mean([lab.rankings["sentiment"][k][0] != lab.rankings["grammar"][k][0] for k in positions])
    return {"full_ranking": float(full), "top1": float(top1)}


def _score_stats(scores: list[np.ndarray]) -> dict[str, float]:
    flat = np.concatenate(scores) if scores else np.zeros(0)
    if flat.size == 0:
        return {}
    return {"mean": float(flat.mean()), "min": float(flat.min()), "max": float(flat.max()),
            "share_zero": float(np.mean(flat == 0))}
