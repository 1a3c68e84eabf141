"""The Triton Python-backend model: one implementation for ``cmgnet serve`` and the exported repository.

Triton's Python backend runs ``model.py`` of a model folder in its stub process. Both
repositories the project writes (:mod:`cmgnet.deploy.triton_repo`) hold a two-line
``model.py`` that imports :class:`TritonPythonModel` from here, so the server and the
production repository decode, validate and segment requests with the same code:

* ``IMAGE`` (BYTES, ``[n, 1]``): one encoded image file per item (JPEG, PNG, BMP, as
  ``cmgnet predict`` reads them), decoded by the project's one decoder
  (:func:`cmgnet.data.imageio.decode_image`: EXIF orientation, every pixel mode);
* ``METADATA`` (BYTES, ``[n, 1]``, optional): a JSON object per image with any of ``age``,
  ``sex``, ``site``, ``diagnosis``, ``description`` (the columns of ``predict``'s metadata
  CSV), made into the sentence under the model's text regime; absent: the neutral sentence;
* ``MASK`` (UINT8, ``[n, H, W]``): 0/255 at the image's original size. The images of one
  request must share a size (send one image per request otherwise).

Triton's dynamic batcher hands :meth:`TritonPythonModel.execute` the requests that arrived
together; their images go through the predictor (:class:`cmgnet.deploy.runtime.Segmenter`)
in one call. A bad request (undecodable, truncated, too small, too elongated or too large
an image, malformed metadata) gets an error response naming the input and the problem; the
other requests of the batch are answered as usual. Nothing is written to disk.

Where the network runs: in ``cmgnet serve`` the predictor loads the model itself
(``Segmenter.load``: ONNX Runtime on a CPU); in an exported repository the network is a
separate Triton model (``onnxruntime_onnx`` or ``tensorrt_plan``) called through Business
Logic Scripting (:class:`BlsRunner`), named by the ``network`` parameter of ``config.pbtxt``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmgnet.data.errors import DataError
from cmgnet.data.imageio import DEFAULT_MAX_PIXELS, decode_image
from cmgnet.data.metadata import MetadataEntry, entry_from_mapping
from cmgnet.errors import one_line

from .triton_repo import MASK_OUTPUT, METADATA_INPUT, RequestLimits
from .triton_repo import REQUEST_IMAGE as IMAGE_INPUT


class RequestError(DataError):
    """A request the server refuses; the message names the input (``IMAGE[0]: ...``)."""


class ModelError(RuntimeError):
    """The predictor failed on a batch of valid requests (e.g. NaN logits from damaged weights)."""


def decode_images(items: np.ndarray, limits: RequestLimits) -> list[np.ndarray]:
    """The ``IMAGE`` input (``[n, 1]`` of encoded files) as ``H x W x 3`` uint8 RGB arrays of one size.

    Raises:
        RequestError: an item that is not a complete image file the decoder reads within the
            limits, or items of different sizes.
    """
    images = []
    for i, item in enumerate(_items(items, IMAGE_INPUT)):
        where = f"{IMAGE_INPUT}[{i}]"
        try:
            images.append(decode_image(np.frombuffer(item, dtype=np.uint8), where, limits.max_pixels or DEFAULT_MAX_PIXELS,
                                       min_side=limits.min_side, max_aspect=limits.max_aspect))
        except DataError as err:
            raise RequestError(str(err)) from None
    sizes = sorted({image.shape[:2] for image in images})
    if len(sizes) > 1:
        raise RequestError(f"the images of one request differ in size ({', '.join(f'{w}x{h}' for h, w in sizes)}); "
                           "send one image per request", IMAGE_INPUT)
    return images


def decode_metadata(items: np.ndarray | None, count: int) -> list[MetadataEntry | None]:
    """The optional ``METADATA`` input (``[n, 1]`` of JSON objects) as one entry per image.

    Raises:
        RequestError: not UTF-8 JSON, not an object, an unknown key or an invalid value, or
            a count different from the images'.
    """
    if items is None:
        return [None] * count
    entries: list[MetadataEntry | None] = []
    values = _items(items, METADATA_INPUT)
    if len(values) != count:
        raise RequestError(f"{len(values)} metadata objects for {count} images", METADATA_INPUT)
    for i, item in enumerate(values):
        where = f"{METADATA_INPUT}[{i}]"
        try:
            data = json.loads(item.decode("utf-8")) if item.strip() else {}
        except (UnicodeDecodeError, ValueError) as err:
            raise RequestError(f"not valid JSON ({one_line(err)})", where) from None
        if not isinstance(data, dict):
            raise RequestError(f"expected a JSON object, got {type(data).__name__}", where)
        try:
            entries.append(entry_from_mapping(data))
        except ValueError as err:
            raise RequestError(str(err), where) from None
    return entries


def _items(tensor: np.ndarray, name: str) -> list[bytes]:
    """The BYTES items of a ``[n, 1]`` input."""
    array = np.asarray(tensor, dtype=object)
    if array.ndim != 2 or array.shape[1] != 1:
        raise RequestError(f"expected shape [n, 1] (one item per image), got {list(array.shape)}", name)
    return [bytes(item) for item in array[:, 0]]


class RequestHandler:
    """Requests in, masks or error messages out: everything of :class:`TritonPythonModel` but Triton's types.

    Args:
        segmenter: the predictor (:class:`cmgnet.deploy.runtime.Segmenter`).
        limits: what is accepted as an image.
    """

    def __init__(self, segmenter: Any, limits: RequestLimits) -> None:
        self.segmenter = segmenter
        self.limits = limits

    def __call__(self, requests: Sequence[tuple[np.ndarray | None, np.ndarray | None]]) -> list[np.ndarray | Exception]:
        """Segment a batch of requests.

        Args:
            requests: per request, its ``IMAGE`` and ``METADATA`` inputs (``None`` when absent).

        Returns:
            Per request, the ``n x H x W`` uint8 masks (0/255), or why there are none: a
            :class:`RequestError` (the request's fault) or a :class:`ModelError` (the model's).
        """
        results: list[np.ndarray | Exception | None] = []
        images, texts, owners = [], [], []
        for index, (image, metadata) in enumerate(requests):
            try:
                if image is None:  # Triton checks required inputs; kept for direct callers
                    raise RequestError("missing required input", IMAGE_INPUT)
                decoded = decode_images(image, self.limits)
                entries = decode_metadata(metadata, len(decoded))
            except RequestError as err:
                results.append(err)
                continue
            results.append(None)
            images += decoded
            texts += entries
            owners += [index] * len(decoded)
        if images:
            try:
                predictions = self.segmenter.predict(images, texts)
            except Exception as err:  # noqa: BLE001 - the batch fails, the server stays up and says why
                failure = ModelError(f"the model failed on this batch of {len(images)} images: {one_line(err)}")
                return [failure if result is None else result for result in results]
            masks: dict[int, list[np.ndarray]] = {}
            for owner, prediction in zip(owners, predictions):
                masks.setdefault(owner, []).append(prediction.mask.astype(np.uint8) * 255)
            results = [np.stack(masks[i]) if result is None else result for i, result in enumerate(results)]
        return results  # type: ignore[return-value] - every None was replaced


class BlsRunner:
    """The network as another Triton model, called by Business Logic Scripting (a :class:`~cmgnet.deploy.runtime.Runner`).

    Args:
        network: the Triton model name (``cmgnet_onnx``, ``cmgnet_trt``).
        input_names: the network's inputs in call order (``image``[, ``text_features``, ``text_mask``]).
        max_batch: the network model's ``max_batch_size``; larger batches are sent in parts.
    """

    name = "triton"
    batch_views = True  # the network model batches (dynamic batching on the GPU): send all flip views at once

    def __init__(self, network: str, input_names: Sequence[str], max_batch: int) -> None:
        self.network = network
        self.input_names = tuple(input_names)
        self.max_batch = max_batch

    def __call__(self, image: Any, text_features: Any, text_mask: Any) -> Any:
        import torch
        import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend

        from cmgnet.inference import OUTPUT_NAME

        given = dict(zip(self.input_names, (image, text_features, text_mask)))
        parts = []
        for start in range(0, image.shape[0], self.max_batch):
            inputs = [pb_utils.Tensor(name, np.ascontiguousarray(given[name][start : start + self.max_batch].numpy()))
                      for name in self.input_names]
            response = pb_utils.InferenceRequest(model_name=self.network, requested_output_names=[OUTPUT_NAME],
                                                 inputs=inputs).exec()
            if response.has_error():
                raise RuntimeError(f"network model {self.network!r}: {response.error().message()}")
            parts.append(torch.from_numpy(pb_utils.get_output_tensor_by_name(response, OUTPUT_NAME).as_numpy().copy()))
        return torch.cat(parts)


def bundle_segmenter(folder: Path, network: str, network_max_batch: int, batch_size: int) -> Any:
    """The predictor of an exported repository's Python model: its folder's record and text assets, the network by BLS.

    Args:
        folder: the model's version folder (``inference.json``, ``text_cache/``, ...).
        network: the network's Triton model name.
        network_max_batch: that model's ``max_batch_size``.
        batch_size: images per predictor call (the Python model's ``max_batch_size``).
    """
    from cmgnet.inference import InferenceRecord, record_path

    from .runtime import Segmenter, bundle_text_encoder

    source = record_path(folder) or folder / "inference.json"
    record = InferenceRecord.read(source)
    encoder = bundle_text_encoder(record, folder) if record.text_model is not None else None
    runner = BlsRunner(network, record.input_names, network_max_batch)
    return Segmenter(runner, record, encoder, batch_size=batch_size, source=source)


def parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """A model configuration's ``parameters`` as plain strings."""
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


class TritonPythonModel:
    """Triton's entry point (the class name the Python backend looks for)."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the predictor named by the model configuration's parameters.

        ``model`` (and ``backend``, ``threads``, ``tta``): ``cmgnet serve``, the predictor loads the
        model; ``network`` (and ``network_max_batch``): an exported repository, the network
        is that Triton model and the record and text assets lie in the version folder.
        """
        config = json.loads(args["model_config"])
        params = parameters(config)
        batch = max(1, int(config.get("max_batch_size", 1)))
        if params.get("network"):
            folder = Path(args["model_repository"]) / args["model_version"]
            segmenter = bundle_segmenter(folder, params["network"], int(params.get("network_max_batch", batch)), batch)
        else:
            from .runtime import Segmenter

            threads = int(params.get("threads", "0")) or None
            if threads:
                import torch

                torch.set_num_threads(threads)  # instances are processes: share the cores, do not oversubscribe
            tta = {"true": True, "false": False}.get(params.get("tta", ""))  # cmgnet serve checked it (--force)
            segmenter = Segmenter.load(params["model"], backend=params.get("backend", "auto"), device="auto",
                                       num_threads=threads, batch_size=batch, tta=tta, force=tta is not None)
            # Load-time work (the first ONNX Runtime run) before the server says it is ready; with a
            # network model it would be a BLS call, which Triton allows in execute only.
            segmenter.predict([np.zeros((64, 64, 3), dtype=np.uint8)])
        self.handler = RequestHandler(segmenter, RequestLimits.from_parameters(params))

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request: ``MASK`` or an error naming the problem (``INVALID_ARG``)."""
        import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend

        inputs = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, IMAGE_INPUT)
            metadata = pb_utils.get_input_tensor_by_name(request, METADATA_INPUT)
            inputs.append((image.as_numpy() if image is not None else None,
                           metadata.as_numpy() if metadata is not None else None))
        responses = []
        for result in self.handler(inputs):
            if isinstance(result, Exception):
                code = pb_utils.TritonError.INVALID_ARG if isinstance(result, RequestError) else \
                    pb_utils.TritonError.INTERNAL
                error = pb_utils.TritonError(str(result), code)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(MASK_OUTPUT, result)]))
        return responses
