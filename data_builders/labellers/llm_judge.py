"""A pairwise LLM judge for either group (the paper's GPT-4 annotator), over an OpenAI-compatible API."""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from emdpo_plugin.errors import EmdpoError

from .base import map_threads, strip_markup

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
        return np.array(map_threads(self._one, triples, self.workers), dtype=np.int64)

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
