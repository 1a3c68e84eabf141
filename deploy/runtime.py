"""One inference interface, :class:`Segmenter`, over every way the model is deployed.

Backends (``Segmenter.load(path, backend=...)``):

* ``torch``: a ``save_pretrained`` checkpoint directory (``config.json`` + ``model.safetensors``);
* ``onnxruntime``: ``model.onnx`` (or ``model.int8.onnx``) of an exported bundle, CPU or CUDA;
* ``tensorrt``: ``model.engine`` built by :func:`cmgnet.deploy.trt_engine.build_engine`;
* ``torch-tensorrt``: ``model_trt.ep`` compiled by :func:`cmgnet.deploy.torch_trt.compile_torch_tensorrt`.

Pre- and post-processing are the same code for all of them, so backends differ only in the
network's arithmetic:

1. decode to RGB ``uint8`` as a viewer shows the file (EXIF orientation applied, every
   pixel mode converted by :func:`cmgnet.data.imageio.to_array`); take the centred square
   if the model was trained with ``center_crop``; resize to the spec's image size with
   antialiased bilinear interpolation (the training pipeline's resize,
   ``cmgnet.data.augment.torch_ops``); normalise
   ``(x / 255 - mean) / std`` with the statistics the model was trained with;
2. text: a sentence, a metadata record (any object with ``diagnosis, age, sex, site,
   description``: made into a sentence by :func:`cmgnet.text.pseudo_text.make_sentence` under
   the segmenter's text regime) or nothing (the neutral sentence); encoded by the frozen text
   encoder (cached per sentence) and padded to the spec's ``max_length`` tokens;
3. ``sigmoid(logits)`` (averaged over flips with ``tta``) resized bilinearly back to the
   original image size (to the crop, background outside it, with ``center_crop``), then
   ``probability > threshold`` is the mask.

All of these settings come from the model's inference contract (``inference.json`` beside a
checkpoint's weights, ``deploy.json`` in a bundle; see :mod:`cmgnet.inference`). An explicit
argument that contradicts it raises :class:`cmgnet.errors.UsageError` unless ``force=True``.

Images go through the network in batches of ``batch_size`` (capped by an engine's largest
optimisation-profile batch).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from cmgnet.data.augment.params import crop_box
from cmgnet.data.imageio import DEFAULT_MAX_PIXELS, decode_image, read_encoded, to_array
from cmgnet.errors import load_safetensors
from cmgnet.inference import INFERENCE_NAME, resolve
from cmgnet.model import SegmentationModel
from cmgnet.model.base import CONFIG_NAME, WEIGHTS_NAME
from cmgnet.model.postprocess import check_mode, clean_mask
from cmgnet.text import NEUTRAL_SENTENCE, TextEncoder, TextFeatureCache
from cmgnet.text.pseudo_text import make_sentence

from .errors import BackendUnavailableError, DeployError
from .spec import (
    ENGINE_NAME,
    ONNX_NAME,
    OUTPUT_NAME,
    SPEC_NAME,
    TORCH_TRT_NAME,
    DeploySpec,
    TextSpec,
    spec_for_model,
)

from .spec import BACKENDS, SEGMENTER_TEXT_REGIMES  # noqa: E402 - defined beside the spec (torch-free)

ImageInput = str | Path | Image.Image | np.ndarray


@dataclass
class Prediction:
    """The segmentation of one image, at the image's original size.

    Attributes:
        mask: ``H x W`` bool, True for lesion.
        probability: ``H x W`` float32 lesion probability.
        sentence: the text the network was given (empty for an image-only network).
    """

    mask: np.ndarray
    probability: np.ndarray
    sentence: str


class Runner(Protocol):
    """A backend: normalised images (+ text inputs) -> ``B x 1 x h x w`` float32 CPU logits."""

    name: str
    max_batch: int | None

    def __call__(self, image: Tensor, text_features: Tensor | None, text_mask: Tensor | None) -> Tensor: ...


# ----------------------------------------------------------------------------- images


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to ``H x W x 3`` uint8 RGB as a viewer shows it (EXIF orientation applied).

    Args:
        path: the file.
        max_pixels: refuse images with more pixels (decoding them could exhaust memory).

    Returns:
        The RGB array.

    Raises:
        cmgnet.data.DataError: missing, truncated, undecodable or oversized file (names the file).
    """
    path = Path(path)
    return decode_image(read_encoded(path), path, max_pixels)


def as_rgb(image: ImageInput) -> np.ndarray:
    """Any accepted image input as ``H x W x 3`` uint8 RGB."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):  # the files' rules: EXIF orientation applied, every mode converted
        return to_array(image, getattr(image, "filename", "") or "<PIL image>")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB array, got shape {array.shape} dtype {array.dtype}")
    return array[..., :3]


def preprocess(images: Sequence[np.ndarray], spec: DeploySpec) -> Tensor:
    """RGB uint8 images of any sizes -> the normalised ``B x 3 x H x W`` float32 network input."""
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    batch = []
    for array in images:
        x = torch.tensor(array, dtype=torch.float32).permute(2, 0, 1)[None]
        if spec.center_crop:
            top, left, side = crop_box(*array.shape[:2])
            x = x[..., top : top + side, left : left + side]
        # Same resize as training (antialiased bilinear on 0..255 values, none at the same size),
        # so inputs match what the model saw.
        if tuple(x.shape[-2:]) != tuple(spec.image_size):
            x = F.interpolate(x, size=spec.image_size, mode="bilinear", antialias=True, align_corners=False)
        batch.append(x)
    return (torch.cat(batch) - mean) / std


def postprocess(
    logits: Tensor, sizes: Sequence[tuple[int, int]], threshold: float, center_crop: bool = False,
    mode: str = "none",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``B x 1 x h x w`` logits -> ``(probability, mask)`` per image at its original ``(H, W)``.

    With ``center_crop`` the network saw the centred square only: its output is resized to
    that square and placed there; the rest of the image has probability 0. ``mode`` cleans
    the thresholded mask (:func:`cmgnet.model.postprocess.clean_mask`).
    """
    probability = torch.sigmoid(logits.float())
    out = []
    for i, size in enumerate(sizes):
        top, left, (height, width) = 0, 0, tuple(size)
        if center_crop:
            top, left, side = crop_box(height, width)
            height = width = side
        # Resize probabilities, not the binary mask: the boundary lands between model pixels, not on them.
        p = probability[i : i + 1]
        if tuple(p.shape[-2:]) != (height, width):
            p = F.interpolate(p, size=(height, width), mode="bilinear", align_corners=False)
        p = p[0, 0].numpy()
        if center_crop:
            full = np.zeros(tuple(size), dtype=np.float32)
            full[top : top + height, left : left + width] = p
            p = full
        out.append((p, clean_mask(p > threshold, mode)))
    return out


# ----------------------------------------------------------------------------- backends


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when PyTorch sees a GPU, else ``"cpu"``; other values pass through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class TorchRunner:
    """PyTorch eager inference of an in-memory model.

    Args:
        model: the network (put in eval mode and moved to ``device``).
        device: ``"cpu"``, ``"cuda"``, ...
        precision: ``"fp32"``, or ``"fp16"``/``"bf16"`` autocast on CUDA.
    """

    name = "torch"
    max_batch = None

    def __init__(self, model: SegmentationModel, device: str = "cpu", precision: str = "fp32") -> None:
        if precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {device!r} requested but PyTorch sees no CUDA GPU; use device 'cpu'")
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.autocast = None if precision == "fp32" else {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]

    def __call__(self, image: Tensor, text_features: Tensor | None, text_mask: Tensor | None) -> Tensor:
        args = [image] if text_features is None else [image, text_features, text_mask]
        args = [a.to(self.device, non_blocking=True) for a in args]
        autocast = torch.autocast(self.device.type, self.autocast) if self.autocast else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return self.model(*args).float().cpu()


def onnxruntime_session(path: str | Path, device: str = "cpu", num_threads: int | None = None) -> Any:
    """An ONNX Runtime session tuned for latency.

    Args:
        path: the ``.onnx`` file.
        device: ``"cpu"`` or ``"cuda"`` (needs the ``onnxruntime-gpu`` package).
        num_threads: intra-op threads; ``None`` keeps ONNX Runtime's default (one per physical core).

    Returns:
        ``onnxruntime.InferenceSession``.

    Raises:
        BackendUnavailableError: ONNX Runtime or its CUDA provider is not installed.
        DeployError: the file is not a loadable ONNX model (garbage, truncated, wrong opset).
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise BackendUnavailableError("ONNX Runtime is not installed: pip install 'cmgnet[deploy]'") from err
    options = ort.SessionOptions()
    # ENABLE_ALL adds the layout (NCHWc) and hardware-specific fusions on top of constant folding
    # and conv+BN+activation fusion; session creation takes a little longer, inference is faster.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The network is one chain of dependent ops: parallelism comes from inside each op, and a
    # second (inter-op) pool would only compete with it for the same cores.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if num_threads:
        options.intra_op_num_threads = num_threads
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailableError(
                "ONNX Runtime has no CUDA provider here (install onnxruntime-gpu instead of onnxruntime), "
                "or run on --device cpu"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"{path}: no such ONNX file")
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # noqa: BLE001 - ORT raises pybind types (InvalidProtobuf, Fail) outside any hierarchy
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DeployError(f"{path}: not a loadable ONNX model ({err.__class__.__name__}: {detail}); "
                          "re-export it with `cmgnet export`") from err


class OnnxRuntimeRunner:
    """ONNX Runtime inference of an exported ``.onnx`` file.

    Args:
        path: the model file.
        device: ``"cpu"`` or ``"cuda"``.
        num_threads: intra-op threads (``None``: one per physical core).
    """

    name = "onnxruntime"
    max_batch = None

    def __init__(self, path: str | Path, device: str = "cpu", num_threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = onnxruntime_session(self.path, device, num_threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, image: Tensor, text_features: Tensor | None, text_mask: Tensor | None) -> Tensor:
        given = {"image": image, "text_features": text_features, "text_mask": text_mask}
        missing = [n for n in self.input_names if given.get(n) is None]
        if missing:
            raise DeployError(f"{self.path}: the model needs inputs {missing} that were not given")
        feeds = {name: given[name].numpy() for name in self.input_names}
        return torch.from_numpy(self.session.run([OUTPUT_NAME], feeds)[0])


# ----------------------------------------------------------------------------- text


def bundle_text_encoder(text: TextSpec, folder: Path) -> TextEncoder:
    """The frozen text encoder described by a spec, with the bundle's feature cache.

    Args:
        text: the spec's text section.
        folder: the folder the spec's relative ``weights``/``cache`` paths are in.

    Returns:
        A :class:`~cmgnet.text.TextEncoder` in eval mode.

    Raises:
        DeployError: its hidden size differs from the one the network was exported with.
    """
    cache = TextFeatureCache(folder / text.cache) if text.cache else None
    if cache is not None:
        cache.get(text.model_id, NEUTRAL_SENTENCE)  # read the cache file now: a corrupt one fails at load, by name
    encoder = TextEncoder(text.model_id, text.max_length, freeze=True, cache=cache)
    if text.weights:
        path = folder / text.weights
        try:
            encoder.backbone.load_state_dict(load_safetensors(path, "text encoder weights"))
        except RuntimeError as err:
            raise DeployError(f"{path}: weights do not fit text encoder {text.model_id!r} ({err.__class__.__name__}); "
                              "re-export") from err
    if encoder.hidden_size != text.hidden_size:
        raise DeployError(
            f"text encoder {text.model_id!r} has hidden size {encoder.hidden_size}, but the network was exported "
            f"for {text.hidden_size}: the bundle and the installed text model disagree; re-export"
        )
    return encoder.eval()


def _pad_tokens(features: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    # Engines are built for exactly `length` tokens; padded tokens are masked, so results do not change.
    extra = length - features.shape[1]
    if extra < 0:
        raise DeployError(f"text has {features.shape[1]} tokens, more than the exported {length}")
    return F.pad(features, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


# ----------------------------------------------------------------------------- segmenter


class Segmenter:
    """Images (+ text) -> masks at the original image size, through any backend.

    Args:
        runner: the backend (see :class:`Runner`).
        spec: pre/post-processing and text encoder description.
        text_encoder: the frozen text encoder (``None`` for image-only networks).
        batch_size: images per network call.
        threshold: mask threshold (``None``: the spec's, i.e. the one the model was evaluated with).
        text_regime: how metadata records become sentences: ``none``, ``metadata`` (age,
            sex, site only) or ``oracle`` (also the record's diagnosis); ``None``: the spec's.
        tta: average the logits over flips (``cmgnet.model.tta``); ``None``: the spec's.
        postprocess: mask post-processing (:mod:`cmgnet.model.postprocess`); ``None``: the spec's.
        source: the model file, named when the network returns NaN or inf (``None``: in memory).

    Example:
        >>> seg = Segmenter.load("exported/model.onnx")
        >>> [p] = seg.predict(["lesion.jpg"], "Asymmetric lesion with irregular borders and multiple colors.")
        >>> p.mask.shape  # the image's own (height, width)
    """

    def __init__(
        self,
        runner: Runner,
        spec: DeploySpec,
        text_encoder: TextEncoder | None = None,
        *,
        batch_size: int = 8,
        threshold: float | None = None,
        text_regime: str | None = None,
        tta: bool | None = None,
        postprocess: str | None = None,
        source: str | Path | None = None,
    ) -> None:
        text_regime = spec.text_regime if text_regime is None else text_regime
        if text_regime not in SEGMENTER_TEXT_REGIMES:
            raise ValueError(f"text_regime must be one of {SEGMENTER_TEXT_REGIMES}, got {text_regime!r}")
        if spec.text is not None and text_encoder is None:
            raise DeployError("this network takes text: pass its text encoder")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.runner = runner
        self.spec = spec
        self.text_encoder = text_encoder
        self.batch_size = min(batch_size, runner.max_batch or batch_size)
        self.threshold = spec.threshold if threshold is None else threshold
        self.text_regime = text_regime
        self.tta = spec.tta if tta is None else bool(tta)
        self.postprocess = check_mode(spec.postprocess if postprocess is None else postprocess)
        self.source = source

    @property
    def backend(self) -> str:
        """Name of the backend running the network."""
        return self.runner.name

    @classmethod
    def from_model(
        cls,
        model: SegmentationModel,
        *,
        image_size: int | tuple[int, int] | None = None,
        device: str = "cpu",
        precision: str = "fp32",
        spec: DeploySpec | None = None,
        **kwargs: Any,
    ) -> Segmenter:
        """A PyTorch segmenter around an in-memory model (``kwargs`` as in the constructor).

        The preprocessing is the model's inference record (``model.inference``) unless a
        ``spec`` is given; ``image_size`` replaces the record's size.
        """
        spec = spec or spec_for_model(model, image_size)
        encoder = model.text_branch.encoder if getattr(model, "text_branch", None) is not None else None
        return cls(TorchRunner(model, resolve_device(device), precision), spec, encoder, **kwargs)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        backend: str = "auto",
        device: str = "auto",
        num_threads: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        force: bool = False,
        **kwargs: Any,
    ) -> Segmenter:
        """Open a checkpoint, an exported bundle or one of its model files.

        Preprocessing, threshold, text regime and TTA come from the model's inference contract
        (the checkpoint's ``inference.json``, the bundle's ``deploy.json``); a checkpoint saved
        without one gets the defaults (256 px, ImageNet statistics, threshold 0.5).

        Args:
            path: a shipped model name (``cmgnet.shipped``); a ``save_pretrained`` checkpoint
                directory (PyTorch); an exported bundle directory (``deploy.json``); or a
                ``.onnx``, ``.engine``/``.plan`` or ``.ep`` file.
            backend: one of :data:`BACKENDS`. ``auto`` picks the file's own backend; for a
                bundle, the TensorRT engine when it exists and TensorRT and a GPU are present,
                else ONNX Runtime.
            device: ``auto``, ``cpu`` or ``cuda`` (TensorRT always runs on the GPU).
            num_threads: ONNX Runtime intra-op threads.
            image_size, mean, std: preprocessing; ``None`` (default) takes the recorded values.
            force: accept ``image_size``/``mean``/``std``/``threshold``/``text_regime``/``tta``/
                ``postprocess`` values that contradict the record (with a warning) instead of raising.
            **kwargs: ``batch_size``, ``threshold``, ``text_regime``, ``tta``, ``postprocess`` (see
                the constructor).

        Returns:
            The segmenter.

        Raises:
            DeployError: the path is none of the above, or the backend does not fit it.
            BackendUnavailableError: the backend's library or GPU is missing.
            EngineMismatchError: an engine built for another TensorRT version or GPU.
            UsageError: an explicit setting contradicts the record and ``force`` is off.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        path = resolve_model_path(path)
        if not path.exists():
            raise DeployError(f"{path}: no such file or directory")
        given = {"image_size": (image_size,) * 2 if isinstance(image_size, int) else image_size,
                 "mean": mean, "std": std, "threshold": kwargs.pop("threshold", None),
                 "text_regime": kwargs.pop("text_regime", None), "tta": kwargs.pop("tta", None),
                 "postprocess": kwargs.pop("postprocess", None)}
        if path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
            if backend not in ("auto", "torch"):
                raise DeployError(
                    f"{path} is a PyTorch checkpoint; export it (`cmgnet export`) to use backend {backend!r}"
                )
            model = SegmentationModel.from_pretrained(path)
            # Without a record the defaults are only guesses: explicit values replace them unchecked.
            spec = _apply(spec_for_model(model), given, path / INFERENCE_NAME, force, checked=model.inference is not None)
            return cls.from_model(model, spec=spec, device=device, source=path / WEIGHTS_NAME, **kwargs)
        file, backend = _resolve_model_file(path, backend)
        device = resolve_device(device)
        if backend == "onnxruntime":
            spec = DeploySpec.load(file.parent / SPEC_NAME)
            runner: Runner = OnnxRuntimeRunner(file, device, num_threads)
            _check_inputs(spec, runner.input_names, file.parent / SPEC_NAME, file)
        elif backend == "tensorrt":
            from .trt_engine import TensorRTRunner

            runner = TensorRTRunner(file)
            spec = runner.metadata.spec
        else:
            from .torch_trt import TorchTensorRTRunner

            runner = TorchTensorRTRunner(file)
            spec = runner.metadata.spec
        spec = _apply(spec, given, file.parent / SPEC_NAME, force)
        encoder = bundle_text_encoder(spec.text, file.parent) if spec.text is not None else None
        return cls(runner, spec, encoder, source=file, **kwargs)

    # --- text

    def sentence(self, text: Any) -> str:
        """The sentence for one image: ``None`` -> neutral, a string as is, a record via the text regime."""
        if text is None:
            return NEUTRAL_SENTENCE
        if isinstance(text, str):
            return text.strip() or NEUTRAL_SENTENCE
        return make_sentence(text, self.text_regime)

    def sentences(self, texts: Any, count: int) -> list[str]:
        """One sentence per image from ``None``, one sentence/record for all, or a sequence of them."""
        if texts is None or isinstance(texts, str) or hasattr(texts, "diagnosis"):
            return [self.sentence(texts)] * count
        texts = list(texts)
        if len(texts) != count:
            raise ValueError(f"got {len(texts)} texts for {count} images")
        return [self.sentence(t) for t in texts]

    def text_inputs(self, sentences: Sequence[str]) -> tuple[Tensor | None, Tensor | None]:
        """Encoder features ``B x max_length x D_t`` (float32, CPU) and mask ``B x max_length`` (bool)."""
        if self.spec.text is None:
            return None, None
        with torch.inference_mode():
            features, mask = self.text_encoder(list(sentences))
        return _pad_tokens(features.float().cpu(), mask.cpu(), self.spec.text.max_length)

    # --- inference

    def predict(self, images: Sequence[ImageInput], texts: Any = None) -> list[Prediction]:
        """Segment images.

        Args:
            images: file paths, PIL images or ``H x W x 3`` uint8 arrays (sizes may differ).
            texts: ``None`` (neutral sentence), one sentence or record for all images, or a
                sequence with one sentence/record/``None`` per image.

        Returns:
            One :class:`Prediction` per image, mask and probability at the image's size.
        """
        images = list(images)
        sentences = self.sentences(texts, len(images))
        predictions: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            # Decode one batch at a time: a long list of large photos never sits in memory at once.
            chunk = [as_rgb(image) for image in images[start : start + self.batch_size]]
            chunk_sentences = sentences[start : start + self.batch_size]
            features, mask = self.text_inputs(chunk_sentences)
            logits = self._logits(preprocess(chunk, self.spec), features, mask)
            if logits.shape[0] != len(chunk) or logits.shape[1] != 1:
                raise DeployError(
                    f"backend {self.backend} returned logits of shape {tuple(logits.shape)} for {len(chunk)} images"
                )
            self._check_finite(logits)
            results = postprocess(logits, [a.shape[:2] for a in chunk], self.threshold, self.spec.center_crop,
                                  self.postprocess)
            used = chunk_sentences if self.spec.text is not None else [""] * len(chunk)  # image-only: no text
            predictions += [Prediction(m, p, s) for (p, m), s in zip(results, used)]
        return predictions

    __call__ = predict

    def _check_finite(self, logits: Tensor) -> None:
        # NaN logits threshold to an empty mask, which would read as "no lesion found".
        bad = int((~torch.isfinite(logits)).flatten(1).any(1).sum())
        if bad:
            model = f"{self.source}: " if self.source is not None else ""
            raise DeployError(f"{model}the network ({self.backend}) returned NaN or inf for {bad} of "
                              f"{logits.shape[0]} images, so no mask: its weights are damaged or it overflowed; "
                              "re-export or re-download the model")

    def _logits(self, image: Tensor, features: Tensor | None, mask: Tensor | None) -> Tensor:
        if not self.tta:
            return self.runner(image, features, mask)
        from cmgnet.model.tta import flip_tta  # the same TTA as evaluation, for every backend

        return flip_tta(lambda x: self.runner(x, features, mask), image)


def _check_inputs(spec: DeploySpec, names: Sequence[str], spec_path: Path, model_path: Path) -> None:
    """Refuse a spec whose inputs are not the model file's, at load rather than once per image.

    Raises:
        DeployError: naming ``deploy.json`` (e.g. ``"text": null`` beside a text-guided network).
    """
    if sorted(names) == sorted(spec.input_names):
        return
    if spec.text is None:
        what = f'"text" is null (an image-only network) but {model_path.name} takes inputs {list(names)}'
    else:
        what = f"describes inputs {list(spec.input_names)} but {model_path.name} takes {list(names)}"
    raise DeployError(f"{spec_path}: {what}; re-export the bundle with `cmgnet export`")


def resolve_model_path(path: str | Path) -> Path:
    """A path, or a shipped model name resolved by :func:`cmgnet.shipped.resolve_pretrained`."""
    path = Path(path)
    if path.exists():
        return path
    try:
        from cmgnet.shipped import resolve_pretrained
    except ImportError:  # no registry in this build: the path is all there is
        return path
    return Path(resolve_pretrained(str(path)))


def _apply(spec: DeploySpec, given: dict[str, Any], source: Any, force: bool, checked: bool = True) -> DeploySpec:
    """``spec`` with explicitly given settings merged in (see :func:`cmgnet.inference.resolve`).

    ``checked=False``: the spec holds defaults, not a record, so given values win silently.
    """
    if checked:
        values = resolve(spec, given, source, force)
    else:
        values = {k: getattr(spec, k) if v is None else v for k, v in given.items()}
    for key in ("image_size", "mean", "std"):
        values[key] = tuple(values[key])
    return replace(spec, **values)


def _resolve_model_file(path: Path, backend: str) -> tuple[Path, str]:
    """The model file and concrete backend for a bundle directory or a model file."""
    suffixes = {".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt", ".ep": "torch-tensorrt"}
    if path.is_file():
        own = suffixes.get(path.suffix)
        if own is None:
            raise DeployError(f"{path}: unknown model file type; expected one of {', '.join(suffixes)} or a directory")
        if backend not in ("auto", own):
            raise DeployError(f"{path} is a {own} model; it cannot run on backend {backend!r}")
        return path, own
    if not (path / SPEC_NAME).is_file():
        raise DeployError(
            f"{path}: neither a checkpoint ({CONFIG_NAME} + {WEIGHTS_NAME}) nor an exported bundle ({SPEC_NAME}); "
            "export a checkpoint with `cmgnet export CHECKPOINT --out DIR`"
        )
    files = {"onnxruntime": path / ONNX_NAME, "tensorrt": path / ENGINE_NAME, "torch-tensorrt": path / TORCH_TRT_NAME}
    if backend == "auto":
        gpu_engine = files["tensorrt"].is_file() and importlib.util.find_spec("tensorrt") is not None
        backend = "tensorrt" if gpu_engine and torch.cuda.is_available() else "onnxruntime"
    if backend == "torch":
        raise DeployError(f"{path} is an exported bundle; the PyTorch backend needs the checkpoint directory")
    if not files[backend].is_file():
        raise DeployError(f"{path}: no {files[backend].name} for backend {backend!r} (export with `cmgnet export`)")
    return files[backend], backend
