"""Augmentation: per-sample parameter draws and their two implementations (PyTorch, DALI).

:mod:`.params` draws the numbers, :mod:`.torch_ops` applies them with PyTorch and
:mod:`.dali_pipeline` (imported on demand; needs ``nvidia-dali``) with DALI.
"""

from .params import AUGMENTS, NUM_VARIANTS, AugmentParams, TransformSpec, sample_params, variant_params
from .torch_ops import apply_transform

__all__ = [
    "AUGMENTS",
    "NUM_VARIANTS",
    "AugmentParams",
    "TransformSpec",
    "apply_transform",
    "sample_params",
    "variant_params",
]
