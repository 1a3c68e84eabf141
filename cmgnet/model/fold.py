"""Fold inference-mode BatchNorm into the convolution before it, for eager CPU inference.

In eval mode ``BN(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` and
``b' = (b - m) * g / sqrt(v + eps) + beta``, so each folded pair saves a full pass over the
activation. On a 2-core CPU that pass is memory-bound and grows faster than the batch
(README, Latency); ONNX Runtime and TensorRT fold the same way when they build their graphs.
The arithmetic is :func:`torch.nn.utils.fusion.fuse_conv_bn_eval`'s.

A pair is folded only where the convolution's output feeds nothing but the BatchNorm:
consecutive children of an ``nn.Sequential``, and attribute pairs that a module class
declares with :func:`register_conv_bn_pairs` (an encoder whose blocks call them in order).
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_PAIRS: dict[type, tuple[tuple[str, str], ...]] = {}


def register_conv_bn_pairs(cls: type, pairs: tuple[tuple[str, str], ...]) -> None:
    """Declare that ``cls.forward`` feeds each ``(conv, bn)`` attribute pair's conv only into its BN."""
    _PAIRS[cls] = pairs


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eligible BatchNorm into its convolution, in place; return how many.

    The model must be in eval mode (training-mode BatchNorm uses batch statistics, which
    cannot be folded). Folded BatchNorms become ``nn.Identity``.

    Raises:
        ValueError: ``model`` is in training mode.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode")
    folded = 0
    for module in list(model.modules()):
        for conv_name, bn_name in _PAIRS.get(type(module), ()):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if _foldable(conv, bn):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
                folded += 1
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in zip(names, names[1:]):
                conv, bn = module._modules[first], module._modules[second]
                if _foldable(conv, bn):
                    module._modules[first] = fuse_conv_bn_eval(conv, bn)
                    module._modules[second] = nn.Identity()
                    folded += 1
    return folded


def _foldable(conv: object, bn: object) -> bool:
    return isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
