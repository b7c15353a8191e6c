"""Grammar by Harper (offline, no Java): the default grammar engine."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from emdpo_plugin.errors import EmdpoError

from .base import GrammarEngine, check_contexts, default_workers, import_engine, join_context, package_version, strip_markup

# Harper lint kinds counted as grammar errors. Left out on purpose: Spelling (names, titles and
# rare words in reviews), Style, Enhancement, Readability, Formatting (spacing) and Regionalism.
HARPER_GRAMMAR_KINDS = (
    "Agreement",
    "BoundaryError",
    "Capitalization",
    "Eggcorn",
    "Grammar",
    "Malapropism",
    "Miscellaneous",
    "Nonstandard",
    "Punctuation",
    "Redundancy",
    "Repetition",
    "Typo",
    "Usage",
    "WordChoice",
)


class HarperGrammar(GrammarEngine):
    """Offline grammar checking with harper-py (Rust; no Java, no downloads).

    Score = -(number of grammar-like lints in the completion) / (its length in characters),
    the paper's LanguageTool correctness score with Harper as the checker. Text is linted as
    plaintext after `<br />`-style markup is blanked out. A Linter is not thread-safe but
    releases the GIL, so `workers` threads each get their own.
    """

    name = "harper"

    def __init__(
        self,
        *,
        lint_kinds: Sequence[str] | None = None,
        dialect: str = "american",
        workers: int | None = None,
        context: bool = True,
    ) -> None:
        harper = import_engine("harper", "grammar engine 'harper' needs the harper-py package ({exc}); install it "
                                         "with `pip install harper-py` or choose grammar.engine=languagetool")
        self._harper = harper
        dialects = {d.name.lower(): d for d in harper.Dialect}
        if dialect.lower() not in dialects:
            raise EmdpoError(f"grammar engine 'harper': unknown dialect {dialect!r} (known: {', '.join(dialects)})")
        self._dialect = dialects[dialect.lower()]
        self.lint_kinds = tuple(lint_kinds) if lint_kinds is not None else HARPER_GRAMMAR_KINDS
        self.workers = workers or default_workers()
        self.use_context = context
        self.version = package_version("harper-py")
        # Harper's spell checker is about a third of its time and only yields Spelling lints:
        # off unless Spelling is counted (this also keeps its lints from hiding others in dedup).
        self.rules_off = () if "Spelling" in self.lint_kinds else ("SpellCheck",)
        self._local = threading.local()
        # one long-lived pool: its threads keep their Linter (building one takes about a second)
        self._pool: ThreadPoolExecutor | None = None

    def _linter(self) -> Any:
        linter = getattr(self._local, "linter", None)
        if linter is None:
            linter = self._harper.Linter(self._dialect)
            if self.rules_off:
                config = linter.get_lint_config()
                config.update({rule: False for rule in self.rules_off if rule in config})
                linter.set_lint_config(config)
            self._local.linter = linter
        return linter

    def lints(self, text: str) -> list[Any]:
        """Grammar-like lints of one text (markup blanked), for inspection and tests.

        Harper's own de-duplication is off (it is about 40% of the linting time); overlapping
        lints are merged when counting instead (`count_spans`).
        """
        wanted = set(self.lint_kinds)
        lints = self._linter().lint(strip_markup(text, keep_offsets=True), language="plaintext", dedup=False)
        return [lint for lint in lints if lint.lint_kind in wanted]

    @staticmethod
    def count_spans(spans: list[tuple[int, int]]) -> int:
        """Errors = groups of overlapping spans (two rules flagging the same words count once)."""
        n, end = 0, -1
        for a, b in sorted(spans):
            if a >= end:
                n += 1
                end = b
            else:
                end = max(end, b)
        return n

    def _count_one(self, pair: tuple[str | None, str]) -> int:
        context, text = pair
        full, start = join_context(context if self.use_context else None, text)
        return self.count_spans([(l.span.start, l.span.end) for l in self.lints(full) if l.span.end > start])

    def count_errors(self, texts: list[str], contexts: list[str] | None = None) -> np.ndarray:
        pairs = list(zip(check_contexts(texts, contexts), texts))
        chunks = [pairs[i : i + 64] for i in range(0, len(pairs), 64)]
        work = lambda chunk: [self._count_one(p) for p in chunk]  # noqa: E731
        if self.workers <= 1 or len(chunks) <= 1:
            counts = [work(chunk) for chunk in chunks]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="harper")
            counts = list(self._pool.map(work, chunks))
        return np.array([c for chunk in counts for c in chunk], dtype=np.int64)

    def info(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "version": self.version,
            "lint_kinds": list(self.lint_kinds),
            "rules_off": list(self.rules_off),
            "dialect": self._dialect.name.lower(),
            "context": self.use_context,
            "score": "-(grammar lints in the completion) / (completion characters)",
        }
