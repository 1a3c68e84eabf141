"""What runs the network and what it is fed, below every way of loading it.

The backends (:class:`TorchRunner`, :class:`OnnxRuntimeRunner`; the TensorRT runners live in
:mod:`cmgnet.deploy.trt_engine` and :mod:`cmgnet.deploy.torch_trt`), the images and sentences
made into the network's inputs exactly as serving makes them, and the record a model is served
with. :class:`~cmgnet.deploy.runtime.Segmenter` (loading, batching, TTA, masks) and the exporter
(its parity check) both build on this module, and it on neither.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from cmgnet.data.augment.torch_ops import preprocess_image
from cmgnet.data.imageio import DEFAULT_MAX_PIXELS, decode_image, read_encoded, to_array
from cmgnet.errors import one_line
from cmgnet.hardware import physical_cores
from cmgnet.inference import InferenceRecord, complete_for_model, record_for_model
from cmgnet.model import SegmentationModel

from .errors import BackendUnavailableError, DeployError
from .spec import IMAGE_INPUT, OUTPUT_NAME, SEGMENTER_TEXT_REGIMES, TEXT_INPUTS

ImageInput = str | Path | Image.Image | np.ndarray
"""An image as the predictor takes it: a file, a PIL image or an ``H x W x 3`` uint8 array."""


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


def preprocess(images: Sequence[np.ndarray], record: InferenceRecord) -> Tensor:
    """RGB uint8 images of any sizes -> the normalised ``B x 3 x H x W`` float32 network input.

    Each image goes through the data package's evaluation transform
    (:func:`~cmgnet.data.augment.torch_ops.preprocess_image`), so the network sees what it saw
    when it was evaluated.
    """
    return torch.cat([preprocess_image(array, record) for array in images])


# ----------------------------------------------------------------------------- backends


class Runner(Protocol):
    """A backend: normalised images (+ text inputs) -> ``B x 1 x h x w`` float32 CPU logits.

    ``max_batch`` caps the images per call (an engine's profile; ``None``: no cap);
    ``batch_views``: the flip-TTA views of a batch go through in one call, chunked to
    ``max_batch`` (ONNX Runtime on a CPU runs a call's views on two sessions at once).
    """

    name: str
    max_batch: int | None
    batch_views: bool

    def __call__(self, image: Tensor, text_features: Tensor | None, text_mask: Tensor | None) -> Tensor: ...


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when PyTorch sees a GPU, else ``"cpu"``; other values pass through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class TorchRunner:
    """PyTorch eager inference of an in-memory model.

    On a CPU in fp32 it runs a copy of the network with BatchNorm folded into the convolutions
    (:mod:`cmgnet.model.fold`) in channels-last, ``cpu_micro_batch`` images at a time: the
    activations of larger batches spill out of the caches. The shipped model, plain eager, took
    87 ms per image at batch 8 against 55 ms at batch 1; this path takes 37 and 44 (one thread,
    CPU time, AMD EPYC; README, Latency). The caller's model is not modified.

    Args:
        model: the network (put in eval mode and moved to ``device``).
        device: ``"cpu"``, ``"cuda"``, ...
        precision: ``"fp32"``, or ``"fp16"``/``"bf16"`` autocast on CUDA.
        cpu_micro_batch: images per forward pass on a CPU.
    """

    name = "torch"
    max_batch = None
    # Flip views one call each: Segmenter runs batched-view runners with torch on one thread (ONNX Runtime has
    # its own), which would starve this one; on a CPU it splits each call into micro-batches itself.
    batch_views = False

    def __init__(self, model: SegmentationModel, device: str = "cpu", precision: str = "fp32",
                 cpu_micro_batch: int = 2) -> None:
        if precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {device!r} requested but PyTorch sees no CUDA GPU; use device 'cpu'")
        self.device = torch.device(device)
        self.micro_batch = None
        model = model.eval()
        if self.device.type == "cpu" and precision == "fp32":
            from cmgnet.model.fold import fold_batchnorm

            model = copy.deepcopy(model)
            fold_batchnorm(model)
            model = model.to(memory_format=torch.channels_last)
            self.micro_batch = cpu_micro_batch
        self.model = model.to(self.device)
        self.autocast = None if precision == "fp32" else {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]

    def __call__(self, image: Tensor, text_features: Tensor | None, text_mask: Tensor | None) -> Tensor:
        args = [image] if text_features is None else [image, text_features, text_mask]
        args = [a.to(self.device, non_blocking=True) for a in args]
        if self.micro_batch:
            args[0] = args[0].contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, self.autocast) if self.autocast else contextlib.nullcontext()
        step = self.micro_batch or len(image)
        with torch.inference_mode(), autocast:
            return torch.cat([self.model(*(a[i:i + step] for a in args)).float().cpu()
                              for i in range(0, len(image), step)]).contiguous()


def onnxruntime_session(path: str | Path, device: str = "cpu", num_threads: int | None = None,
                        spinning: bool = True) -> Any:
    """An ONNX Runtime session tuned for latency.

    Args:
        path: the ``.onnx`` file.
        device: ``"cpu"`` or ``"cuda"`` (needs the ``onnxruntime-gpu`` package).
        num_threads: intra-op threads; ``None`` keeps ONNX Runtime's default (one per physical core).
        spinning: let idle intra-op threads spin-wait for the next op (ONNX Runtime's default);
            off where Python work runs between calls on the same cores.

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
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
        raise DeployError(f"{path}: not a loadable ONNX model ({one_line(err, with_type=True)}); "
                          "re-export it with `cmgnet export`") from err


class OnnxRuntimeRunner:
    """ONNX Runtime inference of an exported ``.onnx`` file.

    On a CPU with two or more cores, a call of two or more views runs as two halves at once,
    each on a session with half the threads: the convolutions scale better across images than
    across the threads of one image (2-core EPYC, 256 px: 113.6 against 102.3 views/s at 4
    views, 110.6 against 97.5 at 8; ``benchmarks/latency.py``). A single view keeps the
    session with every thread. The two half sessions are made on the first call that uses them.

    Args:
        path: the model file.
        device: ``"cpu"`` or ``"cuda"``.
        num_threads: ONNX Runtime threads in all (``None``: one per physical core).
        split_batches: run batches as two halves on a CPU (off: one session for every call).
    """

    name = "onnxruntime"
    batch_views = True

    def __init__(self, path: str | Path, device: str = "cpu", num_threads: int | None = None,
                 split_batches: bool = True) -> None:
        self.path = Path(path)
        self.device = device
        # Views per call. On a CPU each view costs more in a larger call, its activations leaving the
        # caches (2-core EPYC, 256 px: 112 views/s at 2, 107 at 8, 97 at 32); a GPU wants larger calls.
        self.max_batch = 8 if device == "cpu" else 32
        # Pre/post-processing runs between the calls: threads left spinning after a call would take
        # its cores (on two shared cores, 195 -> 120 ms per image with the change below).
        self.session = onnxruntime_session(self.path, device, num_threads, spinning=False)
        self.input_names = [i.name for i in self.session.get_inputs()]
        threads = num_threads or physical_cores()
        self._lane_threads = threads // 2 if split_batches and device == "cpu" and threads >= 2 else 0
        self._lanes: list[Any] = []
        self._pool: ThreadPoolExecutor | None = None
        self._lanes_lock = threading.Lock()

    def __call__(self, image: Tensor, text_features: Tensor | None, text_mask: Tensor | None) -> Tensor:
        given = {"image": image, "text_features": text_features, "text_mask": text_mask}
        missing = [n for n in self.input_names if given.get(n) is None]
        if missing:
            raise DeployError(f"{self.path}: the model needs inputs {missing} that were not given")
        feeds = {name: given[name].numpy() for name in self.input_names}
        count = image.shape[0]
        if count < 2 or not self._lane_threads:
            return torch.from_numpy(self.session.run([OUTPUT_NAME], feeds)[0])
        half = (count + 1) // 2
        parts = ({n: a[:half] for n, a in feeds.items()}, {n: a[half:] for n, a in feeds.items()})
        pool, lanes = self._lanes_ready()
        outputs = pool.map(lambda lane, part: lane.run([OUTPUT_NAME], part)[0], lanes, parts)
        return torch.from_numpy(np.concatenate(list(outputs)))

    def _lanes_ready(self) -> tuple[ThreadPoolExecutor, list[Any]]:
        with self._lanes_lock:  # the predictor may be shared by threads (MLflow serving)
            if not self._lanes:
                self._pool = ThreadPoolExecutor(2, thread_name_prefix="onnxruntime-lane")
                self._lanes = [onnxruntime_session(self.path, self.device, self._lane_threads, spinning=False)
                               for _ in range(2)]
            return self._pool, self._lanes


# ----------------------------------------------------------------------------- text


def text_inputs(encoder: Any, record: InferenceRecord, sentences: Sequence[str]) -> tuple[Tensor | None, Tensor | None]:
    """Encoder features ``B x text_max_length x D_t`` (float32, CPU) and mask ``B x text_max_length`` (bool).

    Args:
        encoder: sentences -> ``(features, mask)`` (the frozen text encoder or a bundle's cache).
        record: the network's record (``text_model``; ``None`` for an image-only network).
        sentences: one per image.
    """
    if record.text_model is None:
        return None, None
    with torch.inference_mode():
        features, mask = encoder(list(sentences))
    return _pad_tokens(features.float().cpu(), mask.cpu(), record.text_max_length)


def _pad_tokens(features: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    # Engines are built for exactly `length` tokens; padded tokens are masked, so results do not change.
    extra = length - features.shape[1]
    if extra < 0:
        raise DeployError(f"text has {features.shape[1]} tokens, more than the exported {length}")
    return F.pad(features, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


# ----------------------------------------------------------------------------- records


SERVING_FIELDS = ("image_size", "mean", "std", "center_crop", "threshold", "tta", "postprocess", "text_regime")
"""The record's settings a checkpoint's ``inference.json`` decides (the rest describe the network and its files)."""


def serving_record(model: SegmentationModel, record: InferenceRecord | None = None) -> InferenceRecord:
    """The record a model is served with: ``record``, else ``model.inference``, else the defaults; network fields filled in."""
    record = record or getattr(model, "inference", None)
    return servable(complete_for_model(record, model) if record is not None else record_for_model(model))


def servable(record: InferenceRecord) -> InferenceRecord:
    """``record`` with a text regime serving can apply: ``predicted`` needs the diagnosis classifier, so ``metadata``."""
    return record if record.text_regime in SEGMENTER_TEXT_REGIMES else replace(record, text_regime="metadata")


def network_inputs(model: SegmentationModel, record: InferenceRecord, images: Sequence[np.ndarray],
                   sentences: Sequence[str]) -> dict[str, Tensor]:
    """A model's named network inputs for images and sentences, exactly as serving builds them."""
    record = serving_record(model, record)
    encoder = model.text_branch.encoder if getattr(model, "text_branch", None) is not None else None
    features, mask = text_inputs(encoder, record, sentences)
    given = {IMAGE_INPUT: preprocess(images, record), TEXT_INPUTS[0]: features, TEXT_INPUTS[1]: mask}
    return {name: given[name] for name in record.input_names}


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
