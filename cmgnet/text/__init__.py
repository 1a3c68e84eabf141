"""Text side of CMG-Net: pseudo-text from metadata and the (cached) BERT encoder."""

from .encoder import DEFAULT_TEXT_MODEL, TINY_TEXT_MODEL, TextEncoder, TextFeatureCache
from .pseudo_text import NEUTRAL_SENTENCE

__all__ = ["DEFAULT_TEXT_MODEL", "NEUTRAL_SENTENCE", "TINY_TEXT_MODEL", "TextEncoder", "TextFeatureCache"]
