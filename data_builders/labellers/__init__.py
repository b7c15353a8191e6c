"""Automatic labellers for the synthetic preference data (paper appendix F.1).

Two kinds of labeller sit behind one small interface:

- `Labeller` (pointwise): `score(texts, contexts=None) -> np.ndarray`, one float per text,
  higher = better for its group. `contexts` (optional, one per text) is the prompt the text
  continues; engines that need it (grammar) check `context + text` and count only what falls
  in `text`.
- `PairwiseLabeller`: `compare(prompts, first, second) -> np.ndarray` of +1 (first better),
  -1 (second better) or 0 (no preference), for engines that judge pairs (an LLM judge).

Both carry `kind` (the group they label: "grammar" or "sentiment"), `name` (the engine) and
`version`, and `info()` (what goes into the dataset manifest). `make_labeller(kind, engine,
**opts)` builds one; `score_items` turns either kind into per-item score vectors with every
distinct (prompt, completion) labelled once.

Engines:

| kind | engine | runs offline | score |
|---|---|---|---|
| grammar | `harper` (default) | yes (harper-py) | -(grammar-like lints / characters) |
| grammar | `languagetool` | with a local LanguageTool install or `server_url` | -(matches / characters) |
| grammar | `llm_judge` | needs an OpenAI-compatible endpoint | pairwise |
| sentiment | `vader` (default) | yes (vaderSentiment) | VADER compound in [-1, 1] |
| sentiment | `hf` | with a local/cached model | sum_label p(label) * valence(label) |
| sentiment | `llm_judge` | needs an OpenAI-compatible endpoint | pairwise |

An engine that cannot run raises `EmdpoError` naming the reason and the fix; nothing ever
falls back to another engine silently.

One module per engine (harper, languagetool, vader, hf_sentiment, llm_judge) over `base`
(the interfaces and shared helpers); this module is the factory and re-exports them all.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from emdpo_plugin.errors import EmdpoError

from .base import (
    KINDS,
    Labeller,
    PairwiseLabeller,
    errors_per_char_score,
    is_pairwise,
    package_version,
    strip_markup,
    text_length,
)
from .harper import HARPER_GRAMMAR_KINDS, HarperGrammar
from .hf_sentiment import HFSentiment, label_valence
from .languagetool import LanguageToolGrammar
from .llm_judge import LLMJudge
from .vader import VaderSentiment

__all__ = [
    "DEFAULT_ENGINES", "ENGINES", "HARPER_GRAMMAR_KINDS", "KINDS", "HFSentiment", "HarperGrammar", "LLMJudge",
    "LanguageToolGrammar", "Labeller", "PairwiseLabeller", "VaderSentiment", "errors_per_char_score",
    "is_pairwise", "label_valence", "make_labeller", "package_version", "score_items", "strip_markup",
    "text_length",
]


# --------------------------------------------------------------------------- factory


def _grammar_judge(**opts: Any) -> LLMJudge:
    return LLMJudge("grammar", **opts)


def _sentiment_judge(**opts: Any) -> LLMJudge:
    return LLMJudge("sentiment", **opts)


ENGINES: dict[str, dict[str, Callable[..., Any]]] = {
    "grammar": {"harper": HarperGrammar, "languagetool": LanguageToolGrammar, "llm_judge": _grammar_judge},
    "sentiment": {"vader": VaderSentiment, "hf": HFSentiment, "llm_judge": _sentiment_judge},
}
DEFAULT_ENGINES = {"grammar": "harper", "sentiment": "vader"}


def _accepted(factory: Callable[..., Any]) -> list[str]:
    target = LLMJudge.__init__ if factory in (_grammar_judge, _sentiment_judge) else factory
    params = inspect.signature(target).parameters
    return [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]


def make_labeller(kind: str, engine: str | None = None, **opts: Any) -> Any:
    """A `Labeller` (or `PairwiseLabeller` for `llm_judge`) for `kind` built with `engine`.

    Options an engine does not take are an error naming the options it does take.
    """
    if kind not in ENGINES:
        raise EmdpoError(f"unknown labeller kind {kind!r} (known: {', '.join(ENGINES)})")
    engine = engine or DEFAULT_ENGINES[kind]
    engines = ENGINES[kind]
    if engine not in engines:
        raise EmdpoError(f"unknown {kind} engine {engine!r} (known: {', '.join(engines)})")
    factory = engines[engine]
    accepted = _accepted(factory)
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise EmdpoError(
            f"{kind} engine {engine!r} does not take option(s) {', '.join(unknown)} "
            f"(it takes: {', '.join(accepted) or 'none'})"
        )
    return factory(**opts)


# --------------------------------------------------------------------------- per-item scores


def score_items(
    labeller: Any,
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    *,
    progress: bool | None = False,
    desc: str | None = None,
    chunk: int = 512,
) -> list[np.ndarray]:
    """One score vector per item (higher = better), each distinct text labelled once.

    A pointwise labeller scores every distinct (prompt, response) once (cached by content).
    A pairwise labeller judges every pair of an item's responses and scores each response by
    its Copeland score (wins - losses), so ties show up as equal scores. `progress`: show a
    bar (True), never (False), or only on a terminal (None).
    """
    from tqdm.auto import tqdm

    desc = desc or f"labelling ({labeller.kind}: {labeller.name})"
    if is_pairwise(labeller):
        keys: dict[tuple[str, str, str], int] = {}
        for p, rs in zip(prompts, responses):
            for i in range(len(rs)):
                for j in range(i + 1, len(rs)):
                    keys.setdefault((p, rs[i], rs[j]), len(keys))
        triples = list(keys)
        verdicts = np.zeros(len(triples), dtype=np.int64)
        bar = tqdm(total=len(triples), desc=desc, unit="pair", disable=None if progress is None else not progress)
        for s in range(0, len(triples), chunk):
            part = triples[s : s + chunk]
            verdicts[s : s + len(part)] = labeller.compare([t[0] for t in part], [t[1] for t in part], [t[2] for t in part])
            bar.update(len(part))
        bar.close()
        out = []
        for p, rs in zip(prompts, responses):
            sc = np.zeros(len(rs), dtype=np.float64)
            for i in range(len(rs)):
                for j in range(i + 1, len(rs)):
                    v = verdicts[keys[(p, rs[i], rs[j])]]
                    sc[i] += v
                    sc[j] -= v
            out.append(sc)
        return out

    index: dict[tuple[str, str], int] = {}
    for p, rs in zip(prompts, responses):
        for r in rs:
            index.setdefault((p, r), len(index))
    pairs = list(index)
    scores = np.empty(len(pairs), dtype=np.float64)
    bar = tqdm(total=len(pairs), desc=desc, unit="text", disable=None if progress is None else not progress)
    for s in range(0, len(pairs), chunk):
        part = pairs[s : s + chunk]
        scores[s : s + len(part)] = labeller.score([t[1] for t in part], [t[0] for t in part])
        bar.update(len(part))
    bar.close()
    return [np.array([scores[index[(p, r)]] for r in rs], dtype=np.float64) for p, rs in zip(prompts, responses)]
