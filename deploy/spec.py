"""The deployment bundle: file names and the ``deploy.json`` spec every backend reads.

``cmgnet export`` writes one folder per model::

    <bundle>/
      deploy.json               DeploySpec: input names, image size, normalisation, crop, threshold, text encoder
                                (derived from the checkpoint's inference.json, see cmgnet.inference)
      model.onnx                image + text features + text mask -> logits (ONNX Runtime, TensorRT's parser)
      model.int8.onnx           optional: conv layers quantised to int8 for CPU serving
      model.engine(.json)       optional: TensorRT engine + the metadata checked when it is loaded
      model_trt.ep(.json)       optional: torch-tensorrt ExportedProgram + metadata
      text_cache/               text encoder features of the standard sentences (TextFeatureCache)
      text_encoder.safetensors  only when the text encoder was fine-tuned (not the published weights)

The network never runs the text encoder: the ONNX graph and the engines take the encoder's
last hidden states (``B x L x D_t``, padded to ``text.max_length`` tokens) and their mask.
The runtime computes those with :class:`cmgnet.text.TextEncoder` once per distinct sentence,
served from ``text_cache/`` for the neutral sentence and the diagnosis templates.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmgnet.inference import IMAGENET_MEAN, IMAGENET_STD, InferenceRecord, record_for_model, validate_fields
from cmgnet.integrity import file_sha256  # noqa: F401 - re-exported for the engines and programs

from .errors import DeployError

SPEC_NAME = "deploy.json"
ONNX_NAME = "model.onnx"
INT8_ONNX_NAME = "model.int8.onnx"
ENGINE_NAME = "model.engine"
TORCH_TRT_NAME = "model_trt.ep"
TEXT_CACHE_DIR = "text_cache"
TEXT_WEIGHTS_NAME = "text_encoder.safetensors"

IMAGE_INPUT = "image"
TEXT_INPUTS = ("text_features", "text_mask")
OUTPUT_NAME = "logits"
DEFAULT_IMAGE_SIZE = 256
DEFAULT_THRESHOLD = 0.5
DEFAULT_OPSET = 18  # the lowest opset PyTorch's torch.export-based exporter emits; TensorRT >= 10 parses it
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt", "torch-tensorrt")
SEGMENTER_TEXT_REGIMES = ("none", "metadata", "oracle")  # "predicted" needs a classifier, not part of serving

_FORMAT = "cmgnet-deploy"
_VERSION = 1


@dataclass(frozen=True)
class TextSpec:
    """How the runtime turns sentences into the network's text inputs.

    Args:
        model_id: text encoder id (see :mod:`cmgnet.text.encoder`).
        max_length: tokens per sentence; features are padded to exactly this many.
        hidden_size: ``D_t``, the encoder's hidden width (the last dim of ``text_features``).
        weights: bundle file with fine-tuned encoder weights, or ``None`` for the published ones.
        cache: bundle folder with precomputed features, or ``None``.
    """

    model_id: str
    max_length: int
    hidden_size: int
    weights: str | None = None
    cache: str | None = None


@dataclass(frozen=True)
class DeploySpec:
    """Everything outside the network that a backend needs to reproduce the model's output.

    Args:
        model: registered model name (``cmgnet``, ``unet``, ...).
        image_size: ``(height, width)`` the image is resized to before the network.
        stride: input sides must be multiples of this.
        mean: per-channel normalisation mean of images scaled to 0..1.
        std: per-channel normalisation standard deviation.
        threshold: probability above which a pixel is lesion.
        text: the text encoder, or ``None`` for an image-only network.
        opset: ONNX opset of ``model.onnx`` (``None`` before export).
        model_config: the network's config (provenance only).
        center_crop: crop the centred square before resizing (as in training); the mask is
            pasted back into the crop, background outside it.
        text_regime: default regime turning metadata records into sentences.
        tta: flip test-time augmentation by default.
        postprocess: mask post-processing (:mod:`cmgnet.model.postprocess`).
    """

    model: str
    image_size: tuple[int, int]
    stride: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    threshold: float = DEFAULT_THRESHOLD
    text: TextSpec | None = None
    opset: int | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    center_crop: bool = False
    text_regime: str = "metadata"
    tta: bool = False
    postprocess: str = "none"

    def __post_init__(self) -> None:
        fields = {k: getattr(self, k) for k in ("mean", "std", "threshold", "center_crop", "tta", "postprocess")}
        if problems := validate_fields(fields):
            raise DeployError("; ".join(problems))
        if not (isinstance(self.image_size, tuple) and len(self.image_size) == 2):
            raise DeployError(f"image_size must be [height, width], got {self.image_size!r}")
        height, width = self.image_size
        if height <= 0 or width <= 0 or height % self.stride or width % self.stride:
            raise DeployError(f"image size {height}x{width} must be positive multiples of {self.stride}")

    @property
    def input_names(self) -> tuple[str, ...]:
        """Network inputs in call order."""
        return (IMAGE_INPUT, *TEXT_INPUTS) if self.text is not None else (IMAGE_INPUT,)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (with format and version tags)."""
        return {"format": _FORMAT, "version": _VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str | Path = "<dict>") -> DeploySpec:
        """Inverse of :meth:`to_json`.

        Raises:
            DeployError: not a deploy spec, an unknown version or a missing field (naming ``source``).
        """
        if not isinstance(data, dict):
            raise DeployError(f"{source}: expected a JSON object, got {type(data).__name__}; re-export with `cmgnet export`")
        if data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise DeployError(
                f"{source}: not a cmgnet deploy spec of version {_VERSION} "
                f"(format={data.get('format')!r}, version={data.get('version')!r}); re-export with `cmgnet export`"
            )
        # Checked key by key first: a 1-element mean must be refused here, not fail every image later.
        if problems := validate_fields({k: data[k] for k in ("image_size", "mean", "std", "threshold", "stride",
                                                              "center_crop", "tta", "postprocess") if k in data}):
            raise DeployError(f"{source}: malformed deploy spec: {'; '.join(problems)}; re-export with `cmgnet export`")
        try:
            text = TextSpec(**data["text"]) if data.get("text") is not None else None
            return cls(
                model=data["model"], image_size=tuple(data["image_size"]), stride=int(data["stride"]),
                mean=tuple(data["mean"]), std=tuple(data["std"]), threshold=float(data["threshold"]), text=text,
                opset=data.get("opset"), model_config=data.get("model_config", {}),
                center_crop=data.get("center_crop", False), text_regime=data.get("text_regime", "metadata"),
                tta=data.get("tta", False), postprocess=data.get("postprocess", "none"),
            )
        except (KeyError, TypeError, ValueError) as err:
            what = f"missing key {err}" if isinstance(err, KeyError) else f"{err.__class__.__name__}: {err}"
            raise DeployError(f"{source}: malformed deploy spec ({what}); re-export with `cmgnet export`") from err

    def save(self, path: str | Path) -> Path:
        """Write the spec as JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> DeploySpec:
        """Read a spec written by :meth:`save`.

        Raises:
            DeployError: missing or unreadable file, or see :meth:`from_json`.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise DeployError(
                f"{path}: cannot read the deploy spec ({err}); export the model with `cmgnet export`"
            ) from err
        return cls.from_json(data, path)


def spec_for_model(
    model: Any,
    image_size: int | tuple[int, int] | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    threshold: float | None = None,
    *,
    record: InferenceRecord | None = None,
) -> DeploySpec:
    """The spec of an in-memory :class:`~cmgnet.model.SegmentationModel`, from its inference record.

    Args:
        model: the network (its config gives stride and text encoder).
        image_size: network input side, or ``(height, width)``; ``None``: the record's.
        mean, std: normalisation; ``None``: the record's.
        threshold: probability threshold of the mask; ``None``: the record's.
        record: the inference contract (default: ``model.inference``, else the defaults:
            256 px, ImageNet statistics, threshold 0.5).

    Returns:
        The spec, without text cache/weights entries (the exporter adds those).
    """
    config = model.config
    record = record or getattr(model, "inference", None) or record_for_model(model)
    if image_size is None:
        image_size = record.image_size
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    text = None
    if getattr(model, "text_branch", None) is not None:
        encoder = model.text_branch.encoder
        text = TextSpec(model_id=encoder.model_id, max_length=encoder.max_length, hidden_size=encoder.hidden_size)
    # "predicted" needs the diagnosis classifier, which serving does not run: default to metadata.
    regime = record.text_regime if record.text_regime in ("none", "metadata", "oracle") else "metadata"
    return DeploySpec(
        model=model.model_name, image_size=size, stride=getattr(config, "stride", record.stride),
        mean=tuple(record.mean if mean is None else mean), std=tuple(record.std if std is None else std),
        threshold=record.threshold if threshold is None else threshold, text=text,
        model_config=dataclasses.asdict(config), center_crop=record.center_crop, text_regime=regime, tta=record.tta,
        postprocess=record.postprocess,
    )
