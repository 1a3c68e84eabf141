"""Pseudo-text from lesion metadata (CMG-Net paper, section 3.3)."""

NEUTRAL_SENTENCE = "Skin lesion."
