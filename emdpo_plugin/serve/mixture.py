"""The routing decision both serving modes share: which adapter answers a request, and its metrics.

The ensemble `pi = sum_k w_k pi_k` is a sequence-level mixture, so serving it exactly means:
per request, pick adapter k with probability w_k, then let vLLM generate with that adapter.
Requests with a `user` field are routed deterministically from (seed, user), so one user keeps
one adapter (the mixture is then over users rather than requests). Requests that name an
adapter go straight to it. Every answer carries `x-emdpo-adapter`.

`Mixture` is used by the in-vLLM middleware (`in_vllm`, the default for LoRA ensembles) and by
the proxy router (`router`, for ensembles spread over several vLLM servers) alike.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from ..export.routing import ENSEMBLE
from .limits import RequestError

HEADER = "x-emdpo-adapter"
PROXIED = ("/v1/completions", "/v1/chat/completions")


class AdapterChooser:
    """Samples an adapter from the mixture weights; sticky (hash of seed and user) when a user is given."""

    def __init__(self, names: list[str], weights: list[float], seed: int = 0) -> None:
        self.names = names
        self.cdf = np.cumsum(np.asarray(weights, dtype=np.float64))
        self.cdf /= self.cdf[-1]
        self.seed = seed
        self.rng = random.Random(seed)

    def _pick(self, u: float) -> str:
        # side="right": an adapter with weight 0 (an empty CDF step) is never chosen
        return self.names[min(int(np.searchsorted(self.cdf, u, side="right")), len(self.names) - 1)]

    def choose(self, user: str | None = None) -> str:
        if user is None:
            return self._pick(self.rng.random())
        digest = hashlib.sha256(f"{self.seed}\x00{user}".encode()).digest()
        return self._pick(int.from_bytes(digest[:8], "big") / 2**64)


class Mixture:
    """The ensemble's adapters and weights, the choice per request, and the routing metrics."""

    def __init__(self, base_model: str, weights: dict[str, float], seed: int = 0) -> None:
        self.base_model = base_model
        self.weights = dict(weights)
        self.names = list(weights)
        self.chooser = AdapterChooser(self.names, [weights[n] for n in self.names], seed)
        self.registry = CollectorRegistry()
        self.requests = Counter("emdpo_requests", "Requests routed, by adapter, endpoint and HTTP status",
                                ["adapter", "endpoint", "status"], registry=self.registry)
        self.errors = Counter("emdpo_errors", "Requests answered with an error by the router itself, by reason",
                              ["reason"], registry=self.registry)
        self.latency = Histogram("emdpo_request_seconds", "Time to the response headers",
                                 ["adapter", "endpoint"], registry=self.registry)

    def pick(self, body: dict[str, Any]) -> str:
        """The adapter that answers `body` (a parsed request): drawn for `ensemble` (or no model),
        the named one otherwise; an unknown model is a 404 `RequestError`."""
        model = body.get("model") or ENSEMBLE
        if model == ENSEMBLE:
            return self.chooser.choose(body.get("user"))
        if model in self.weights:
            return model
        raise RequestError(404, f"model {model!r} is not served here; use {ENSEMBLE!r} or one of {self.names}",
                           "NotFoundError", "unknown_model")

    def models(self) -> list[dict[str, Any]]:
        """`/v1/models` entries: the ensemble (with its weights), then each adapter."""
        data = [{"id": ENSEMBLE, "object": "model", "owned_by": "emdpo", "weights": self.weights,
                 "root": self.base_model}]
        return data + [{"id": n, "object": "model", "owned_by": "emdpo", "weight": self.weights[n],
                        "parent": ENSEMBLE} for n in self.names]


def error_body(status: int, message: str, kind: str) -> bytes:
    """An OpenAI-style error: one line of JSON."""
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
