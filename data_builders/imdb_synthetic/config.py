"""The builder's config: what `data.config` (or `openrlhf data build imdb_synthetic --set`) may hold."""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from emdpo_plugin.config import StrictModel, format_validation_error
from emdpo_plugin.errors import EmdpoError

from .corpus import MAX_SENTENCES

DEFAULT_HF_DATASET = "insub/imdb_prefix20_forDPO_gpt2-large-imdb-FT_siebert_sentiment-roberta-large-english"
GROUPS = ("sentiment", "grammar")
TIE_RULES = {
    "other_then_coin": "equal scores are ordered by the other group's score, then by a seeded coin per item",
    "coin": "equal scores are ordered by a seeded coin per item",
}


class SourceConfig(StrictModel):
    kind: Literal["hf", "file", "generated"] = "hf"
    # hf
    dataset: str = DEFAULT_HF_DATASET
    split: str = "train+test"  # the paper uses all 50,000 rows (25k train + 25k test)
    revision: str | None = None
    # file
    path: str | None = None
    review_column: str | None = None  # raw reviews: prompts cut from them, completions generated
    # hf and file
    prompt_column: str = "text"
    completion_columns: list[str] = Field(default_factory=lambda: ["chosen", "rejected"])
    strip_prompt: bool = True  # completions that start with their prompt keep only the rest
    prompt_tokens: int = Field(20, ge=1)
    limit: int | None = Field(None, ge=1)  # read at most this many rows
    # generated
    pool_size: int = Field(4000, ge=1)  # training prompts; test_size + val_size more are made for test and val
    error_probs: list[float] = Field(default_factory=lambda: [0.35, 0.3, 0.2, 0.15])  # P(k injected errors)
    sentiment_levels: list[int] = Field(default_factory=lambda: [-2, -1, 0, 1, 2])
    # sentences per completion, drawn uniformly from this list; two keep the offline build
    # fast (Harper costs about 0.3 ms per word), [2, 3] gives longer completions
    sentences: list[int] = Field(default_factory=lambda: [2])

    @field_validator("error_probs")
    @classmethod
    def _probs(cls, v: list[float]) -> list[float]:
        if not v or any(p < 0 for p in v) or sum(v) <= 0:
            raise ValueError("expected non-negative probabilities for 0, 1, 2, ... errors with a positive sum")
        return v

    @field_validator("sentences")
    @classmethod
    def _sentences(cls, v: list[int]) -> list[int]:
        if not v or any(not 1 <= x <= MAX_SENTENCES for x in v):
            raise ValueError(f"expected sentence counts between 1 and {MAX_SENTENCES}")
        return v

    @field_validator("sentiment_levels")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if not v or any(x not in (-2, -1, 0, 1, 2) for x in v):
            raise ValueError("expected levels among -2, -1, 0, 1, 2")
        return v


class GeneratorConfig(StrictModel):
    model: str | None = None  # local HF model folder (or cached hub id), or "tiny"
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, ge=1)
    device: str = "auto"
    tiny_dir: str | None = None  # where `tiny` saves its model (default: a new temporary folder)
    tiny_options: dict[str, Any] = Field(default_factory=dict)  # extra build_tiny_lm keyword arguments


class _JudgeFields(StrictModel):
    base_url: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    both_orders: bool = True
    timeout_s: float = 60.0


class GrammarConfig(_JudgeFields):
    engine: Literal["harper", "languagetool", "llm_judge"] = "harper"
    lint_kinds: list[str] | None = None  # harper: lint kinds counted (default: grammar-like kinds)
    dialect: str = "american"  # harper
    server_url: str | None = None  # languagetool: a running server instead of a local install
    language: str = "en-US"  # languagetool
    ignore_categories: list[str] = Field(default_factory=list)  # languagetool
    model: str | None = None  # llm_judge
    workers: int | None = None
    # check prompt + completion and count errors in the completion; None: on for hf/file
    # sources (completions continue their prompt mid-sentence), off for `generated` (its
    # completions are whole sentences, so the prompt changes nothing and halves the work)
    context: bool | None = None


class SentimentConfig(_JudgeFields):
    engine: Literal["vader", "hf", "llm_judge"] = "vader"
    model: str | None = None  # hf: model id or folder (default siebert/sentiment-roberta-large-english); llm_judge: model name
    device: str | int = "cpu"  # hf
    batch_size: int = 32  # hf
    label_values: dict[str, float] | None = None  # hf
    workers: int | None = None  # llm_judge


class ImdbConfig(StrictModel):
    source: SourceConfig = Field(default_factory=SourceConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    users: int = Field(1200, ge=1)
    pairs_per_user: int = Field(50, ge=1)
    groups: dict[str, float] = Field(default_factory=lambda: {"sentiment": 2 / 3, "grammar": 1 / 3})
    test_size: int = Field(256, ge=0)
    val_size: int | None = Field(None, ge=0)  # validation prompts; None = test_size, 0 = no val split
    responses_per_prompt: int = Field(2, ge=2)
    tie_break: Literal["other_then_coin", "coin"] = "other_then_coin"
    grammar: GrammarConfig = Field(default_factory=GrammarConfig)
    sentiment: SentimentConfig = Field(default_factory=SentimentConfig)
    seed: int | None = None  # overrides the builder's seed argument when set
    progress: bool | None = None  # progress bars: None = only on a terminal

    @field_validator("groups", mode="before")
    @classmethod
    def _fractions(cls, v: Any) -> Any:
        """Fractions may be numbers or strings such as "2/3"; they must be positive and sum to 1."""
        if not isinstance(v, dict) or not v:
            raise ValueError("expected a mapping {group: fraction} with at least one group")
        out = {}
        for name, frac in v.items():
            if name not in GROUPS:
                raise ValueError(f"unknown group {name!r} (known: {', '.join(GROUPS)})")
            try:
                value = float(Fraction(str(frac).strip())) if isinstance(frac, str) else float(frac)
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"group {name!r}: expected a fraction such as 0.5 or '2/3', got {frac!r}") from None
            if isinstance(frac, bool) or not value > 0:
                raise ValueError(f"group {name!r}: expected a positive fraction, got {frac!r}")
            out[name] = value
        if abs(sum(out.values()) - 1.0) > 1e-3:
            raise ValueError(f"fractions must sum to 1, got {sum(out.values()):.6g}")
        return out

    @property
    def n_val(self) -> int:
        """Validation prompts: `val_size`, or as many as test when it is unset."""
        return self.test_size if self.val_size is None else self.val_size


# the config fields each engine takes (as make_labeller options)
ENGINE_OPTIONS = {
    ("grammar", "harper"): ("lint_kinds", "dialect", "workers", "context"),
    ("grammar", "languagetool"): ("server_url", "language", "ignore_categories", "workers", "context"),
    ("grammar", "llm_judge"): ("base_url", "model", "api_key_env", "both_orders", "timeout_s", "workers"),
    ("sentiment", "vader"): (),
    ("sentiment", "hf"): ("model", "device", "batch_size", "label_values"),
    ("sentiment", "llm_judge"): ("base_url", "model", "api_key_env", "both_orders", "timeout_s", "workers"),
}


def engine_options(cfg: ImdbConfig, kind: str) -> dict[str, Any]:
    """make_labeller options for the `kind` engine: only those the user set, so each engine keeps its defaults."""
    gcfg = cfg.grammar if kind == "grammar" else cfg.sentiment
    names = ENGINE_OPTIONS[(kind, gcfg.engine)]
    opts = {k: getattr(gcfg, k) for k in names if k in gcfg.model_fields_set}
    if "context" in names:
        opts["context"] = gcfg.context if gcfg.context is not None else cfg.source.kind != "generated"
    return opts


def config_error(exc: ValidationError, prefix: str = "imdb_synthetic") -> EmdpoError:
    """One line naming each bad dotted key, e.g. `config key 'source.foo': unknown key`."""
    return EmdpoError(f"{prefix}: " + format_validation_error(exc, config_keys=True))
