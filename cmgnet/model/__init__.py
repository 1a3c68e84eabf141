"""CMG-Net and baselines; build by name with :func:`create_model`."""

from .base import SegmentationModel, create_model, list_models, register_model
from .cmfm import CrossModalFusion, TextAdditionFusion
from .cmgnet import CMGNet, UNet
from .config import CMGNetConfig, UNetConfig
from .masa import MultiAxisSelfAttention
from . import baselines  # noqa: F401  (registers unetplusplus, transunet, swinunet, guidedecoder, lvit)

__all__ = [
    "CMGNet",
    "CMGNetConfig",
    "CrossModalFusion",
    "MultiAxisSelfAttention",
    "SegmentationModel",
    "TextAdditionFusion",
    "UNet",
    "UNetConfig",
    "create_model",
    "list_models",
    "register_model",
]
