"""One predictor, :class:`Segmenter`, over every way the model is deployed.

Backends (``Segmenter.load(path, backend=...)``):

* ``torch``: a ``save_pretrained`` checkpoint directory (``config.json`` + ``model.safetensors``);
* ``onnxruntime``: ``model.onnx`` (or ``model.int8.onnx``) of an exported bundle, CPU or CUDA;
  for a checkpoint, the ONNX export of its weights cached once per weights file
  (:mod:`cmgnet.deploy.cache`), which ``auto`` picks on a CPU when ONNX Runtime is installed;
* ``tensorrt``: ``model.engine`` built by :func:`cmgnet.deploy.trt_engine.build_engine`;
* ``torch-tensorrt``: ``model_trt.ep`` compiled by :func:`cmgnet.deploy.torch_trt.compile_torch_tensorrt`.

Pre- and post-processing are the same code for all of them, so backends differ only in the
network's arithmetic:

1. decode to RGB ``uint8`` as a viewer shows the file (EXIF orientation applied, every
   pixel mode converted by :func:`cmgnet.data.imageio.to_array`); then the data package's
   evaluation transform, :func:`cmgnet.data.augment.torch_ops.preprocess_image` (the centred
   square if the record says ``center_crop``, antialiased bilinear resize to the record's
   size, ``(x / 255 - mean) / std``): the numbers the evaluation loaders give the network;
2. text: a sentence, a metadata record (any object with ``diagnosis, age, sex, site,
   description``: made into a sentence by :func:`cmgnet.text.pseudo_text.make_sentence` under
   the segmenter's text regime) or nothing (the neutral sentence); encoded by the frozen text
   encoder (cached per sentence) and padded to the record's ``text_max_length`` tokens;
3. ``sigmoid(logits)`` (averaged over flips with ``tta``: :mod:`cmgnet.model.tta`; ONNX Runtime
   gets all views of a batch in one call) resized bilinearly back to the original image size
   (to the crop, background outside it, with ``center_crop``), then ``probability >
   threshold`` is the mask, cleaned by the record's post-processing.

All of these settings come from the model's :class:`~cmgnet.inference.InferenceRecord`
(``inference.json`` beside a checkpoint's weights or in a bundle; an older bundle's
``deploy.json``). An explicit argument that contradicts it raises
:class:`cmgnet.errors.UsageError` unless ``force=True``.

Images go through the network in batches of ``batch_size`` (capped by an engine's largest
optimisation-profile batch).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cmgnet.data.augment.params import crop_box
from cmgnet.integrity import load_safetensors
from cmgnet.inference import (
    INFERENCE_NAME,
    InferenceRecord,
    image_hw,
    record_path,
    resolve,
)
from cmgnet.model import SegmentationModel
from cmgnet.model.base import CONFIG_NAME, WEIGHTS_NAME
from cmgnet.model.postprocess import check_mode, clean_mask
from cmgnet.model.tta import FLIPS, flip_tta, flip_views, merge_views
from cmgnet.text import NEUTRAL_SENTENCE, TextEncoder, TextFeatureCache
from cmgnet.text.encoder import pad_features
from cmgnet.text.pseudo_text import make_sentence

from .errors import DeployError
from .runners import (
    SERVING_FIELDS,
    ImageInput,
    OnnxRuntimeRunner,
    Runner,
    TorchRunner,
    as_rgb,
    preprocess,
    resolve_device,
    resolve_model_path,
    servable,
    serving_record,
    text_inputs,
)
from .spec import ENGINE_NAME, ONNX_NAME, RECORD_NAME, TORCH_TRT_NAME

from .spec import BACKENDS, SEGMENTER_TEXT_REGIMES  # noqa: E402 - defined beside the bundle's names (torch-free)

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

    def statistics(self) -> dict[str, Any]:
        """The mask's row of ``predictions.csv`` (:func:`lesion_statistics`)."""
        return lesion_statistics(self.mask, self.probability)


def lesion_statistics(mask: np.ndarray, probability: np.ndarray) -> dict[str, Any]:
    """Area, connected components (8-connected), bounding box, centroid and mean probability of a mask."""
    from scipy import ndimage

    height, width = mask.shape
    pixels = int(mask.sum())
    stats: dict[str, Any] = {"height": height, "width": width, "lesion_pixels": pixels,
                             "lesion_fraction": round(pixels / mask.size, 6)}
    if pixels == 0:
        return stats | {"components": 0, "largest_component_pixels": 0}
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    ys, xs = np.nonzero(mask)
    return stats | {
        "components": int(count),
        "largest_component_pixels": int(np.bincount(labels.ravel())[1:].max()),
        "bbox_x0": int(xs.min()), "bbox_y0": int(ys.min()), "bbox_x1": int(xs.max()), "bbox_y1": int(ys.max()),
        "centroid_x": round(float(xs.mean()), 2), "centroid_y": round(float(ys.mean()), 2),
        "mean_probability": round(float(probability[mask].mean()), 4),
    }


# ----------------------------------------------------------------------------- outputs


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


# ----------------------------------------------------------------------------- text


def bundle_text_encoder(record: InferenceRecord, folder: Path, cache: TextFeatureCache | None = None) -> TextEncoder:
    """The frozen text encoder a bundle's record describes, with the bundle's feature cache.

    Args:
        record: the bundle's record (``text_model``, ``text_max_length``, ``text_hidden_size``,
            ``text_cache``, ``text_weights``).
        folder: the folder the record's relative ``text_weights``/``text_cache`` paths are in.
        cache: the bundle's text cache if already open (default: opened here).

    Returns:
        A :class:`~cmgnet.text.TextEncoder` in eval mode.

    Raises:
        DeployError: its hidden size differs from the one the network was exported with.
    """
    if cache is None and record.text_cache:
        cache = TextFeatureCache(folder / record.text_cache)
        cache.get(record.text_model, NEUTRAL_SENTENCE)  # read the cache file now: a corrupt one fails at load, by name
    encoder = TextEncoder(record.text_model, record.text_max_length, freeze=True, cache=cache)
    if record.text_weights:
        path = folder / record.text_weights
        try:
            encoder.backbone.load_state_dict(load_safetensors(path, "text encoder weights"))
        except RuntimeError as err:
            raise DeployError(f"{path}: weights do not fit text encoder {record.text_model!r} "
                              f"({err.__class__.__name__}); re-export") from err
    if record.text_hidden_size is not None and encoder.hidden_size != record.text_hidden_size:
        raise DeployError(
            f"text encoder {record.text_model!r} has hidden size {encoder.hidden_size}, but the network was exported "
            f"for {record.text_hidden_size}: the bundle and the installed text model disagree; re-export"
        )
    return encoder.eval()


class BundleTextEncoder:
    """A bundle's text features: from its text cache, the encoder loaded only for a sentence the cache lacks.

    The cache holds the neutral sentence and every diagnosis template (all that ``predict``
    without metadata or ``--text`` needs), so serving usually never loads the encoder (about
    3 s of a short ``predict``). Features equal those of :func:`bundle_text_encoder`.

    Args:
        record: the bundle's record.
        folder: the bundle.

    Raises:
        CheckpointError: an unreadable text cache (naming it).
        DeployError: the cached features' width differs from the record's ``text_hidden_size``.
    """

    def __init__(self, record: InferenceRecord, folder: Path) -> None:
        self.record, self.folder = record, folder
        self.cache = TextFeatureCache(folder / record.text_cache) if record.text_cache else None
        self._encoder: TextEncoder | None = None
        neutral = self.cache.get(record.text_model, NEUTRAL_SENTENCE) if self.cache is not None else None
        if neutral is None or record.text_hidden_size is None:  # nothing cached, or an old bundle: check it now
            self.encoder  # noqa: B018 - loads and checks the encoder
        elif neutral.shape[-1] != record.text_hidden_size:
            raise DeployError(f"{folder / record.text_cache}: cached text features are {neutral.shape[-1]} wide, "
                              f"the network takes {record.text_hidden_size}; re-export")

    @property
    def encoder(self) -> TextEncoder:
        """The frozen encoder (loaded on first use), sharing this bundle's cache."""
        if self._encoder is None:
            self._encoder = bundle_text_encoder(self.record, self.folder, self.cache)
        return self._encoder

    def __call__(self, sentences: Sequence[str]) -> tuple[Tensor, Tensor]:
        if self.cache is not None:
            cached = [self.cache.get(self.record.text_model, s) for s in sentences]
            if all(c is not None for c in cached):
                return pad_features(cached)
        return self.encoder(sentences)


# ----------------------------------------------------------------------------- segmenter


class Segmenter:
    """Images (+ text) -> masks at the original image size, through any backend.

    Args:
        runner: the backend (see :class:`Runner`).
        record: the model's inference record: pre/post-processing and the text inputs.
        text_encoder: sentences -> encoder features and mask: the frozen text encoder, or a
            bundle's :class:`BundleTextEncoder` (``None`` for image-only networks).
        batch_size: images per network call.
        threshold: mask threshold (``None``: the record's, i.e. the one the model was evaluated with).
        text_regime: how metadata records become sentences: ``none``, ``metadata`` (age,
            sex, site only) or ``oracle`` (also the record's diagnosis); ``None``: the record's.
        tta: average the logits over flips (``cmgnet.model.tta``); ``None``: the record's.
        postprocess: mask post-processing (:mod:`cmgnet.model.postprocess`); ``None``: the record's.
        source: the model file, named when the network returns NaN or inf (``None``: in memory).

    Example:
        >>> seg = Segmenter.load("isic-cmgnet-lite0")
        >>> [p] = seg.predict(["lesion.jpg"], "Asymmetric lesion with irregular borders and multiple colors.")
        >>> p.mask.shape  # the image's own (height, width)
        >>> p.statistics()["lesion_fraction"]
    """

    def __init__(
        self,
        runner: Runner,
        record: InferenceRecord,
        text_encoder: TextEncoder | BundleTextEncoder | None = None,
        *,
        batch_size: int = 8,
        threshold: float | None = None,
        text_regime: str | None = None,
        tta: bool | None = None,
        postprocess: str | None = None,
        source: str | Path | None = None,
    ) -> None:
        regime = record.text_regime if record.text_regime in SEGMENTER_TEXT_REGIMES else "metadata"
        text_regime = regime if text_regime is None else text_regime
        if text_regime not in SEGMENTER_TEXT_REGIMES:
            raise ValueError(f"text_regime must be one of {SEGMENTER_TEXT_REGIMES}, got {text_regime!r}")
        if record.text_model is not None and text_encoder is None:
            raise DeployError("this network takes text: pass its text encoder")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.runner = runner
        self.record = record
        self.text_encoder = text_encoder
        self.batch_size = batch_size if getattr(runner, "batch_views", False) else \
            min(batch_size, runner.max_batch or batch_size)
        self.threshold = record.threshold if threshold is None else threshold
        self.text_regime = text_regime
        self.tta = record.tta if tta is None else bool(tta)
        self.postprocess = check_mode(record.postprocess if postprocess is None else postprocess)
        self.source = source

    @property
    def spec(self) -> InferenceRecord:
        """The record (its name before the deploy spec and the record became one)."""
        return self.record

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
        record: InferenceRecord | None = None,
        **kwargs: Any,
    ) -> Segmenter:
        """A PyTorch segmenter around an in-memory model (``kwargs`` as in the constructor).

        The preprocessing is the model's inference record (``model.inference``; the defaults
        when it has none) unless a ``record`` is given; ``image_size`` replaces the record's size.
        """
        record = serving_record(model, record)
        if image_size is not None:
            record = replace(record, image_size=image_hw(image_size))
        encoder = model.text_branch.encoder if getattr(model, "text_branch", None) is not None else None
        return cls(TorchRunner(model, resolve_device(device), precision), record, encoder, **kwargs)

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

        Preprocessing, threshold, text regime, TTA and post-processing come from the model's
        inference record (``inference.json``; an older bundle's ``deploy.json``); a checkpoint
        saved without one gets the defaults (256 px, ImageNet statistics, threshold 0.5).

        Args:
            path: a shipped model name (``cmgnet.shipped``); a ``save_pretrained`` checkpoint
                directory; an exported bundle directory; or a ``.onnx``, ``.engine``/``.plan``
                or ``.ep`` file.
            backend: one of :data:`BACKENDS`. ``auto`` picks, for a checkpoint, ONNX Runtime
                on a CPU where it is installed (the weights exported once into the cache of
                :mod:`cmgnet.deploy.cache`; PyTorch if that export fails, with a warning),
                else PyTorch; for a bundle, the TensorRT engine when it exists and TensorRT
                and a GPU are present, else ONNX Runtime; for a file, its own backend.
                ``onnxruntime`` with a checkpoint uses the cache too.
            device: ``auto``, ``cpu`` or ``cuda`` (TensorRT always runs on the GPU).
            num_threads: ONNX Runtime threads in all (:class:`OnnxRuntimeRunner`; ``None``: one per physical core).
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
        given = {"image_size": image_hw(image_size) if image_size is not None else None,
                 "mean": mean, "std": std, "threshold": kwargs.pop("threshold", None),
                 "text_regime": kwargs.pop("text_regime", None), "tta": kwargs.pop("tta", None),
                 "postprocess": kwargs.pop("postprocess", None)}
        if path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
            if backend not in ("auto", "torch", "onnxruntime"):
                raise DeployError(
                    f"{path} is a PyTorch checkpoint; export it (`cmgnet export`) to use backend {backend!r}"
                )
            device = resolve_device(device)
            if backend == "onnxruntime" or (backend == "auto" and _cached_onnx_wanted(device)):
                segmenter = cls._load_cached_onnx(path, backend, device, num_threads, given, force, kwargs)
                if segmenter is not None:
                    return segmenter
            model = SegmentationModel.from_pretrained(path)
            # Without a record the defaults are only guesses: explicit values replace them unchecked.
            record = _apply(serving_record(model), given, path / INFERENCE_NAME, force,
                            checked=model.inference is not None)
            return cls.from_model(model, record=record, device=device, source=path / WEIGHTS_NAME, **kwargs)
        file, backend = _resolve_model_file(path, backend)
        device = resolve_device(device)
        record_file = record_path(file.parent) or file.parent / RECORD_NAME
        if backend == "onnxruntime":
            record = InferenceRecord.read(record_file)
            runner: Runner = OnnxRuntimeRunner(file, device, num_threads)
            _check_inputs(record, runner.input_names, record_file, file)
        elif backend == "tensorrt":
            from .trt_engine import TensorRTRunner

            runner = TensorRTRunner(file)
            record = runner.metadata.spec
        else:
            from .torch_trt import TorchTensorRTRunner

            runner = TorchTensorRTRunner(file)
            record = runner.metadata.spec
        record = _apply(record, given, record_file, force)
        encoder = BundleTextEncoder(record, file.parent) if record.text_model is not None else None
        return cls(runner, record, encoder, source=file, **kwargs)

    @classmethod
    def _load_cached_onnx(cls, checkpoint: Path, backend: str, device: str, num_threads: int | None,
                          given: dict[str, Any], force: bool, kwargs: dict[str, Any]) -> Segmenter | None:
        """The checkpoint on ONNX Runtime through the export cache; ``None`` when ``auto`` falls back to PyTorch.

        The serving settings are the checkpoint's own record (which may have changed since
        the export); the cached bundle supplies the network and the text cache.
        """
        import sys

        from cmgnet.errors import one_line
        from cmgnet.outputs import WriteFailedError

        from .cache import cached_bundle

        try:
            bundle = cached_bundle(checkpoint)
            cached = InferenceRecord.read(record_path(bundle) or bundle / RECORD_NAME)
            runner = OnnxRuntimeRunner(bundle / ONNX_NAME, device, num_threads)
        except (DeployError, WriteFailedError, OSError) as err:  # a damaged checkpoint (CheckpointError) is raised
            if backend != "auto":
                raise
            print(f"warning: {checkpoint}: running on PyTorch, not ONNX Runtime ({one_line(err)})", file=sys.stderr)
            return None
        own = InferenceRecord.load(checkpoint)
        if own is not None:
            serving = {f: getattr(own, f) for f in SERVING_FIELDS}
            cached = servable(replace(cached, **serving))
        _check_inputs(cached, runner.input_names, bundle / RECORD_NAME, bundle / ONNX_NAME)
        record = _apply(cached, given, checkpoint / INFERENCE_NAME, force, checked=own is not None)
        encoder = BundleTextEncoder(record, bundle) if record.text_model is not None else None
        return cls(runner, record, encoder, source=checkpoint / WEIGHTS_NAME, **kwargs)

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
        """Encoder features ``B x text_max_length x D_t`` (float32, CPU) and mask ``B x text_max_length`` (bool)."""
        return text_inputs(self.text_encoder, self.record, sentences)

    # --- inference

    def predict(self, images: Sequence[ImageInput], texts: Any = None) -> list[Prediction]:
        """Segment images.

        Args:
            images: file paths, PIL images or ``H x W x 3`` uint8 arrays (sizes may differ).
            texts: ``None`` (neutral sentence), one sentence or record for all images, or a
                sequence with one sentence/record/``None`` per image.

        Returns:
            One :class:`Prediction` per image, mask and probability at the image's size
            (:meth:`Prediction.statistics` gives its ``predictions.csv`` row).
        """
        images = list(images)
        sentences = self.sentences(texts, len(images))
        with _torch_threads(1 if getattr(self.runner, "batch_views", False) else None):
            return self._predict(images, sentences)

    __call__ = predict

    def _predict(self, images: list[ImageInput], sentences: list[str]) -> list[Prediction]:
        predictions: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            # Decode one batch at a time: a long list of large photos never sits in memory at once.
            chunk = [as_rgb(image) for image in images[start : start + self.batch_size]]
            chunk_sentences = sentences[start : start + self.batch_size]
            features, mask = self.text_inputs(chunk_sentences)
            logits = self._logits(preprocess(chunk, self.record), features, mask)
            if logits.shape[0] != len(chunk) or logits.shape[1] != 1:
                raise DeployError(
                    f"backend {self.backend} returned logits of shape {tuple(logits.shape)} for {len(chunk)} images"
                )
            self._check_finite(logits)
            results = postprocess(logits, [a.shape[:2] for a in chunk], self.threshold, self.record.center_crop,
                                  self.postprocess)
            used = chunk_sentences if self.record.text_model is not None else [""] * len(chunk)  # image-only: no text
            predictions += [Prediction(m, p, s) for (p, m), s in zip(results, used)]
        return predictions

    def _check_finite(self, logits: Tensor) -> None:
        # NaN logits threshold to an empty mask, which would read as "no lesion found".
        bad = int((~torch.isfinite(logits)).flatten(1).any(1).sum())
        if bad:
            model = f"{self.source}: " if self.source is not None else ""
            raise DeployError(f"{model}the network ({self.backend}) returned NaN or inf for {bad} of "
                              f"{logits.shape[0]} images, so no mask: its weights are damaged or it overflowed; "
                              "re-export or re-download the model")

    def _logits(self, image: Tensor, features: Tensor | None, mask: Tensor | None) -> Tensor:
        if not getattr(self.runner, "batch_views", False):
            if not self.tta:
                return self.runner(image, features, mask)
            return flip_tta(lambda x: self.runner(x, features, mask), image)  # the same TTA as evaluation
        # All views of the batch in as few calls as the runner takes: one ONNX Runtime call for 8 images x 4 flips.
        views = flip_views(image) if self.tta else [image]
        count = len(views)
        stacked = torch.cat(views)
        if features is not None:
            features, mask = features.repeat(count, 1, 1), mask.repeat(count, 1)
        step = self.runner.max_batch or stacked.shape[0]
        logits = torch.cat([self.runner(stacked[i : i + step], None if features is None else features[i : i + step],
                                        None if mask is None else mask[i : i + step])
                            for i in range(0, stacked.shape[0], step)])
        if not self.tta:
            return logits
        return merge_views(list(logits.chunk(count)), FLIPS)


@contextlib.contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``count`` inside the block (``None``: unchanged).

    With the network in ONNX Runtime's own thread pool, PyTorch only resizes, normalises and
    averages small tensors: one thread does that faster than two that wait for each other on
    cores ONNX Runtime keeps busy.
    """
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cached_onnx_wanted(device: str) -> bool:
    """``auto`` on a checkpoint: ONNX Runtime on a CPU where it and the exporter are installed."""
    if device != "cpu":
        return False
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


def _check_inputs(record: InferenceRecord, names: Sequence[str], record_file: Path, model_path: Path) -> None:
    """Refuse a record whose inputs are not the model file's, at load rather than once per image.

    Raises:
        DeployError: naming the record file (e.g. ``"text_model": null`` beside a text-guided network).
    """
    if sorted(names) == sorted(record.input_names):
        return
    if record.text_model is None:
        what = f"no text model (an image-only network) but {model_path.name} takes inputs {list(names)}"
    else:
        what = f"describes inputs {list(record.input_names)} but {model_path.name} takes {list(names)}"
    raise DeployError(f"{record_file}: {what}; re-export the bundle with `cmgnet export`")


def _apply(record: InferenceRecord, given: dict[str, Any], source: Any, force: bool,
           checked: bool = True) -> InferenceRecord:
    """``record`` with explicitly given settings merged in (see :func:`cmgnet.inference.resolve`).

    ``checked=False``: the record holds defaults, not a saved record, so given values win silently.
    """
    if checked:
        values = resolve(record, given, source, force)
    else:
        values = {k: getattr(record, k) if v is None else v for k, v in given.items()}
    return replace(record, **values)


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
    if record_path(path) is None:
        raise DeployError(
            f"{path}: neither a checkpoint ({CONFIG_NAME} + {WEIGHTS_NAME}) nor an exported bundle ({RECORD_NAME}); "
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
