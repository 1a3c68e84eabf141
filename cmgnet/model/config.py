"""Model configuration (one dataclass; every field is a plain JSON/YAML value)."""

from __future__ import annotations

from dataclasses import dataclass

from cmgnet.text.encoder import DEFAULT_TEXT_MODEL


@dataclass
class CMGNetConfig:
    """CMG-Net hyper-parameters (DESIGN section 2).

    Args:
        in_channels: image channels.
        base_width: encoder widths are ``base_width * [1, 2, 4, ..., 2**depth]`` (paper: 64).
        depth: number of 2x down-samplings; H and W must be multiples of ``2**depth``.
        bilinear: bilinear up-sampling + 1x1 conv instead of transposed convs.
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
        fusion_scales: down-sampling factors where CMFM runs (``2**depth`` is the bottleneck).
        fusion_layers: stacked CMFM layers per scale (paper: "multiple Transformer layers").
    """

    in_channels: int = 3
    base_width: int = 64
    depth: int = 4
    bilinear: bool = False
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
        self.fusion_scales = tuple(int(s) for s in self.fusion_scales)
        self.fusion_layers = tuple(int(n) for n in self.fusion_layers)
        if len(self.fusion_scales) != len(self.fusion_layers):
            raise ValueError("fusion_scales and fusion_layers must have the same length")
        valid = {2**i for i in range(self.depth + 1)}
        if bad := [s for s in self.fusion_scales if s not in valid]:
            raise ValueError(f"fusion_scales {bad} are not among the network's scales {sorted(valid)}")
        if not 0.0 <= self.modality_dropout <= 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1], got {self.modality_dropout}")

    @property
    def widths(self) -> list[int]:
        return [self.base_width * 2**i for i in range(self.depth + 1)]

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this."""
        return 2**self.depth


@dataclass
class UNetConfig(CMGNetConfig):
    """The U-Net baseline: every CMG-Net addition switched off."""

    masa: bool = False
    text: bool = False
    cmfm: bool = False
    alpha: bool = False
