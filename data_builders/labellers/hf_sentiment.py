"""Sentiment from a Hugging Face text classifier (the paper's siebert model, or any local one)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from emdpo_plugin.errors import EmdpoError

from .base import check_contexts, import_engine, package_version, strip_markup

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
        transformers = import_engine("transformers", "sentiment engine 'hf' needs transformers ({exc}): pip install transformers")
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
        check_contexts(texts, contexts)
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
