"""Text side of CMG-Net: pseudo-text from metadata and the (cached) BERT encoder."""

from typing import TYPE_CHECKING

from cmgnet._lazy import lazy_exports

from .pseudo_text import NEUTRAL_SENTENCE

if TYPE_CHECKING:
    from .encoder import DEFAULT_TEXT_MODEL, TINY_TEXT_MODEL, TextEncoder, TextFeatureCache

# The encoder (torch, transformers) loads on first use: the CLI's --help stays fast.
__getattr__, __dir__ = lazy_exports(__name__, {name: ".encoder" for name in (
    "DEFAULT_TEXT_MODEL", "TINY_TEXT_MODEL", "TextEncoder", "TextFeatureCache")})

__all__ = ["DEFAULT_TEXT_MODEL", "NEUTRAL_SENTENCE", "TINY_TEXT_MODEL", "TextEncoder", "TextFeatureCache"]
