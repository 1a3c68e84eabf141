"""CMG-Net and baselines; build by name with :func:`create_model`."""

from .base import SegmentationModel, convert_config, create_model, list_models, model_class, register_model
from .cmfm import CrossModalFusion, TextAdditionFusion
from .cmgnet import CMGNet
from .config import CMGNetConfig, UNetConfig
from .masa import MultiAxisSelfAttention
from .unet import UNet
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
    "convert_config",
    "create_model",
    "list_models",
    "model_class",
    "register_model",
]
