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
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from emdpo_plugin.errors import EmdpoError

KINDS = ("grammar", "sentiment")

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


# --------------------------------------------------------------------------- interface


def errors_per_char_score(counts: np.ndarray, texts: list[str]) -> np.ndarray:
    """The paper's grammar score (appendix F.1): minus errors per character, higher is better."""
    return -counts / np.array([text_length(t) for t in texts], dtype=np.float64)


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


def _join(context: str | None, text: str) -> tuple[str, int]:
    """The checked text and where `text` starts in it (the completion continues the prompt)."""
    if not context:
        return text, 0
    return context + text, len(context)


def _check_contexts(texts: Sequence[str], contexts: Sequence[str] | None) -> list[str | None]:
    if contexts is None:
        return [None] * len(texts)
    if len(contexts) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(contexts)} contexts")
    return list(contexts)


def _map_threads(fn: Callable[[Any], Any], items: list[Any], workers: int) -> list[Any]:
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# --------------------------------------------------------------------------- grammar: harper


class HarperGrammar:
    """Offline grammar checking with harper-py (Rust; no Java, no downloads).

    Score = -(number of grammar-like lints in the completion) / (its length in characters),
    the paper's LanguageTool correctness score with Harper as the checker. Text is linted as
    plaintext after `<br />`-style markup is blanked out. A Linter is not thread-safe but
    releases the GIL, so `workers` threads each get their own.
    """

    kind = "grammar"
    name = "harper"

    def __init__(
        self,
        *,
        lint_kinds: Sequence[str] | None = None,
        dialect: str = "american",
        workers: int | None = None,
        context: bool = True,
    ) -> None:
        try:
            import harper
        except ImportError as exc:
            raise EmdpoError(
                f"grammar engine 'harper' needs the harper-py package ({exc}); install it with "
                "`pip install harper-py` or choose grammar.engine=languagetool"
            ) from None
        self._harper = harper
        dialects = {d.name.lower(): d for d in harper.Dialect}
        if dialect.lower() not in dialects:
            raise EmdpoError(f"grammar engine 'harper': unknown dialect {dialect!r} (known: {', '.join(dialects)})")
        self._dialect = dialects[dialect.lower()]
        self.lint_kinds = tuple(lint_kinds) if lint_kinds is not None else HARPER_GRAMMAR_KINDS
        self.workers = workers or _default_workers()
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
        full, start = _join(context if self.use_context else None, text)
        return self.count_spans([(l.span.start, l.span.end) for l in self.lints(full) if l.span.end > start])

    def count_errors(self, texts: list[str], contexts: list[str] | None = None) -> np.ndarray:
        pairs = list(zip(_check_contexts(texts, contexts), texts))
        chunks = [pairs[i : i + 64] for i in range(0, len(pairs), 64)]
        work = lambda chunk: [self._count_one(p) for p in chunk]  # noqa: E731
        if self.workers <= 1 or len(chunks) <= 1:
            counts = [work(chunk) for chunk in chunks]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="harper")
            counts = list(self._pool.map(work, chunks))
        return np.array([c for chunk in counts for c in chunk], dtype=np.int64)

    def score(self, texts: list[str], contexts: list[str] | None = None) -> np.ndarray:
        return errors_per_char_score(self.count_errors(texts, contexts), texts)

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


# --------------------------------------------------------------------------- grammar: LanguageTool


def _languagetool_dir() -> Path:
    return Path(os.environ.get("LTP_PATH", str(Path.home() / ".cache" / "language_tool_python")))


def _installed_languagetool() -> str | None:
    """Version name of the newest local LanguageTool install, or None (never downloads)."""
    if os.environ.get("LTP_JAR_DIR_PATH"):
        return "jar-dir"
    folder = _languagetool_dir()
    if not folder.is_dir():
        return None
    names = sorted(p.name.removeprefix("LanguageTool-") for p in folder.glob("LanguageTool-*") if p.is_dir())
    return names[-1] if names else None


class LanguageToolGrammar:
    """Grammar checking with LanguageTool through language_tool_python, as in the paper.

    Either `server_url` (a running LanguageTool HTTP server: `POST /v2/check` with form fields
    `text` and `language`, JSON `matches` with `offset`/`length`), or a local install found
    under `$LTP_PATH/LanguageTool-<version>/` (Java needed). language_tool_python would
    download LanguageTool on first use; this adapter refuses instead and says how to install it.
    Score = -(matches in the completion) / (completion characters). `ignore_categories`
    (e.g. ["TYPOS"]) drops matches by `rule.category.id`.
    """

    kind = "grammar"
    name = "languagetool"

    def __init__(
        self,
        *,
        server_url: str | None = None,
        language: str = "en-US",
        ignore_categories: Sequence[str] = (),
        workers: int | None = None,
        context: bool = True,
    ) -> None:
        try:
            import language_tool_python
        except ImportError as exc:
            raise EmdpoError(
                f"grammar engine 'languagetool' needs language_tool_python ({exc}); "
                "install it with `pip install language_tool_python`"
            ) from None
        self.server_url = server_url
        self.language = language
        self.ignore_categories = tuple(ignore_categories)
        self.use_context = context
        # language_tool_python keeps per-class state while building matches: one thread by default.
        self.workers = workers or 1
        try:
            if server_url:
                self._tool = language_tool_python.LanguageTool(language, remote_server=server_url)
                lt_version = self._server_version(server_url)
            else:
                installed = _installed_languagetool()
                if installed is None:
                    raise EmdpoError(
                        f"grammar engine 'languagetool': no local LanguageTool install under {_languagetool_dir()} "
                        "(set LTP_PATH) and no grammar.server_url; language_tool_python would download it, "
                        "which this builder never does. Unzip LanguageTool-<version>.zip into that folder "
                        "(Java 17+ needed), or run a LanguageTool server and set grammar.server_url, or use "
                        "grammar.engine=harper (offline)"
                    )
                kwargs = {} if installed == "jar-dir" else {"language_tool_download_version": installed}
                self._tool = language_tool_python.LanguageTool(language, **kwargs)
                lt_version = installed
        except EmdpoError:
            raise
        except Exception as exc:  # library raises several types (LanguageToolError, PathError, OSError)
            where = f"server {server_url}" if server_url else "the local install"
            raise EmdpoError(f"grammar engine 'languagetool' cannot start with {where}: {exc}") from None
        self.version = f"LanguageTool {lt_version} (language_tool_python {package_version('language_tool_python')})"

    @staticmethod
    def _server_version(server_url: str) -> str:
        """`software.version` from one documented `/v2/check` call (also proves the server answers)."""
        url = urllib.parse.urljoin(server_url.rstrip("/") + "/", "v2/check")
        data = urllib.parse.urlencode({"text": "Hello.", "language": "en-US"}).encode()
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as resp:
            payload = json.loads(resp.read().decode("utf-8"))
        return str((payload.get("software") or {}).get("version", "unknown"))

    def _count_one(self, pair: tuple[str | None, str]) -> int:
        context, text = pair
        full, start = _join(context if self.use_context else None, text)
        try:
            matches = self._tool.check(strip_markup(full, keep_offsets=True))
        except Exception as exc:
            raise EmdpoError(f"grammar engine 'languagetool': check failed: {exc}") from None
        ignore = set(self.ignore_categories)
        return sum(
            1
            for m in matches
            if m.offset + max(m.error_length, 1) > start and getattr(m, "category", None) not in ignore
        )

    def count_errors(self, texts: list[str], contexts: list[str] | None = None) -> np.ndarray:
        pairs = list(zip(_check_contexts(texts, contexts), texts))
        return np.array(_map_threads(self._count_one, pairs, self.workers), dtype=np.int64)

    def score(self, texts: list[str], contexts: list[str] | None = None) -> np.ndarray:
        return errors_per_char_score(self.count_errors(texts, contexts), texts)

    def info(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "version": self.version,
            "server_url": self.server_url,
            "language": self.language,
            "ignore_categories": list(self.ignore_categories),
            "context": self.use_context,
            "score": "-(LanguageTool matches in the completion) / (completion characters)",
        }


# --------------------------------------------------------------------------- sentiment: VADER


class VaderSentiment:
    """Offline sentiment with vaderSentiment: the compound score in [-1, 1] of the completion."""

    kind = "sentiment"
    name = "vader"

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as exc:
            raise EmdpoError(
                f"sentiment engine 'vader' needs the vaderSentiment package ({exc}); "
                "install it with `pip install vaderSentiment`"
            ) from None
        self._analyzer = SentimentIntensityAnalyzer()
        self.version = package_version("vaderSentiment")

    def score(self, texts: list[str], contexts: list[str] | None = None) -> np.ndarray:
        _check_contexts(texts, contexts)  # the completion alone is scored
        return np.array([self._analyzer.polarity_scores(strip_markup(t))["compound"] for t in texts], dtype=np.float64)

    def info(self) -> dict[str, Any]:
        return {"engine": self.name, "version": self.version, "score": "VADER compound of the completion"}


# --------------------------------------------------------------------------- sentiment: HF classifier


def label_valence(label: str) -> float | None:
    """Valence of a classifier label: positive +1, negative -1, neutral 0, `N star(s)` on 1..5."""
    low = label.lower().strip()
    if "pos" in low:
        return 1.0
    if "neg" in low:
        return -1.0
    if "neu" in low:
        return 0.0
    stars = re.fullmatch(r"(\d)\s*stars?", low)
    if stars:
        return (int(stars.group(1)) - 3) / 2.0
    return None


class HFSentiment:
    """Sentiment from a Hugging Face text-classification model via `transformers.pipeline`.

    Score = sum over labels of p(label) * valence(label), valence from the label name
    (positive/negative/neutral, `N stars`) or `label_values` ({label: value}) for other names.
    The model must be a local folder or already in the HF cache: nothing is downloaded when
    `HF_HUB_OFFLINE=1`, and a failed load is an error, never a switch to another engine.
    """

    kind = "sentiment"
    name = "hf"

    def __init__(
        self,
        *,
        model: str = "siebert/sentiment-roberta-large-english",
        device: str | int = "cpu",
        batch_size: int = 32,
        label_values: dict[str, float] | None = None,
        max_length: int = 512,
    ) -> None:
        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length
        try:
            import transformers
        except ImportError as exc:
            raise EmdpoError(f"sentiment engine 'hf' needs transformers ({exc}): pip install transformers") from None
        try:
            self._pipe = transformers.pipeline("text-classification", model=model, device=device, top_k=None)
        except Exception as exc:
            raise EmdpoError(
                f"sentiment engine 'hf' cannot load model {model!r}: {type(exc).__name__}: {exc}. "
                "Pass a local folder (save_pretrained) or a model already in the HF cache, or use "
                "sentiment.engine=vader (offline)"
            ) from None
        id2label = dict(getattr(self._pipe.model.config, "id2label", {}) or {})
        self.labels = [str(v) for _, v in sorted(id2label.items())]
        values = dict(label_values or {})
        missing = []
        for lab in self.labels:
            if lab not in values:
                v = label_valence(lab)
                if v is None:
                    missing.append(lab)
                else:
                    values[lab] = v
        if missing:
            raise EmdpoError(
                f"sentiment engine 'hf': model {model!r} has labels {self.labels} and {missing} carry no "
                "known valence; set sentiment.label_values, e.g. {LABEL_0: -1, LABEL_1: 1}"
            )
        self.label_values = values
        commit = getattr(self._pipe.model.config, "_commit_hash", None)
        self.version = f"{model}@{commit or 'local'} (transformers {package_version('transformers')})"

    def score(self, texts: list[str], contexts: list[str] | None = None) -> np.ndarray:
        _check_contexts(texts, contexts)
        clean = [strip_markup(t) or "." for t in texts]
        out = self._pipe(clean, batch_size=self.batch_size, truncation=True, max_length=self.max_length)
        scores = []
        for result in out:
            result = result if isinstance(result, list) else [result]
            scores.append(sum(float(r["score"]) * self.label_values[str(r["label"])] for r in result))
        return np.array(scores, dtype=np.float64)

    def info(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "version": self.version,
            "model": self.model,
            "label_values": self.label_values,
            "score": "sum_label p(label) * valence(label) of the completion",
        }


# --------------------------------------------------------------------------- LLM judge (pairwise)

_CRITERIA = {
    "sentiment": "Which continuation expresses the more positive sentiment about the movie?",
    "grammar": "Which continuation is more grammatically correct (fewer grammatical errors)?",
}


class LLMJudge:
    """Pairwise judge through an OpenAI-compatible `POST {base_url}/chat/completions`.

    Asks which of two continuations of a review is better for the group's criterion and reads
    `A` or `B` from the reply. With `both_orders` each pair is asked twice with the order
    swapped; answers that disagree count as no preference (0), which removes position bias.
    The API key is read from the environment variable named by `api_key_env` (None: no key,
    for local servers). Only the standard library is used (urllib).
    """

    name = "llm_judge"

    def __init__(
        self,
        kind: str,
        *,
        base_url: str | None = None,
        model: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        both_orders: bool = True,
        timeout_s: float = 60.0,
        workers: int = 4,
        max_tokens: int = 4,
    ) -> None:
        self.kind = kind
        if not base_url or not model:
            raise EmdpoError(
                f"{kind} engine 'llm_judge' needs {kind}.base_url (an OpenAI-compatible endpoint, e.g. "
                f"http://127.0.0.1:8000/v1) and {kind}.model"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key: str | None = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise EmdpoError(
                    f"{kind} engine 'llm_judge': environment variable {api_key_env} is not set; export the API "
                    f"key there, or set {kind}.api_key_env to another variable (null for a server without auth)"
                )
        self.api_key_env = api_key_env
        self.both_orders = both_orders
        self.timeout_s = timeout_s
        self.workers = workers
        self.max_tokens = max_tokens
        self.version = f"{model} via {self.base_url}"
        self.calls = 0
        self._lock = threading.Lock()

    def _messages(self, prompt: str, a: str, b: str) -> list[dict[str, str]]:
        user = (
            f"Beginning of a movie review:\n{strip_markup(prompt)}\n\n"
            f"Continuation A:\n{strip_markup(a)}\n\nContinuation B:\n{strip_markup(b)}\n\n"
            f"{_CRITERIA[self.kind]} Answer with the single letter A or B."
        )
        return [
            {"role": "system", "content": "You are a careful annotator. Reply with exactly one letter: A or B."},
            {"role": "user", "content": user},
        ]

    def ask(self, prompt: str, a: str, b: str) -> str:
        """'A' or 'B' from the endpoint; anything else is an EmdpoError."""
        body = json.dumps(
            {"model": self.model, "messages": self._messages(prompt, a, b), "temperature": 0, "max_tokens": self.max_tokens}
        ).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                payload = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:200]
            raise EmdpoError(f"{self.kind} engine 'llm_judge': {self.base_url} answered HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            raise EmdpoError(f"{self.kind} engine 'llm_judge': request to {self.base_url} failed: {exc}") from None
        with self._lock:
            self.calls += 1
        try:
            content = payload["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise EmdpoError(f"{self.kind} engine 'llm_judge': unexpected response {str(payload)[:200]}") from None
        found = re.search(r"\b([AB])\b", content.strip().upper())
        if not found:
            raise EmdpoError(f"{self.kind} engine 'llm_judge': reply {content[:80]!r} names neither A nor B")
        return found.group(1)

    def _one(self, triple: tuple[str, str, str]) -> int:
        prompt, a, b = triple
        first = 1 if self.ask(prompt, a, b) == "A" else -1
        if not self.both_orders:
            return first
        second = 1 if self.ask(prompt, b, a) == "B" else -1
        return first if first == second else 0

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> np.ndarray:
        triples = list(zip(prompts, first, second))
        return np.array(_map_threads(self._one, triples, self.workers), dtype=np.int64)

    def info(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "version": self.version,
            "model": self.model,
            "base_url": self.base_url,
            "both_orders": self.both_orders,
            "criterion": _CRITERIA[self.kind],
            "score": "pairwise: Copeland score (wins - losses) over the item's responses",
        }


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
