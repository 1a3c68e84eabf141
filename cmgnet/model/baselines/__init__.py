"""Baselines of the comparison (paper tables 1-2), registered by name for :func:`cmgnet.model.create_model`.

========================  =================  ==============================================
name                      class              source
========================  =================  ==============================================
``unetplusplus``          UNetPlusPlus       MONAI ``BasicUNetPlusPlus`` (Zhou et al. 2018)
``transunet``             TransUNet          project U-Net + MONAI ViT blocks (Chen et al. 2021)
``swinunet``              SwinUNet           MONAI ``SwinUNETR``, 2D (for Cao et al. 2022)
``guidedecoder``          GuideDecoderNet    re-implementation (Zhong et al., MICCAI 2023)
``lvit``                  LViTNet            re-implementation (Li et al., TMI 2023)
========================  =================  ==============================================

The plain U-Net is ``unet`` (:mod:`cmgnet.model.cmgnet`). Each file's docstring says where
the model differs from its paper.
"""

from .guidedecoder import GuideDecoderConfig, GuideDecoderNet
from .lvit import LViTConfig, LViTNet
from .swinunet import SwinUNet, SwinUNetConfig
from .transunet import TransUNet, TransUNetConfig
from .unetplusplus import UNetPlusPlus, UNetPlusPlusConfig

__all__ = [
    "GuideDecoderConfig",
    "GuideDecoderNet",
    "LViTConfig",
    "LViTNet",
    "SwinUNet",
    "SwinUNetConfig",
    "TransUNet",
    "TransUNetConfig",
    "UNetPlusPlus",
    "UNetPlusPlusConfig",
]
