"""Where the pool of items comes from: an HF dataset, a table file (with generated completions), or the corpus."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from emdpo_plugin.errors import EmdpoError

from ..labellers import strip_markup
from .config import GeneratorConfig, ImdbConfig
from .corpus import ReviewCorpus
from .item import Item


def progress_disabled(progress: bool | None) -> bool | None:
    """tqdm's `disable` for the config's `progress` (None: a bar only on a terminal)."""
    return None if progress is None else not progress


def load_items(cfg: ImdbConfig, *, seed: int, corpus_seed: int, progress: bool | None) -> tuple[list[Item], dict[str, Any]]:
    """The pool of items from `source.kind`, and what the manifest says about the source."""
    if cfg.source.kind == "generated":
        return _generated_items(cfg, corpus_seed)
    if cfg.source.kind == "hf":
        return _hf_items(cfg)
    return _file_items(cfg, seed, progress)


# --------------------------------------------------------------------------- hf and file


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
    with tqdm(total=len(prompts), desc="generating completions", unit="prompt", disable=progress_disabled(progress)) as bar:
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


def _generated_items(cfg: ImdbConfig, seed: int) -> tuple[list[Item], dict[str, Any]]:
    src = cfg.source
    corpus = ReviewCorpus(seed, error_probs=src.error_probs, levels=src.sentiment_levels, sentences=src.sentences)
    n = src.pool_size + cfg.test_size + cfg.n_val
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
