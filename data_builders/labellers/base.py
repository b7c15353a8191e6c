"""What every labeller shares: the two interfaces, text clean-up and small helpers."""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

import numpy as np

from emdpo_plugin.errors import EmdpoError

KINDS = ("grammar", "sentiment")

_MARKUP = re.compile(r"<\s*br\s*/?\s*>|<\s*/?\s*[a-zA-Z][^<>]{0,40}>")


def strip_markup(text: str, *, keep_offsets: bool = False) -> str:
    """Remove HTML-ish markup such as `<br />` (IMDb reviews are full of it).

    With `keep_offsets`, each tag becomes a newline padded with spaces to the tag's length, so
    character offsets into the text stay valid.
    """
    if keep_offsets:
        return _MARKUP.sub(lambda m: "\n" + " " * (len(m.group(0)) - 1), text)
    return re.sub(r"[ \t]+", " ", _MARKUP.sub(" ", text)).strip()


def text_length(text: str) -> int:
    """Characters used to normalise error counts: markup removed, whitespace runs as one, >= 1."""
    return max(1, len(re.sub(r"\s+", " ", strip_markup(text)).strip()))


def package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def import_engine(module: str, message: str) -> Any:
    """An engine's optional package; when missing, an EmdpoError from `message` (with `{exc}`) says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EmdpoError(message.format(exc=exc)) from None


def errors_per_char_score(counts: np.ndarray, texts: list[str]) -> np.ndarray:
    """The paper's grammar score (appendix F.1): minus errors per character, higher is better."""
    return -counts / np.array([text_length(t) for t in texts], dtype=np.float64)


class GrammarEngine:
    """A grammar engine counts errors in each completion; every one scores them the paper's way."""

    kind = "grammar"

    def count_errors(self, texts: list[str], contexts: list[str] | None = None) -> np.ndarray:
        raise NotImplementedError

    def score(self, texts: list[str], contexts: list[str] | None = None) -> np.ndarray:
        return errors_per_char_score(self.count_errors(texts, contexts), texts)


@runtime_checkable
class Labeller(Protocol):
    kind: str
    name: str
    version: str

    def score(self, texts: list[str], contexts: list[str] | None = None) -> np.ndarray: ...

    def info(self) -> dict[str, Any]: ...


@runtime_checkable
class PairwiseLabeller(Protocol):
    kind: str
    name: str
    version: str

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> np.ndarray: ...

    def info(self) -> dict[str, Any]: ...


def is_pairwise(labeller: Any) -> bool:
    return hasattr(labeller, "compare") and not hasattr(labeller, "score")


def join_context(context: str | None, text: str) -> tuple[str, int]:
    """The checked text and where `text` starts in it (the completion continues the prompt)."""
    if not context:
        return text, 0
    return context + text, len(context)


def check_contexts(texts: Sequence[str], contexts: Sequence[str] | None) -> list[str | None]:
    if contexts is None:
        return [None] * len(texts)
    if len(contexts) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(contexts)} contexts")
    return list(contexts)


def map_threads(fn: Callable[[Any], Any], items: list[Any], workers: int) -> list[Any]:
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
