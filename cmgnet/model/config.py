"""Model configuration (one dataclass; every field is a plain JSON/YAML value)."""

from __future__ import annotations

from dataclasses import dataclass

from cmgnet.errors import shown
from cmgnet.text.encoder import DEFAULT_TEXT_MODEL


@dataclass
class UNetConfig:
    """The image branch: encoder, U-Net decoder, 1-logit head (docs/design.md section 2.1).

    Args:
        in_channels: image channels.
        encoder: a :func:`~cmgnet.model.encoders.list_encoders` name: ``unet`` (the paper's
            from-scratch encoder) or ``efficientnet-lite0`` / ``-lite1`` / ``-lite2``.
        encoder_weights: ``imagenet`` (pretrained, EfficientNet-Lite only) or ``none``.
        base_width: ``unet`` encoder widths are ``base_width * [1, 2, 4, ..., 2**depth]`` (paper: 64).
        depth: ``unet`` encoder down-samplings; H and W must be multiples of :attr:`stride`.
        decoder_channels: decoder stage widths, deepest first (one per stride below the
            bottleneck down to 1); empty: the encoder's width at each stride.
        bilinear: bilinear up-sampling + 1x1 conv instead of transposed convs.
        freeze_encoder_bn: keep the encoder's BatchNorm statistics and affine values fixed
            (useful for pretrained encoders with small batches).
    """

    in_channels: int = 3
    encoder: str = "unet"
    encoder_weights: str = "none"
    base_width: int = 64
    depth: int = 4
    decoder_channels: tuple[int, ...] = ()
    bilinear: bool = False
    freeze_encoder_bn: bool = False

    def __post_init__(self) -> None:
        from .encoders import ENCODERS, list_encoders

        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {shown(self.encoder)}; available: {', '.join(list_encoders())}")
        if self.encoder_weights not in ("none", "imagenet"):
            raise ValueError(f"encoder_weights must be 'imagenet' or 'none', got {shown(self.encoder_weights)}")
        if self.encoder == "unet" and self.encoder_weights != "none":
            raise ValueError("the 'unet' encoder trains from scratch: set encoder_weights: none "
                             "or pick a pretrained encoder (efficientnet-lite0/1/2)")
        self.decoder_channels = tuple(int(c) for c in self.decoder_channels)

    @property
    def widths(self) -> list[int]:
        """``unet`` encoder widths, full resolution first."""
        return [self.base_width * 2**i for i in range(self.depth + 1)]

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this (the bottleneck's down-sampling factor)."""
        from .encoders import ENCODERS

        return getattr(ENCODERS[self.encoder], "output_stride", None) or 2**self.depth

    @property
    def scales(self) -> set[int]:
        """Down-sampling factors of the decoder's maps (1 .. :attr:`stride`)."""
        return {2**i for i in range(self.stride.bit_length())}


@dataclass
class CMGNetConfig(UNetConfig):
    """CMG-Net hyper-parameters (docs/design.md section 2): the :class:`UNetConfig` image branch plus
    MASA, the text branch and CMFM.

    Args:
        masa: multi-axis self-attention at the bottleneck (ablation switch).
        masa_heads: heads per MASA axis.
        text: use the text branch at all; ``False`` is the image-only network.
        text_model: text encoder id (see ``cmgnet.text.encoder``).
        text_max_length: tokens kept per sentence.
        freeze_text: keep the text encoder frozen (features cached, never in the hot loop).
        text_cache_dir: folder for the on-disk text feature cache (``None``: memory only).
        modality_dropout: training-time probability of replacing a sentence by the neutral one.
        cmfm: attention fusion (``False``: pooled text added to the maps; ablation switch).
        alpha: learned CMFM gate (``False``: fixed 0.5; ablation switch).
        fusion_dim: width of the projected text tokens and of the CMFM attention.
        fusion_heads: CMFM attention heads.
        fusion_scales: down-sampling factors where CMFM runs (:attr:`stride` is the bottleneck).
        fusion_layers: stacked CMFM layers per scale (paper: "multiple Transformer layers").
    """

    masa: bool = True
    masa_heads: int = 8
    text: bool = True
    text_model: str = DEFAULT_TEXT_MODEL
    text_max_length: int = 32
    freeze_text: bool = True
    text_cache_dir: str | None = None
    modality_dropout: float = 0.0
    cmfm: bool = True
    alpha: bool = True
    fusion_dim: int = 256
    fusion_heads: int = 8
    fusion_scales: tuple[int, ...] = (16, 8, 4)
    fusion_layers: tuple[int, ...] = (2, 1, 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.fusion_scales = tuple(int(s) for s in self.fusion_scales)
        self.fusion_layers = tuple(int(n) for n in self.fusion_layers)
        if len(self.fusion_scales) != len(self.fusion_layers):
            raise ValueError("fusion_scales and fusion_layers must have the same length")
        if bad := [s for s in self.fusion_scales if s not in self.scales]:
            raise ValueError(f"fusion_scales {bad} are not among the network's scales {sorted(self.scales)}")
        if not 0.0 <= self.modality_dropout <= 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1], got {self.modality_dropout}")
