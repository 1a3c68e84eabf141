"""Pluggable image encoders (the segmentation_models_pytorch convention).

An encoder maps ``B x C x H x W`` to a list of feature maps, shallowest first, the last being
the bottleneck; it states their channels, strides and the input normalisation its weights
expect. Build one by name with :func:`create_encoder`::

    enc = create_encoder("efficientnet-lite0", weights="imagenet")
    feats = enc(torch.randn(1, 3, 256, 256))   # strides 2, 4, 8, 16, 32
"""

from .base import ENCODERS, Encoder, create_encoder, encoder_normalization, list_encoders, register_encoder
from .efficientnet_lite import EfficientNetLiteEncoder
from .unet import UNetEncoder

__all__ = [
    "ENCODERS",
    "EfficientNetLiteEncoder",
    "Encoder",
    "UNetEncoder",
    "create_encoder",
    "encoder_normalization",
    "list_encoders",
    "register_encoder",
]
