"""Encoder interface and registry."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from cmgnet.inference import IMAGENET_MEAN, IMAGENET_STD


ENCODERS: dict[str, Callable[..., Encoder]] = {}
"""Encoder name -> factory ``(in_channels, weights, **options) -> Encoder``."""


class Encoder(nn.Module):
    """Image -> multi-scale features.

    Subclasses set ``out_channels`` and ``strides`` (one entry per returned map, shallowest
    first, strides increasing by 2x) and the normalisation ``mean`` / ``std`` of images
    scaled to 0..1 that their weights were trained with.
    """

    out_channels: tuple[int, ...]
    strides: tuple[int, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def output_stride(self) -> int:
        """Input sides must be multiples of this (the bottleneck's stride)."""
        return self.strides[-1]

    def forward(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def register_encoder(*names: str):
    """Decorator: make a factory buildable by :func:`create_encoder` under ``names``."""

    def wrap(factory):
        for name in names:
            if name in ENCODERS:
                raise ValueError(f"encoder {name!r} registered twice")
            ENCODERS[name] = factory
        return factory

    return wrap


def list_encoders() -> list[str]:
    return sorted(ENCODERS)


def _factory(name: str) -> Callable[..., Encoder]:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; available: {', '.join(list_encoders())}")
    return ENCODERS[name]


def create_encoder(name: str, in_channels: int = 3, weights: str | None = None, **options) -> Encoder:
    """Build a registered encoder.

    Args:
        name: an entry of :func:`list_encoders` (``unet``, ``efficientnet-lite0``, ...).
        in_channels: image channels.
        weights: ``"imagenet"`` for pretrained weights, ``None``/``"none"`` for random init.
        **options: encoder-specific options (``unet``: ``widths``).

    Returns:
        The encoder.
    """
    weights = None if weights in (None, "", "none") else weights
    return _factory(name)(in_channels=in_channels, weights=weights, **options)


def encoder_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the named encoder's weights expect (without building it)."""
    cls = getattr(_factory(name), "encoder_class", Encoder)
    return tuple(cls.mean), tuple(cls.std)
