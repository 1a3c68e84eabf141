"""Augmentation: per-sample parameter draws and their two implementations (PyTorch, DALI).

:mod:`.params` draws the numbers, :mod:`.torch_ops` applies them with PyTorch and
:mod:`.dali_pipeline` (imported on demand; needs ``nvidia-dali``) with DALI.
"""

from typing import TYPE_CHECKING

from cmgnet._lazy import lazy_exports

from .params import AUGMENTS, NUM_VARIANTS, AugmentParams, TransformSpec, sample_params, variant_params

if TYPE_CHECKING:
    from .torch_ops import apply_transform, preprocess_image

# torch loads with the first transform, not with the config's list of augment names.
__getattr__, __dir__ = lazy_exports(__name__, {"apply_transform": ".torch_ops", "preprocess_image": ".torch_ops"})

__all__ = [
    "AUGMENTS",
    "NUM_VARIANTS",
    "AugmentParams",
    "TransformSpec",
    "apply_transform",
    "preprocess_image",
    "sample_params",
    "variant_params",
]
