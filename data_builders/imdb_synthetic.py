"""The paper's synthetic IMDb preference data (section 5.2, appendix F.1) as format-v1 rows.

A pool of items (a review prompt plus `responses_per_prompt` completions) comes from one of:

- `source.kind: hf` -- an HF dataset loaded with `datasets.load_dataset` (default: the paper's
  `insub/imdb_prefix20_forDPO_gpt2-large-imdb-FT_siebert_sentiment-roberta-large-english`,
  columns text / chosen / rejected; chosen/rejected there were picked by a sentiment model and
  are only used as the two completions, never as labels). `source.dataset` may be a local
  folder or data file (or a `save_to_disk` folder).
- `source.kind: file` -- a CSV / JSONL / parquet file with `source.prompt_column` plus
  `source.completion_columns`, or raw reviews in `source.review_column`: the prompt is the
  first `source.prompt_tokens` (20) whitespace tokens with markup such as `<br />` removed,
  and completions are sampled from `generator.model` (a local HF model folder, or `tiny` to
  build one with `emdpo_plugin.models.tiny.build_tiny_lm` from the reviews).
- `source.kind: generated` -- an offline corpus of review-like prompts and completions made
  from templates and word lists with controlled sentiment and seeded grammar errors (it is
  synthetic text, and the manifest says so under `source.synthetic`).

Then (paper F.1): `test_size` items with distinct prompts are held out for the test split and
`val_size` more (default: as many as test) for the validation split; each of `users`
annotators gets a group (exact counts from the `groups` fractions, e.g. 800 sentiment / 400
grammar), and `pairs_per_user` distinct items drawn uniformly from the training pool. The
`sentiment` group prefers the more positive completion (`sentiment.engine`, default VADER);
the `grammar` group the one with fewer grammar errors per character (`grammar.engine`,
default Harper). Every annotator of a group labels an item the same way (labels are a function
of the item). Every test prompt is labelled once by each group (annotator `test-<group>`), and
so is every val prompt (`val-<group>`). Train, val and test share no prompt (the manifest's
`disjoint_prompts` records this and loading checks it). Hyperparameters are chosen on val; the
test split is read only by the final report stage.
With `responses_per_prompt` >= 3 rows are full rankings, best first.

Choices made here (the paper leaves them open):

- Ties (equal scores under the group's criterion; e.g. two completions without grammar
  errors) are broken by the other group's criterion, then by a seeded coin per item
  (`tie_break: other_then_coin`; `coin` skips the first step). Tie counts are reported in the
  manifest under `ties`.
- The order of an item's responses is shuffled once per item with the seed, so index 0 is not
  the source's "chosen" column.
- Items with a blank completion, or whose completions are identical, carry no preference and
  are dropped; the counts are reported under `source.dropped`.
- Only items that some annotator (or the test split) uses are labelled, each distinct
  (prompt, completion) once.
- Grammar is checked on prompt + completion and only errors inside the completion count
  (a completion continues its prompt; `grammar.context`, default on except for the
  `generated` source whose completions are whole sentences); sentiment is scored on the
  completion alone.
"""

from __future__ import annotations

import math
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError, field_validator

from emdpo_plugin.config import StrictModel
from emdpo_plugin.data.builders import BuiltDataset
from emdpo_plugin.data.schema import Comparison
from emdpo_plugin.errors import EmdpoError

from .labellers import is_pairwise, make_labeller, score_items, strip_markup

DEFAULT_HF_DATASET = "insub/imdb_prefix20_forDPO_gpt2-large-imdb-FT_siebert_sentiment-roberta-large-english"
GROUPS = ("sentiment", "grammar")
TIE_RULES = {
    "other_then_coin": "equal scores are ordered by the other group's score, then by a seeded coin per item",
    "coin": "equal scores are ordered by a seeded coin per item",
}


# --------------------------------------------------------------------------- config


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
        if not v or any(not 1 <= x <= len(_SENTENCES) for x in v):
            raise ValueError(f"expected sentence counts between 1 and {len(_SENTENCES)}")
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


_ENGINE_OPTIONS = {
    ("grammar", "harper"): ("lint_kinds", "dialect", "workers", "context"),
    ("grammar", "languagetool"): ("server_url", "language", "ignore_categories", "workers", "context"),
    ("grammar", "llm_judge"): ("base_url", "model", "api_key_env", "both_orders", "timeout_s", "workers"),
    ("sentiment", "vader"): (),
    ("sentiment", "hf"): ("model", "device", "batch_size", "label_values"),
    ("sentiment", "llm_judge"): ("base_url", "model", "api_key_env", "both_orders", "timeout_s", "workers"),
}


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


def config_error(exc: ValidationError, prefix: str = "imdb_synthetic") -> EmdpoError:
    """One line naming each bad dotted key, e.g. `config key 'source.foo': unknown key`."""
    parts = []
    for err in exc.errors():
        dotted = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"config key '{dotted}': {msg}")
    return EmdpoError(f"{prefix}: " + "; ".join(parts))


def group_counts(users: int, fractions: dict[str, float]) -> dict[str, int]:
    """Exact annotator counts per group by largest remainder (2/3, 1/3 of 1200 -> 800, 400)."""
    total = sum(fractions.values())
    raw = {g: users * f / total for g, f in fractions.items()}
    counts = {g: int(math.floor(r + 1e-9)) for g, r in raw.items()}
    left = users - sum(counts.values())
    for g in sorted(raw, key=lambda g: (-(raw[g] - counts[g]), g))[:left]:
        counts[g] += 1
    return counts


# --------------------------------------------------------------------------- pool items


@dataclass
class Item:
    prompt: str
    responses: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def _progress_disabled(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def first_tokens(text: str, n: int) -> str:
    """The first `n` whitespace tokens of `text` with markup such as `<br />` removed."""
    return " ".join(strip_markup(text).split()[:n])


def _tidy_items(rows: list[tuple[str, list[str]]], strip_prompt: bool) -> tuple[list[Item], dict[str, int]]:
    """Items from (prompt, completions); drop blank or identical completions (counted)."""
    items: list[Item] = []
    dropped = {"blank_completion": 0, "identical_completions": 0}
    for prompt, comps in rows:
        comps = [c if isinstance(c, str) else "" for c in comps]
        if strip_prompt and prompt:
            comps = [c[len(prompt):] if c.startswith(prompt) else c for c in comps]
        if any(not c.strip() for c in comps):
            dropped["blank_completion"] += 1
            continue
        if len(set(comps)) < len(comps):
            dropped["identical_completions"] += 1
            continue
        items.append(Item(prompt if isinstance(prompt, str) else "", list(comps)))
    return items, dropped


def _check_columns(where: str, available: list[str], wanted: list[str], hint: str) -> None:
    missing = [c for c in wanted if c not in available]
    if missing:
        raise EmdpoError(f"{where}: missing column(s) {missing} (has: {available}); {hint}")


def _hf_items(cfg: ImdbConfig) -> tuple[list[Item], dict[str, Any]]:
    src = cfg.source
    cols = [src.prompt_column, *src.completion_columns[: cfg.responses_per_prompt]]
    _need_columns(cfg)
    try:
        import datasets
    except ImportError as exc:
        raise EmdpoError(f"source.kind=hf needs the datasets package ({exc}): pip install datasets") from None
    local = Path(src.dataset).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            obj = datasets.load_from_disk(str(local))
            if isinstance(obj, datasets.DatasetDict):
                parts = [s.strip() for s in src.split.split("+")]
                missing = [p for p in parts if p not in obj]
                if missing:
                    raise EmdpoError(f"{local}: split(s) {missing} not found (available: {sorted(obj)})")
                ds = datasets.concatenate_datasets([obj[p] for p in parts])
            else:
                ds = obj
        else:
            ds = datasets.load_dataset(src.dataset, split=src.split, revision=src.revision)
    except EmdpoError:
        raise
    except Exception as exc:
        raise EmdpoError(
            f"source.dataset {src.dataset!r} (split {src.split!r}) cannot be loaded: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Without hub access point source.dataset at a local "
            "folder or file, use source.kind=file, or source.kind=generated for the offline corpus"
        ) from None
    _check_columns(f"source.dataset {src.dataset!r}", list(ds.column_names), cols,
                   "set source.prompt_column / source.completion_columns")
    if src.limit is not None:
        ds = ds.select(range(min(src.limit, len(ds))))
    data = ds.select_columns(cols).to_dict()
    rows = [(p, [data[c][i] for c in cols[1:]]) for i, p in enumerate(data[cols[0]])]
    items, dropped = _tidy_items(rows, src.strip_prompt)
    info = {"kind": "hf", "dataset": src.dataset, "split": src.split, "revision": src.revision,
            "rows_read": len(rows), "dropped": dropped, "synthetic": False}
    return items, info


def _need_columns(cfg: ImdbConfig) -> None:
    if len(cfg.source.completion_columns) < cfg.responses_per_prompt:
        raise EmdpoError(
            f"responses_per_prompt={cfg.responses_per_prompt} but source.completion_columns has only "
            f"{len(cfg.source.completion_columns)} column(s) {cfg.source.completion_columns}; list more columns "
            "or lower responses_per_prompt"
        )


def _read_table(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        raise EmdpoError(f"source.path {str(path)!r}: no such file (CSV, JSONL or parquet expected)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=True)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except Exception as exc:
        raise EmdpoError(f"source.path {str(path)!r}: cannot read {suffix} file: {exc}") from None
    raise EmdpoError(f"source.path {str(path)!r}: unsupported file type {suffix or '(none)'!r} (CSV, JSONL or parquet)")


def _file_items(cfg: ImdbConfig, seed: int, progress: bool | None) -> tuple[list[Item], dict[str, Any]]:
    src = cfg.source
    if not src.path:
        raise EmdpoError("source.kind=file needs source.path (a CSV, JSONL or parquet file)")
    path = Path(src.path).expanduser()
    df = _read_table(path)
    if src.limit is not None:
        df = df.head(src.limit)
    available = [str(c) for c in df.columns]
    if src.review_column is None:
        cols = [src.prompt_column, *src.completion_columns[: cfg.responses_per_prompt]]
        _need_columns(cfg)
        _check_columns(f"source.path {str(path)!r}", available, cols,
                       "set source.prompt_column / source.completion_columns, or source.review_column for raw reviews")
        rows = [(str(r[0]) if isinstance(r[0], str) else "", list(r[1:])) for r in df[cols].itertuples(index=False)]
        items, dropped = _tidy_items(rows, src.strip_prompt)
        return items, {"kind": "file", "path": str(path), "rows_read": len(rows), "dropped": dropped,
                       "synthetic": False}

    _check_columns(f"source.path {str(path)!r}", available, [src.review_column], "set source.review_column")
    reviews = [r for r in df[src.review_column].tolist()]
    short = 0
    prompts: list[str] = []
    texts: list[str] = []
    seen: set[str] = set()
    duplicate = 0
    for r in reviews:
        clean = strip_markup(r) if isinstance(r, str) else ""
        if len(clean.split()) <= src.prompt_tokens:
            short += 1  # nothing left to continue after the prompt
            continue
        prompt = first_tokens(clean, src.prompt_tokens)
        if prompt in seen:
            duplicate += 1
            continue
        seen.add(prompt)
        prompts.append(prompt)
        texts.append(clean)
    if not prompts:
        raise EmdpoError(f"source.path {str(path)!r}: no review has more than {src.prompt_tokens} words")
    model_dir, gen_info = _resolve_generator(cfg, texts, seed)
    completions = generate_completions(prompts, model_dir, cfg.generator, cfg.responses_per_prompt, seed, progress)
    items, dropped = _tidy_items(list(zip(prompts, completions)), strip_prompt=False)
    dropped.update({"review_too_short": short, "duplicate_prompt": duplicate})
    return items, {"kind": "file", "path": str(path), "review_column": src.review_column,
                   "rows_read": len(reviews), "dropped": dropped, "synthetic": False, "generator": gen_info}


# --------------------------------------------------------------------------- generation with a model


def _resolve_generator(cfg: ImdbConfig, texts: list[str], seed: int) -> tuple[str, dict[str, Any]]:
    g = cfg.generator
    if not g.model:
        raise EmdpoError(
            "source.review_column is set, so completions must be generated: set generator.model to a local HF "
            "model folder, or to 'tiny' to build a small model from the reviews"
        )
    if g.model != "tiny":
        return g.model, {"model": g.model}
    try:
        from emdpo_plugin.models.tiny import build_tiny_lm
    except ImportError as exc:
        raise EmdpoError(f"generator.model=tiny needs emdpo_plugin.models.tiny, which cannot be imported: {exc}") from None
    out_dir = Path(g.tiny_dir).expanduser() if g.tiny_dir else Path(tempfile.mkdtemp(prefix="emdpo-tiny-lm-")) / "model"
    try:
        path = build_tiny_lm(texts, out_dir, seed=seed, **g.tiny_options)
    except TypeError as exc:
        raise EmdpoError(f"generator.tiny_options: {exc}") from None
    return str(path), {"model": "tiny", "path": str(path), "options": dict(g.tiny_options)}


def generate_completions(
    prompts: list[str], model: str, g: GeneratorConfig, n: int, seed: int, progress: bool | None = None
) -> list[list[str]]:
    """`n` sampled continuations per prompt (new tokens only) with transformers `generate`."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise EmdpoError(f"generating completions needs torch and transformers ({exc})") from None
    from tqdm.auto import tqdm

    try:
        tok = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model, attn_implementation="sdpa")
    except Exception as exc:
        raise EmdpoError(
            f"generator.model {model!r} cannot be loaded: {type(exc).__name__}: {exc}. Use a local folder "
            "written with save_pretrained (hub downloads are not available offline) or generator.model=tiny"
        ) from None
    device = g.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lm.to(device).eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(seed)
    out: list[list[str]] = []
    with tqdm(total=len(prompts), desc="generating completions", unit="prompt", disable=_progress_disabled(progress)) as bar:
        for s in range(0, len(prompts), g.batch_size):
            batch = prompts[s : s + g.batch_size]
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                gen = lm.generate(
                    **enc, do_sample=True, max_new_tokens=g.max_new_tokens, num_return_sequences=n,
                    temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, pad_token_id=tok.pad_token_id,
                )
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i in range(len(batch)):
                out.append([_continuation(t) for t in texts[i * n : (i + 1) * n]])
            bar.update(len(batch))
    return out


def _continuation(text: str) -> str:
    """A decoded continuation, with a leading space so prompt + completion reads as text."""
    text = text.rstrip()
    if text and not text[0].isspace() and text[0] not in ".,;:!?'\")":
        text = " " + text
    return text


# --------------------------------------------------------------------------- generated corpus

_TITLE_ADJ = ["Silent", "Crimson", "Last", "Hidden", "Broken", "Golden", "Distant", "Burning", "Frozen", "Lonely",
              "Midnight", "Forgotten", "Electric", "Wild", "Quiet", "Restless", "Hollow", "Bright", "Endless",
              "Secret", "Velvet", "Iron", "Paper", "Northern"]
_TITLE_NOUN = ["Harbor", "Garden", "Empire", "River", "Station", "Horizon", "Mirror", "Summer", "Kingdom",
               "Frontier", "Letter", "Island", "Highway", "Orchard", "Carnival", "Lighthouse", "Circus", "Valley",
               "Tower", "Promise", "Voyage", "Winter", "Signal", "Canyon"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_COMPANIONS = ["my sister", "my brother", "my parents", "a friend from work", "my roommate", "my wife",
               "my husband", "my kids", "my grandmother", "two old friends", "my film club", "my neighbor"]
_GENRES = ["drama", "thriller", "comedy", "western", "war film", "romance", "horror film", "musical",
           "crime story", "science fiction film", "family film", "mystery"]
_PLACES = ["at a small theater downtown", "on cable late at night", "on a long flight", "at a festival screening",
           "on an old DVD", "at the local cinema", "on a rainy afternoon at home", "at a friend's house"]
_DIRECTORS = ["Martin Hale", "Ruth Calder", "Tom Okafor", "Elena Brandt", "Jack Moreno", "Nina Sorensen",
              "Paul Whitaker", "Grace Lindqvist", "Omar Castell", "Helen Park"]
_LEADS = ["Anna Reyes", "David Cole", "Laura Finch", "Sam Becker", "Julia Romano", "Peter Vance", "Clara Moss",
          "Victor Lang", "Emma Stiles", "Henry Kato"]
_PROMPTS = [
    "I watched {title} {place} with {companion}, and I went in expecting a fairly ordinary {genre} from {year}.",
    "{title} is a {year} {genre} directed by {director}, and I finally saw it {place} last {day} with {companion}.",
    "I rented {title} on {day} because {companion} kept talking about it, so I sat down to watch this {genre}.",
    "When {title} came out in {year}, nobody I knew had seen it, but last {day} I watched it {place}.",
    "This {genre} stars {lead} and was made in {year} by {director}, who also wrote the script for {title}.",
    "My review of {title}, a {genre} by {director}: I saw it {place} with {companion} a few weeks ago.",
    "After years of hearing about {title}, I sat down {place} last {day} to see if this {year} {genre} holds up.",
    "{lead} plays the lead in {title}, a {genre} from {year} that {companion} and I watched {place}.",
    "I had never heard of {title} before {companion} brought it home on {day}, and it turned out to be a {genre}.",
    "Let me say first that I am a big fan of {director}, so I watched {title} {place} with {companion}.",
    "{title} ({year}) is the kind of {genre} that shows up {place}, and I gave it a chance with {companion}.",
    "I caught {title} {place} on {day}; it is a {genre} with {lead} in the main role, directed by {director}.",
    "Somebody at work lent me {title}, a {year} {genre}, and I watched it last {day} with {companion}.",
    "Before I start, a warning: this review of {title} discusses the whole plot of this {genre} by {director}.",
]
_ADJ = {
    2: ["brilliant", "wonderful", "superb", "outstanding", "fantastic", "excellent", "amazing", "magnificent",
        "beautiful", "terrific", "marvelous", "delightful"],
    1: ["good", "nice", "enjoyable", "pleasant", "solid", "decent", "charming", "fun", "likable", "entertaining",
        "engaging", "sweet"],
    0: ["long", "ordinary", "typical", "familiar", "simple", "muted", "unusual", "old-fashioned", "slow", "modest",
        "straightforward", "talky"],
    -1: ["dull", "weak", "boring", "bland", "tedious", "messy", "forgettable", "silly", "clumsy", "flat", "uneven",
         "lazy"],
    -2: ["awful", "terrible", "horrible", "dreadful", "atrocious", "painful", "pathetic", "disastrous", "abysmal",
         "ugly", "miserable", "hideous"],
}
_ADV = ["really", "very", "truly", "quite", "pretty", "rather", "fairly", "so"]
_ASPECTS = ["acting", "script", "plot", "soundtrack", "dialogue", "pacing", "cinematography", "ending", "direction",
            "editing", "humor", "score", "lighting", "final act", "opening scene", "story"]
_STARS = {2: ["nine", "ten"], 1: ["seven", "eight"], 0: ["five", "six"], -1: ["three", "four"], -2: ["one", "two"]}
# Sentence templates. `[right|wrong]` is an error site (the wrong form is one Harper flags:
# subject-verb agreement, wrong participle/tense, "could of", "alot", "suppose to", "more
# better", their/they're, its/it's); `{a_adj}` is an article + adjective whose article can be
# made wrong ("a awful"). Doubled words ("the the", "was was") are a further site in any
# sentence. Missing articles are not injected: Harper does not flag them.
_SENTENCES = [
    "The {aspect} was {adv} {adj}, and [we were|we was] all aware of it.",
    "[I have seen|I have saw] many films like this one, and this one was {adj}.",
    "Honestly, the {aspect} felt {adj} from the first scene to the last.",
    "[It is|It are] {a_adj} film from start to finish.",
    "The director [could have|could of] cut twenty minutes, but the {aspect} was {adj}.",
    "[I would have|I would of] given it {stars} out of ten, because the {aspect} is {adj}.",
    "The ending was [a lot|alot] more {adj} than I expected.",
    "[He has|He have] {a_adj} screen presence in every scene.",
    "[She does|She do] {a_adj} job as the lead, and the {aspect} is {adj}.",
    "The script was [supposed to|suppose to] be clever, and it was {adj}.",
    "[They're|Their] going to call it {adj} for years.",
    "[It's|Its] {a_adj} story, and the {aspect} is {adv} {adj}.",
    "[We were|We was] both surprised by how {adj} the {aspect} was.",
    "The second half [was better|was more better] than the first, but it stayed {adj}.",
    "[He doesn't|He don't] need much dialogue, and his scenes are {adj}.",
    "My friends [have seen|have saw] it twice and call it {adj}.",
    "[They were|They was] {adv} {adj} together in the quiet scenes.",
    "All in all, it is {a_adj} film with {a_adj} cast.",
]
_SLOT = re.compile(r"\{(adj|adv|aspect|stars|a_adj)\}")
_PART = re.compile(r"\[([^|\]]*)\|([^\]]*)\]|<<([^>]+)>>")
_DOUBLABLE = re.compile(r"\b(the|The|and|was|very|really|is|a)\b")


def _parse_sentence(template: str, fill: Any) -> list[tuple]:
    """Segments: ("lit", text) | ("swap", right, wrong) | ("art", adjective)."""
    text = _SLOT.sub(lambda m: f"<<{fill('adj')}>>" if m.group(1) == "a_adj" else fill(m.group(1)), template)
    parts: list[tuple] = []
    pos = 0
    for m in _PART.finditer(text):
        if m.start() > pos:
            parts.append(("lit", text[pos : m.start()]))
        parts.append(("swap", m.group(1), m.group(2)) if m.group(3) is None else ("art", m.group(3)))
        pos = m.end()
    if pos < len(text):
        parts.append(("lit", text[pos:]))
    return parts


def _render(parts: list[tuple], wrong: set[tuple[int, int | None]]) -> str:
    out = []
    for i, part in enumerate(parts):
        if part[0] == "swap":
            out.append(part[2] if (i, None) in wrong else part[1])
        elif part[0] == "art":
            word = part[1]
            vowel = word[0].lower() in "aeiou"
            right = "an" if vowel else "a"
            out.append(f"{('a' if vowel else 'an') if (i, None) in wrong else right} {word}")
        else:
            text = part[1]
            starts = sorted((s for (j, s) in wrong if j == i and s is not None), reverse=True)
            for s in starts:  # double the word starting at s
                m = _DOUBLABLE.match(text, s)
                text = text[: m.end()] + " " + m.group(0).lower() + text[m.end():]
            out.append(text)
    return "".join(out)


class ReviewCorpus:
    """Offline review-like prompts and completions with controlled sentiment and grammar errors.

    Each completion gets a sentiment level in `levels` (-2 very negative .. +2 very positive;
    80% of its adjectives come from that level, the rest from a neighbouring one) and a number
    of injected errors k ~ `error_probs`, placed at k distinct error sites of its sentences
    (a count drawn from `sentences`). Level and k are drawn independently, so sentiment and grammar preferences
    disagree on about half of the pairs. Deterministic in the seed.
    """

    def __init__(self, seed: int, *, error_probs: list[float], levels: list[int], sentences: list[int] = (2, 3)) -> None:
        self.rng = random.Random(seed)
        self.sentences = tuple(sentences)
        total = sum(error_probs)
        self.error_probs = [p / total for p in error_probs]
        self.levels = list(levels)
        self._seen_prompts: set[str] = set()

    def prompt(self) -> str:
        r = self.rng
        for _ in range(1000):
            text = r.choice(_PROMPTS).format(
                title=f"The {r.choice(_TITLE_ADJ)} {r.choice(_TITLE_NOUN)}", place=r.choice(_PLACES),
                companion=r.choice(_COMPANIONS), genre=r.choice(_GENRES), year=r.randint(1958, 2008),
                day=r.choice(_DAYS), director=r.choice(_DIRECTORS), lead=r.choice(_LEADS))
            if text not in self._seen_prompts:
                self._seen_prompts.add(text)
                return text
        raise EmdpoError("the generated corpus ran out of distinct prompts; lower source.pool_size")

    def completion(self) -> tuple[str, int, int]:
        """(text, sentiment level, injected errors)."""
        r = self.rng
        level = r.choice(self.levels)
        n_errors = r.choices(range(len(self.error_probs)), weights=self.error_probs)[0]

        def fill(slot: str) -> str:
            if slot == "adj":
                lv = level if r.random() < 0.8 else max(-2, min(2, level + r.choice((-1, 1))))
                return r.choice(_ADJ[lv])
            if slot == "adv":
                return r.choice(_ADV)
            if slot == "aspect":
                return r.choice(_ASPECTS)
            return r.choice(_STARS[level])

        sentences = [_parse_sentence(t, fill) for t in r.sample(_SENTENCES, r.choice(self.sentences))]
        sites: list[tuple[int, int, int | None]] = []
        for si, parts in enumerate(sentences):
            for pi, part in enumerate(parts):
                if part[0] in ("swap", "art"):
                    sites.append((si, pi, None))
                else:
                    sites.extend((si, pi, m.start()) for m in _DOUBLABLE.finditer(part[1]))
        chosen: list[tuple[int, int, int | None]] = []
        for site in r.sample(sites, len(sites)):
            if len(chosen) == n_errors:
                break
            if all(c[:2] != site[:2] for c in chosen):  # at most one error per segment
                chosen.append(site)
        text = " ".join(
            _render(parts, {(pi, s) for (si, pi, s) in chosen if si == i}) for i, parts in enumerate(sentences)
        )
        return " " + text, level, len(chosen)

    def item(self, n: int) -> Item:
        prompt = self.prompt()
        comps: list[str] = []
        levels, errors = [], []
        while len(comps) < n:
            text, level, k = self.completion()
            if text not in comps:
                comps.append(text)
                levels.append(level)
                errors.append(k)
        return Item(prompt, comps, {"levels": levels, "injected_errors": errors})


def _generated_items(cfg: ImdbConfig, seed: int) -> tuple[list[Item], dict[str, Any]]:
    src = cfg.source
    corpus = ReviewCorpus(seed, error_probs=src.error_probs, levels=src.sentiment_levels, sentences=src.sentences)
    n = src.pool_size + cfg.test_size + _val_size(cfg)
    items = [corpus.item(cfg.responses_per_prompt) for _ in range(n)]
    injected = [k for it in items for k in it.meta["injected_errors"]]
    info = {
        "kind": "generated",
        "synthetic": True,
        "description": "template review corpus (emdpo_plugin data_builders.imdb_synthetic.ReviewCorpus): "
                       "synthetic text with controlled sentiment levels and seeded grammar errors",
        "pool_size": src.pool_size,
        "items": n,
        "error_probs": list(src.error_probs),
        "sentiment_levels": list(src.sentiment_levels),
        "sentences": list(src.sentences),
        "injected_errors_mean": float(np.mean(injected)) if injected else 0.0,
        "dropped": {},
    }
    return items, info


def _val_size(cfg: ImdbConfig) -> int:
    return cfg.test_size if cfg.val_size is None else cfg.val_size


# --------------------------------------------------------------------------- labels and ties


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


def _labellers(cfg: ImdbConfig) -> dict[str, Any]:
    out = {}
    for kind, gcfg in (("grammar", cfg.grammar), ("sentiment", cfg.sentiment)):
        # only options the user set are passed: each engine keeps its own defaults
        opts = {k: getattr(gcfg, k) for k in _ENGINE_OPTIONS[(kind, gcfg.engine)] if k in gcfg.model_fields_set}
        if "context" in _ENGINE_OPTIONS[(kind, gcfg.engine)]:
            opts["context"] = gcfg.context if gcfg.context is not None else cfg.source.kind != "generated"
        out[kind] = make_labeller(kind, gcfg.engine, **opts)
    return out


def _score_stats(scores: list[np.ndarray]) -> dict[str, float]:
    flat = np.concatenate(scores) if scores else np.zeros(0)
    if flat.size == 0:
        return {}
    return {"mean": float(flat.mean()), "min": float(flat.min()), "max": float(flat.max()),
            "share_zero": float(np.mean(flat == 0))}


# --------------------------------------------------------------------------- build


def build(config: dict[str, Any], *, seed: int = 0) -> BuiltDataset:
    try:
        cfg = ImdbConfig.model_validate(config or {})
    except ValidationError as exc:
        raise config_error(exc) from None
    seed = cfg.seed if cfg.seed is not None else seed
    progress = cfg.progress
    timings: dict[str, float] = {}
    ss = np.random.SeedSequence(seed)
    s_corpus, s_split, s_groups, s_users, s_coin, s_order = ss.spawn(6)
    # labellers first: an engine that cannot run fails before any long step
    t0 = time.perf_counter()
    labellers = _labellers(cfg)
    timings["labeller_setup"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if cfg.source.kind == "generated":
        items, source_info = _generated_items(cfg, int(s_corpus.generate_state(1)[0]))
    elif cfg.source.kind == "hf":
        items, source_info = _hf_items(cfg)
    else:
        items, source_info = _file_items(cfg, seed, progress)
    timings["source"] = time.perf_counter() - t0

    # test, then val: items with distinct prompts; the train pool excludes all those prompts
    val_size = _val_size(cfg)
    rng = np.random.default_rng(s_split)
    perm = rng.permutation(len(items))
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

    counts = group_counts(cfg.users, cfg.groups)
    width = max(4, len(str(cfg.users - 1)))
    user_groups = np.array([g for g in counts for _ in range(counts[g])], dtype=object)
    user_groups = user_groups[np.random.default_rng(s_groups).permutation(cfg.users)]
    urng = np.random.default_rng(s_users)
    pool_arr = np.asarray(pool_idx)
    draws = [pool_arr[urng.choice(len(pool_arr), size=cfg.pairs_per_user, replace=False)] for _ in range(cfg.users)]

    used = sorted(set(np.concatenate(draws).tolist()) | set(test_idx) | set(val_idx))
    # shuffle each used item's responses once (index 0 is not the source's "chosen")
    orng = np.random.default_rng(s_order)
    for i in used:
        p = orng.permutation(len(items[i].responses))
        items[i] = Item(items[i].prompt, [items[i].responses[j] for j in p], items[i].meta)

    t0 = time.perf_counter()
    prompts = [items[i].prompt for i in used]
    responses = [items[i].responses for i in used]
    scores: dict[str, list[np.ndarray]] = {}
    for kind in ("grammar", "sentiment"):
        t1 = time.perf_counter()
        scores[kind] = score_items(labellers[kind], prompts, responses, progress=progress)
        timings[f"label_{kind}"] = time.perf_counter() - t1
    timings["labelling"] = time.perf_counter() - t0
    pos = {item: k for k, item in enumerate(used)}

    # rankings per used item and group
    other = {"sentiment": "grammar", "grammar": "sentiment"}
    rankings: dict[str, list[list[int]]] = {g: [] for g in GROUPS}
    tie_how: dict[str, list[str | None]] = {g: [] for g in GROUPS}
    coin_seed = int(s_coin.generate_state(1)[0])
    for k, item in enumerate(used):
        coin = np.random.default_rng([coin_seed, item]).random(len(responses[k]))
        for g in GROUPS:
            secondary = scores[other[g]][k] if cfg.tie_break == "other_then_coin" else None
            ranking, how = rank_with_ties(scores[g][k], secondary, coin)
            rankings[g].append(ranking)
            tie_how[g].append(how)

    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    train: list[Comparison] = []
    tie_rows = {g: 0 for g in counts}
    for u in tqdm(range(cfg.users), desc="building rows", unit="user", disable=_progress_disabled(progress)):
        g = str(user_groups[u])
        uid = f"u{u:0{width}d}"
        for j, i in enumerate(draws[u]):
            k = pos[int(i)]
            tie_rows[g] += tie_how[g][k] is not None
            train.append(Comparison(
                annotator_id=uid, prompt=prompts[k], responses=list(responses[k]), ranking=rankings[g][k],
                comparison_id=f"train-{uid}-{j:03d}", group=g, split="train"))
    eval_groups = [g for g in GROUPS if g in counts]

    def labelled_by_every_group(split: str, idx: list[int]) -> list[Comparison]:
        rows: list[Comparison] = []
        for t, i in enumerate(idx):
            k = pos[i]
            for g in eval_groups:
                rows.append(Comparison(
                    annotator_id=f"{split}-{g}", prompt=prompts[k], responses=list(responses[k]),
                    ranking=rankings[g][k], comparison_id=f"{split}-{t:04d}-{g}", group=g, split=split))
        return rows

    test = labelled_by_every_group("test", test_idx)
    val = labelled_by_every_group("val", val_idx) if val_size else None
    timings["rows"] = time.perf_counter() - t0

    test_pos = [pos[i] for i in test_idx]
    val_pos = [pos[i] for i in val_idx]
    held_set = set(test_idx) | set(val_idx)
    train_pos = [pos[i] for i in used if i not in held_set]

    def tie_summary(positions: list[int]) -> dict[str, dict[str, int]]:
        out = {}
        for g in GROUPS:
            hows = [tie_how[g][k] for k in positions]
            out[g] = {"tied_items": sum(h is not None for h in hows),
                      "broken_by_other": sum(h == "other" for h in hows),
                      "broken_by_coin": sum(h == "coin" for h in hows)}
        return out

    def disagreement(positions: list[int]) -> dict[str, float]:
        if not positions:
            return {"full_ranking": 0.0, "top1": 0.0}
        full = np.mean([rankings["sentiment"][k] != rankings["grammar"][k] for k in positions])
        top1 = np.mean([rankings["sentiment"][k][0] != rankings["grammar"][k][0] for k in positions])
        return {"full_ranking": float(full), "top1": float(top1)}

    source_info.update({"pool_items": len(pool_idx), "test_items": len(test_idx), "val_items": len(val_idx),
                        "used_items": len(used)})
    resolved = cfg.model_dump(mode="json")
    resolved["val_size"] = val_size
    resolved["seed"] = seed
    labels = {kind: labellers[kind].info() for kind in ("grammar", "sentiment")}
    for kind in labels:
        labels[kind]["pairwise"] = is_pairwise(labellers[kind])
    extra = {
        "synthetic": {"labels": True, "text": bool(source_info.get("synthetic"))},
        "source": source_info,
        "ties": {
            "rule": TIE_RULES[cfg.tie_break],
            "train_items": tie_summary(train_pos),
            "test_items": tie_summary(test_pos),
            "val_items": tie_summary(val_pos),
            "train_rows": tie_rows,
        },
        "disagreement": {"test": disagreement(test_pos), "val": disagreement(val_pos),
                         "train_items": disagreement(train_pos)},
        "label_stats": {kind: _score_stats(scores[kind]) for kind in scores},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    return BuiltDataset(train=train, test=test, val=val, config=resolved, labels=labels, extra=extra,
                        disjoint_prompts=("train", "val", "test"))


build.Config = ImdbConfig  # validated at plan time: a typo in `data.config` fails `--dry-run`
