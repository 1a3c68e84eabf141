"""Triton model repositories: the one ``cmgnet serve`` runs, and the one ``cmgnet export --triton-repo`` writes.

``cmgnet serve`` (:mod:`cmgnet.deploy.server`) serves one Python-backend model::

    <tmp>/models/cmgnet/config.pbtxt    IMAGE, METADATA -> MASK; dynamic batching; parameters: the model path
    <tmp>/models/cmgnet/1/model.py      imports cmgnet.deploy.triton_model.TritonPythonModel

``cmgnet export CHECKPOINT --triton-repo DIR`` writes a repository for the stock
``tritonserver`` of NVIDIA's container on a GPU host::

    DIR/cmgnet/config.pbtxt             the same Python-backend model (decode, preprocess, text, postprocess),
    DIR/cmgnet/1/model.py               calling the network below by Business Logic Scripting
    DIR/cmgnet/1/inference.json         the model's record, text_cache/ (and text_encoder.safetensors)
    DIR/cmgnet_onnx/config.pbtxt        onnxruntime_onnx (optionally ONNX Runtime's TensorRT accelerator, fp16)
    DIR/cmgnet_onnx/1/model.onnx
    DIR/cmgnet_trt/config.pbtxt         tensorrt_plan, where the export built an engine (profile = config)
    DIR/cmgnet_trt/1/model.plan

A client sends the same request to either (model ``cmgnet``). Every ``config.pbtxt`` has
dynamic batching and an instance group; ``tests/test_serve.py`` parses each against Triton's
``model_config.proto``.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cmgnet.inference import IMAGE_INPUT, OUTPUT_NAME, TEXT_INPUTS, InferenceRecord, record_path

from .errors import DeployError
from .spec import ENGINE_NAME, ONNX_NAME, TEXT_CACHE_DIR, TEXT_WEIGHTS_NAME

SERVED_NAME = "cmgnet"
"""The model clients call, in both repositories."""
# The request protocol (cmgnet.deploy.triton_model reads and answers it).
REQUEST_IMAGE = "IMAGE"
METADATA_INPUT = "METADATA"
MASK_OUTPUT = "MASK"
MIN_SIDE = 16
"""Smallest accepted image side: the network's stride; a smaller image holds less than one feature cell."""
MAX_ASPECT = 10.0
"""Most elongated accepted image (long side / short side); dermoscopy photographs are about 4:3."""
ONNX_MODEL = "cmgnet_onnx"
TRT_MODEL = "cmgnet_trt"
PLAN_NAME = "model.plan"  # the file name Triton's TensorRT backend looks for
DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_DELAY_US = 0
"""Measured by ``benchmarks/serve.py`` on the 2-core CPU (README, Serving): a delay costs a lone request
its length (20 ms did, 5 ms about that) and buys no larger batches, since under load requests queue
behind the running batch anyway; with 0 the batcher takes whatever waits when the model is free."""
NETWORK_QUEUE_DELAY_US = 500
"""The network models' batcher in an exported repository: the Python model has batched already."""
MODEL_PY = (
    "# Written by cmgnet: the project's Triton Python-backend model (cmgnet/deploy/triton_model.py).\n"
    "from cmgnet.deploy.triton_model import TritonPythonModel  # noqa: F401\n"
)


@dataclass(frozen=True)
class Batching:
    """Scheduling of one model.

    Args:
        max_batch: ``max_batch_size``: the most images one execution takes.
        queue_delay_us: how long the dynamic batcher waits to fill a batch.
        instances: model instances (processes for the Python backend, streams for the others).
        kind: ``KIND_CPU`` or ``KIND_GPU``.
    """

    max_batch: int = DEFAULT_MAX_BATCH
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    instances: int = 1
    kind: str = "KIND_CPU"

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.queue_delay_us < 0 or self.instances < 1:
            raise DeployError(f"need max batch >= 1, queue delay >= 0 and instances >= 1, got {self}")


@dataclass(frozen=True)
class RequestLimits:
    """What the served model accepts as an image (checked from the header, before any pixel is decoded).

    Args:
        max_pixels: the largest ``width * height`` (``None``: the decoder's limit,
            :data:`cmgnet.data.imageio.DEFAULT_MAX_PIXELS`).
        min_side: the smallest accepted side.
        max_aspect: the largest accepted long-side / short-side ratio.
    """

    max_pixels: int | None = None
    min_side: int = MIN_SIDE
    max_aspect: float = MAX_ASPECT

    def to_parameters(self) -> dict[str, str]:
        """As ``config.pbtxt`` parameters (strings)."""
        limits = {"min_side": str(self.min_side), "max_aspect": f"{self.max_aspect:g}"}
        return limits | ({"max_pixels": str(self.max_pixels)} if self.max_pixels else {})

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> RequestLimits:
        """Inverse of :meth:`to_parameters`; missing keys take the defaults."""
        pixels = parameters.get("max_pixels")
        return cls(int(pixels) if pixels else None, int(parameters.get("min_side", MIN_SIDE)),
                   float(parameters.get("max_aspect", MAX_ASPECT)))


def _string(value: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensor(name: str, dtype: str, dims: Sequence[int], optional: bool = False) -> str:
    extra = " optional: true" if optional else ""
    return f"  {{ name: {_string(name)} data_type: {dtype} dims: [ {', '.join(map(str, dims))} ]{extra} }}"


def model_config(name: str, kind: str, inputs: Sequence[str], outputs: Sequence[str], batching: Batching,
                 parameters: Mapping[str, str] = {}, optimization: str = "") -> str:  # noqa: B006 - read only
    """One ``config.pbtxt``.

    Args:
        name: the model's name (its folder's).
        kind: ``backend: "python"`` or ``platform: "..."`` line.
        inputs, outputs: tensor lines (:func:`_tensor`).
        batching: max batch, dynamic batcher and instance group (``max_batch`` 1: no dynamic batcher,
            every request runs alone).
        parameters: ``parameters`` map (strings).
        optimization: an ``optimization { ... }`` block, or nothing.
    """
    lines = [f"name: {_string(name)}", kind, f"max_batch_size: {batching.max_batch}",
             "input [", ",\n".join(inputs), "]", "output [", ",\n".join(outputs), "]"]
    if batching.max_batch > 1:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {batching.queue_delay_us} }}")
    lines.append(f"instance_group [ {{ count: {batching.instances} kind: {batching.kind} }} ]")
    lines += [f"parameters {{ key: {_string(k)} value {{ string_value: {_string(v)} }} }}" for k, v in parameters.items()]
    if optimization:
        lines.append(optimization)
    return "\n".join(lines) + "\n"


def request_config(batching: Batching, parameters: Mapping[str, str]) -> str:
    """The served model: ``IMAGE`` (+ optional ``METADATA``) -> ``MASK``, on the Python backend."""
    inputs = [_tensor(REQUEST_IMAGE, "TYPE_STRING", [1]), _tensor(METADATA_INPUT, "TYPE_STRING", [1], optional=True)]
    return model_config(SERVED_NAME, 'backend: "python"', inputs, [_tensor(MASK_OUTPUT, "TYPE_UINT8", [-1, -1])],
                        batching, parameters)


def serve_config(model: str | Path, batching: Batching, limits: RequestLimits, backend: str = "auto",
                 threads: int | None = None, tta: bool | None = None) -> str:
    """The ``config.pbtxt`` of ``cmgnet serve``: the predictor loads ``model`` itself.

    ``tta`` replaces the model's recorded flip TTA (``None``: as recorded); the caller has
    checked it against the record (``--force``).
    """
    params = {"model": str(model), "backend": backend, **limits.to_parameters()}
    if threads:
        params["threads"] = str(threads)
    if tta is not None:
        params["tta"] = str(tta).lower()
    return request_config(batching, params)


def network_tensors(record: InferenceRecord) -> tuple[list[str], list[str]]:
    """The network's input and output lines (batch dimension implicit), from its record."""
    height, width = record.image_size
    inputs = [_tensor(IMAGE_INPUT, "TYPE_FP32", [3, height, width])]
    if record.text_model is not None:
        if record.text_max_length is None or record.text_hidden_size is None:
            raise DeployError("the record lacks text_max_length or text_hidden_size; re-export with `cmgnet export`")
        inputs += [_tensor(TEXT_INPUTS[0], "TYPE_FP32", [record.text_max_length, record.text_hidden_size]),
                   _tensor(TEXT_INPUTS[1], "TYPE_BOOL", [record.text_max_length])]
    return inputs, [_tensor(OUTPUT_NAME, "TYPE_FP32", [1, height, width])]


def onnx_config(record: InferenceRecord, batching: Batching, tensorrt_fp16: bool = False) -> str:
    """``cmgnet_onnx``: the network on Triton's ONNX Runtime backend.

    Args:
        record: the bundle's record (input sizes).
        batching: its scheduling (``kind`` ``KIND_GPU`` on a GPU host).
        tensorrt_fp16: let ONNX Runtime hand the graph to its TensorRT execution provider at fp16.
    """
    inputs, outputs = network_tensors(record)
    optimization = ""
    if tensorrt_fp16:
        optimization = ('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt"\n'
                        '  parameters { key: "precision_mode" value: "FP16" }\n'
                        '  parameters { key: "max_workspace_size_bytes" value: "4294967296" }\n'
                        '  parameters { key: "trt_engine_cache_enable" value: "1" } } ] } }')
    return model_config(ONNX_MODEL, 'platform: "onnxruntime_onnx"', inputs, outputs, batching, optimization=optimization)


def tensorrt_config(record: InferenceRecord, input_shapes: Mapping[str, Mapping[str, Sequence[int]]], max_batch: int,
                    batching: Batching) -> str:
    """``cmgnet_trt``: the engine ``cmgnet export`` built, on Triton's TensorRT backend.

    The dims and ``max_batch_size`` are the engine's optimisation profile (its metadata's
    ``input_shapes``): batch 1..``max_batch``, every other dimension fixed.

    Raises:
        DeployError: the profile's inputs are not the record's, or a non-batch dimension varies.
    """
    inputs, outputs = network_tensors(record)
    names = [IMAGE_INPUT, *(TEXT_INPUTS if record.text_model is not None else ())]
    if sorted(input_shapes) != sorted(names):
        raise DeployError(f"the engine's profile has inputs {sorted(input_shapes)}, the record {sorted(names)}")
    for name, shapes in input_shapes.items():
        low, high = list(shapes["min"]), list(shapes["max"])
        if low[1:] != high[1:] or low[0] != 1 or high[0] != max_batch:
            raise DeployError(f"the engine's profile for {name!r} ({low} .. {high}) is not batch 1..{max_batch} "
                              "with fixed other dimensions; rebuild it with `cmgnet export`")
    dims = {name: list(shapes["max"])[1:] for name, shapes in input_shapes.items()}
    dtypes = {IMAGE_INPUT: "TYPE_FP32", TEXT_INPUTS[0]: "TYPE_FP32", TEXT_INPUTS[1]: "TYPE_BOOL"}
    inputs = [_tensor(name, dtypes[name], dims[name]) for name in names]
    batching = Batching(max_batch, batching.queue_delay_us, batching.instances, batching.kind)
    return model_config(TRT_MODEL, 'platform: "tensorrt_plan"', inputs, outputs, batching)


def write_model_py(folder: Path) -> Path:
    """``folder/1/model.py``: the project's Python-backend model."""
    version = folder / "1"
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.py").write_text(MODEL_PY)
    return version / "model.py"


def repository_models(repo: str | Path) -> list[Path]:
    """The model folders of an earlier export in ``repo``."""
    return [Path(repo) / name for name in (SERVED_NAME, ONNX_MODEL, TRT_MODEL) if (Path(repo) / name).exists()]


def write_triton_repository(bundle: str | Path, repo: str | Path, *, batching: Batching = Batching(),
                            network_max_batch: int = 32, network_instances: int = 1, tensorrt_fp16: bool = False,
                            limits: RequestLimits = RequestLimits()) -> list[Path]:
    """Lay out an exported bundle as a Triton model repository (see the module docstring).

    Args:
        bundle: a folder ``cmgnet export`` wrote (record, ``model.onnx``, text assets, optionally
            ``model.engine`` with its metadata).
        repo: the repository folder (created).
        batching: the served Python model's scheduling (CPU instances).
        network_max_batch: the ONNX model's ``max_batch_size`` (the engine's profile sets the plan's);
            the flip-TTA views of a full batch fit in 32.
        network_instances: GPU instances of the network models.
        tensorrt_fp16: add ONNX Runtime's TensorRT accelerator (fp16) to ``cmgnet_onnx``.
        limits: what the served model accepts as an image.

    Returns:
        The ``config.pbtxt`` files written.

    Raises:
        DeployError: the bundle lacks its record or ``model.onnx``, or its engine's profile does not fit.
    """
    bundle, repo = Path(bundle), Path(repo)
    record_file = record_path(bundle)
    if record_file is None or not (bundle / ONNX_NAME).is_file():
        raise DeployError(f"{bundle}: not an exported bundle (no inference.json and {ONNX_NAME})")
    record = InferenceRecord.read(record_file)
    network_batching = Batching(network_max_batch, NETWORK_QUEUE_DELAY_US, network_instances, "KIND_GPU")
    configs = []

    onnx_dir = repo / ONNX_MODEL
    (onnx_dir / "1").mkdir(parents=True, exist_ok=True)
    for name in (ONNX_NAME, f"{ONNX_NAME}.data"):  # weights stored beside the graph past ONNX's 2 GB limit
        if (bundle / name).is_file():
            shutil.copy2(bundle / name, onnx_dir / "1" / name)
    configs.append(_write(onnx_dir, onnx_config(record, network_batching, tensorrt_fp16)))

    network = ONNX_MODEL
    if (bundle / ENGINE_NAME).is_file():
        from .trt_engine import EngineMetadata, metadata_path  # metadata only: TensorRT is not imported

        meta = EngineMetadata.load(metadata_path(bundle / ENGINE_NAME))
        trt_dir = repo / TRT_MODEL
        (trt_dir / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle / ENGINE_NAME, trt_dir / "1" / PLAN_NAME)
        configs.append(_write(trt_dir, tensorrt_config(record, meta.input_shapes, meta.max_batch, network_batching)))
        network, network_batching = TRT_MODEL, Batching(meta.max_batch, network_batching.queue_delay_us,
                                                        network_instances, "KIND_GPU")

    served = repo / SERVED_NAME
    version = write_model_py(served).parent
    shutil.copy2(record_file, version / record_file.name)
    for name in (TEXT_CACHE_DIR, TEXT_WEIGHTS_NAME):
        source = bundle / name
        if source.is_dir():
            shutil.copytree(source, version / name, dirs_exist_ok=True)
        elif source.is_file():
            shutil.copy2(source, version / name)
    params = {"network": network, "network_max_batch": str(network_batching.max_batch), **limits.to_parameters()}
    configs.append(_write(served, request_config(batching, params)))
    return configs


def _write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text)
    return folder / "config.pbtxt"
