"""Text branch: frozen BERT features (cached) + a trainable projection to the fusion width."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cmgnet.text import NEUTRAL_SENTENCE, TextEncoder, TextFeatureCache


class TextBranch(nn.Module):
    """Sentences or precomputed encoder features -> ``(F_T: B x L x D, mask: B x L)``.

    Args:
        model_id, max_length, freeze: passed to :class:`~cmgnet.text.TextEncoder`.
        out_dim: fusion width ``D``.
        modality_dropout: training-time probability per sample of using the neutral sentence.
        cache_dir: optional on-disk feature cache.
    """

    def __init__(
        self,
        model_id: str,
        max_length: int,
        freeze: bool,
        out_dim: int,
        modality_dropout: float = 0.0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.encoder = TextEncoder(model_id, max_length, freeze, TextFeatureCache(cache_dir))
        self.proj = nn.Linear(self.encoder.hidden_size, out_dim)
        self.modality_dropout = modality_dropout

    def forward(
        self,
        batch_size: int,
        sentences: Sequence[str] | None = None,
        features: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if features is None:
            sentences = list(sentences) if sentences is not None else [NEUTRAL_SENTENCE] * batch_size
            if len(sentences) != batch_size:
                raise ValueError(f"got {len(sentences)} sentences for a batch of {batch_size} images")
            if self.training and self.modality_dropout > 0:
                drop = (torch.rand(batch_size) < self.modality_dropout).tolist()
                sentences = [NEUTRAL_SENTENCE if d else s for s, d in zip(sentences, drop)]
            features, mask = self.encoder(sentences)
        elif mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        return self.proj(features), mask.bool()
