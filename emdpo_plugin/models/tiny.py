"""A tiny causal LM built offline: BPE tokenizer + small Llama, SFT'd through OpenRLHF.

:func:`build_tiny_lm` trains a byte-level BPE tokenizer on the given texts (``tokenizers``),
wraps it as a ``PreTrainedTokenizerFast``, initialises a small ``LlamaConfig`` model, then
runs a short supervised fine-tuning on the same texts through OpenRLHF's own SFT path
(:func:`emdpo_plugin.host.tiny_sft.sft_through_openrlhf`), so the result is a real SFT model fit
to serve as the DPO reference. Nothing is downloaded; the folder loads offline with
``AutoTokenizer`` / ``AutoModelForCausalLM`` (``HF_HUB_OFFLINE=1``, ``attn_implementation="sdpa"``)
and with vLLM.

Each training text is ``text + " " + eos`` -- the same ending OpenRLHF's ``RewardDataset``
appends to DPO responses -- and no BOS is prepended (OpenRLHF tokenizes with
``add_special_tokens=False``), so the SFT model matches how DPO will score responses.

The build is keyed, not merely idempotent: ``out_dir`` is assembled in a temporary sibling
folder whose last file is :data:`MARKER` (JSON: config, the build's ``key``, losses, timings);
the folder is then renamed into place. An ``out_dir`` whose marker holds the same key (the same
config, seed and texts) is returned as is; one built from anything else is rebuilt and replaced,
never served for the new arguments.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from ..host.tiny_sft import sft_through_openrlhf

__all__ = ["build_tiny_lm", "build_key", "is_built", "read_build_info", "demo_sentences", "MARKER",
           "PAD_TOKEN", "BOS_TOKEN", "EOS_TOKEN"]

MARKER = "emdpo_tiny_lm.json"
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
_SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def is_built(out_dir: Path | str) -> bool:
    """True when ``out_dir`` holds a finished tiny LM (its marker file exists)."""
    return (Path(out_dir) / MARKER).is_file()


def build_key(texts: Sequence[str], config: dict[str, Any]) -> str:
    """Identity of a build: its config (sizes, steps, lr, seed) and the sha256 of its texts."""
    import hashlib

    from ..fingerprint import digest

    texts_sha = hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()
    return digest({"config": config, "texts_sha256": texts_sha}, length=32)


def read_build_info(out_dir: Path | str) -> dict[str, Any]:
    """The marker's JSON: ``config``, ``sft`` (``loss_before``, ``loss_after``, ``step_losses``), ``timings_s``."""
    return json.loads((Path(out_dir) / MARKER).read_text())


def demo_sentences(n: int = 200, seed: int = 0) -> list[str]:
    """``n`` short, distinct, template-generated English sentences (deterministic in ``seed``)."""
    rng = random.Random(seed)
    subj = ["the movie", "this film", "the story", "the acting", "the ending", "the music", "the cast",
            "the director", "the plot", "the script", "the camera work", "the sequel"]
    verb = ["was", "felt", "seemed", "looked", "turned out", "sounded"]
    adj = ["great", "boring", "wonderful", "terrible", "funny", "slow", "beautiful", "awful", "clever",
           "predictable", "moving", "dull", "brilliant", "weak", "charming", "messy"]
    adv = ["really", "quite", "very", "rather", "truly", "somewhat", "incredibly"]
    tail = ["and i loved it", "and i hated it", "from start to finish", "for most of the time",
            "in every scene", "despite the hype", "as i expected", "to my surprise", "overall"]
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        s = f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(adv)} {rng.choice(adj)} {rng.choice(tail)} ."
        if rng.random() < 0.5:
            s = s[:-2] + f", but {rng.choice(subj)} {rng.choice(verb)} {rng.choice(adj)} ."
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


# ---------------------------------------------------------------------------------------------

def _train_tokenizer(texts: Sequence[str], vocab_size: int, max_position: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=max_position,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        # plain-text turns, so OpenAI chat endpoints (vLLM, the router) work on the tiny model too
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_lm(
    texts: list[str],
    out_dir: Path,
    *,
    vocab_size: int = 2000,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 2,  # head_dim 32: the smallest vLLM's CPU attention supports
    max_position: int = 256,
    sft_steps: int = 150,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> Path:
    """Build (or reuse) a tiny SFT'd causal LM in ``out_dir`` and return ``out_dir``.

    ``sft_steps`` optimizer steps of ``batch_size`` texts each (the texts are repeated as
    needed; one OpenRLHF epoch), AdamW at ``lr`` with OpenRLHF's cosine-with-min-lr schedule,
    fp32, ZeRO 0. Deterministic for a given ``seed`` and thread count (bit-identical
    weights across runs, measured). ``vocab_size`` is an upper bound: BPE stops merging when
    pairs occurring at least twice run out (200 templated sentences give about 490 tokens).
    An ``out_dir`` holding a model built from the same arguments and texts (:func:`build_key`) is
    returned unchanged; one built from others is rebuilt and swapped in; a non-empty ``out_dir``
    without a marker raises ``FileExistsError``.
    Side effects: runs OpenRLHF's ``setup_distributed`` in this process (a 1-process gloo
    group stays initialised, and ``transformers.set_seed(seed)`` reseeds the global RNGs).
    """
    out_dir = Path(out_dir)
    texts = [str(t).strip() for t in texts if str(t).strip()]
    config = dict(vocab_size=vocab_size, hidden_size=hidden_size, layers=layers, heads=heads,
                  max_position=max_position, sft_steps=sft_steps, batch_size=batch_size, lr=lr, seed=seed,
                  n_texts=len(texts))
    key = build_key(texts, config)
    if is_built(out_dir) and read_build_info(out_dir).get("key") == key:
        return out_dir
    if not texts:
        raise ValueError("build_tiny_lm needs at least one text")
    if out_dir.exists() and any(out_dir.iterdir()) and not is_built(out_dir):
        raise FileExistsError(f"{out_dir} exists, is not empty and holds no finished tiny LM ({MARKER}); "
                              "remove it or choose another folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    timings: dict[str, float] = {}
    try:
        with tqdm(total=4, desc="tiny LM", unit="stage") as bar:
            t0 = time.perf_counter()
            bar.set_postfix_str("tokenizer")
            tokenizer = _train_tokenizer(texts, vocab_size, max_position)
            timings["tokenizer"] = time.perf_counter() - t0
            bar.update()

            t0 = time.perf_counter()
            bar.set_postfix_str("init model")
            init_dir = tmp / "init"
            _init_model(tokenizer, init_dir, hidden_size=hidden_size, layers=layers, heads=heads,
                        max_position=max_position, seed=seed)
            timings["init"] = time.perf_counter() - t0
            bar.update()

            t0 = time.perf_counter()
            bar.set_postfix_str("SFT (OpenRLHF)")
            sft = sft_through_openrlhf(init_dir, tmp / "model", texts, max_len=max_position,
                                       steps=sft_steps, batch_size=batch_size, lr=lr, seed=seed)
            timings["sft"] = time.perf_counter() - t0
            bar.update()

            t0 = time.perf_counter()
            bar.set_postfix_str("save")
            shutil.rmtree(init_dir)
            final = tmp / "model"
            for p in final.iterdir():
                shutil.move(str(p), str(tmp / p.name))
            final.rmdir()
            timings["save"] = time.perf_counter() - t0
            (tmp / MARKER).write_text(json.dumps({"format": "emdpo-tiny-lm/v1", "config": config, "key": key,
                                                  "sft": sft, "timings_s": timings}, indent=2))
            bar.update()
        _swap_in(tmp, out_dir, key)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _swap_in(tmp: Path, out_dir: Path, key: str) -> None:
    """Rename the finished `tmp` to `out_dir`; a model built from other arguments is moved aside
    first and deleted after (a kill in between leaves no `out_dir`: the next call builds)."""
    stale = out_dir.parent / f".{out_dir.name}.stale-{os.getpid()}"
    try:
        if is_built(out_dir):
            os.replace(out_dir, stale)
        elif out_dir.exists():
            out_dir.rmdir()  # empty (checked by the caller)
        os.replace(tmp, out_dir)
    except OSError:
        if not (is_built(out_dir) and read_build_info(out_dir).get("key") == key):  # a concurrent build won
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def _init_model(tokenizer, init_dir: Path, *, hidden_size: int, layers: int, heads: int,
                max_position: int, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by heads {heads}")
    if hidden_size // heads < 32:
        raise ValueError(f"head_dim = hidden_size / heads = {hidden_size // heads}; vLLM's CPU attention "
                         f"(serving, sampler: vllm) needs at least 32: use fewer heads or a larger hidden_size")
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        use_cache=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    del model
