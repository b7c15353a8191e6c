"""Model helpers: a tiny offline causal LM (tokenizer + Llama) SFT'd through OpenRLHF."""

from .tiny import MARKER, build_tiny_lm, demo_sentences, is_built, read_build_info

__all__ = ["MARKER", "build_tiny_lm", "demo_sentences", "is_built", "read_build_info"]
