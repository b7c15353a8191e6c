"""Sentiment by VADER (offline, rule-based): the default sentiment engine."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import check_contexts, import_engine, package_version, strip_markup


class VaderSentiment:
    """Offline sentiment with vaderSentiment: the compound score in [-1, 1] of the completion."""

    kind = "sentiment"
    name = "vader"

    def __init__(self) -> None:
        vader = import_engine("vaderSentiment.vaderSentiment", "sentiment engine 'vader' needs the vaderSentiment "
                                                               "package ({exc}); install it with `pip install vaderSentiment`")
        self._analyzer = vader.SentimentIntensityAnalyzer()
        self.version = package_version("vaderSentiment")

    def score(self, texts: list[str], contexts: list[str] | None = None) -> np.ndarray:
        check_contexts(texts, contexts)  # the completion alone is scored
        return np.array([self._analyzer.polarity_scores(strip_markup(t))["compound"] for t in texts], dtype=np.float64)

    def info(self) -> dict[str, Any]:
        return {"engine": self.name, "version": self.version, "score": "VADER compound of the completion"}
