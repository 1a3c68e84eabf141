"""Attention ops for CMG-Net behind one dispatch point.

Every attention in the model goes through the functions exported here. Each op has a
PyTorch reference (`reference.py`); `dispatch.py` picks the implementation per call:
the manual reference path, PyTorch's fused ``scaled_dot_product_attention`` (SDPA), or a
Triton kernel where the benchmark table says it wins. Installed as ``cmgnet.kernels``.
"""

from .dispatch import attention, axial_attention, channel_attention, get_backend, set_backend, use_backend

__all__ = [
    "attention",
    "axial_attention",
    "channel_attention",
    "get_backend",
    "set_backend",
    "use_backend",
]
