"""TensorRT engines from the exported ONNX: build, metadata, compatibility checks, inference.

Built with the TensorRT Python API (``trt.Builder`` + ``trt.OnnxParser``): one optimisation
profile with batch ``1..max_batch`` (the image side fixed at the bundle's size, text fixed at
``max_length`` tokens), fp16/bf16/fp32 builder flags, a persistent timing cache. A JSON file
beside the engine (``model.engine.json``) records the TensorRT version, the GPU's compute
capability, the profile's input shapes, the text model and the SHA-256 of the ONNX file; it is
checked before the engine is deserialized, because an engine runs only under the TensorRT
version and on the GPU architecture it was built for.

Requires TensorRT >= 10 (opset-18 ONNX, name-based I/O tensors) and a CUDA GPU; buffers are
PyTorch CUDA tensors, so no pycuda is needed. With TensorRT 11+, where weakly typed builder
precision flags are gone, ``precision="typed"`` builds the ONNX as typed (convert it to fp16
first, e.g. with NVIDIA ModelOpt AutoCast) and ``fp16``/``bf16`` are refused with that advice.

Not run in this repository: its CI and development machines have no GPU and TensorRT cannot
be installed there. Everything around the TensorRT calls (the ONNX they parse, the profile
shapes, the metadata and its checks, the errors without TensorRT or a GPU) is tested; the
build and inference calls follow the TensorRT 10 Python API documentation and were not executed.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from cmgnet.inference import InferenceRecord, record_path
from cmgnet.versioned import tagged, untagged

from .errors import BackendUnavailableError, DeployError, EngineMismatchError
from .spec import IMAGE_INPUT, ONNX_NAME, OUTPUT_NAME, RECORD_NAME, TEXT_INPUTS, file_sha256

MIN_TENSORRT = (10, 0)
PRECISIONS = ("fp16", "bf16", "fp32", "typed")
_METADATA_FORMAT = "cmgnet-engine"
_METADATA_VERSION = 1
_REBUILD = "rebuild it on this machine: cmgnet export CHECKPOINT --out DIR --tensorrt require"


# ----------------------------------------------------------------------------- environment


def _package_version() -> str:
    try:
        return importlib.metadata.version("cmgnet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def require_tensorrt() -> ModuleType:
    """Import TensorRT, or explain how to get it.

    Returns:
        The ``tensorrt`` module.

    Raises:
        BackendUnavailableError: not installed, or older than :data:`MIN_TENSORRT`.
    """
    try:
        import tensorrt as trt
    except ImportError as err:
        raise BackendUnavailableError(
            "TensorRT is not installed. On a machine with an NVIDIA GPU and driver: "
            "pip install tensorrt (NVIDIA's wheels; match your CUDA major version), then rerun. "
            "Without a GPU use the ONNX Runtime backend (--backend onnxruntime), which needs no TensorRT."
        ) from err
    version = getattr(trt, "__version__", "0")
    if _version_tuple(version) < MIN_TENSORRT:
        raise BackendUnavailableError(
            f"TensorRT {version} is too old: the exported ONNX uses opset 18 and the runtime the name-based "
            f"I/O API, both TensorRT >= {'.'.join(map(str, MIN_TENSORRT))}; upgrade with pip install -U tensorrt"
        )
    return trt


@dataclass(frozen=True)
class EngineEnvironment:
    """What an engine must match to load: TensorRT version and GPU architecture."""

    tensorrt_version: str
    compute_capability: tuple[int, int]
    gpu_name: str


def current_environment(trt: ModuleType, device: int = 0) -> EngineEnvironment:
    """The TensorRT version and GPU of this process.

    Raises:
        BackendUnavailableError: no CUDA GPU is visible.
    """
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "TensorRT is installed but no CUDA GPU is visible to PyTorch: engines are built and run on the GPU "
            "they target. Check nvidia-smi and CUDA_VISIBLE_DEVICES, or use --backend onnxruntime on the CPU."
        )
    return EngineEnvironment(
        tensorrt_version=trt.__version__,
        compute_capability=tuple(torch.cuda.get_device_capability(device)),
        gpu_name=torch.cuda.get_device_name(device),
    )


# ----------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class EngineMetadata:
    """The JSON written beside a serialized engine and checked before it is loaded.

    Args:
        kind: ``"tensorrt"`` (a plan file) or ``"torch-tensorrt"`` (an ExportedProgram).
        tensorrt_version: TensorRT that built it (engines load only under the same version).
        compute_capability: ``(major, minor)`` of the GPU it was built on.
        gpu_name: that GPU's name (for messages).
        precision: builder precision (``fp16``, ``bf16``, ``fp32``, ``typed``).
        input_shapes: per input, ``{"min": [...], "opt": [...], "max": [...]}`` of the profile.
        max_batch: largest batch of the profile.
        text_model_id: text encoder whose features the engine takes (``None``: image-only).
        spec: the bundle's inference record (pre/post-processing), so the engine file is self-describing.
        onnx_sha256: hash of the ONNX file it was built from (``None`` for torch-tensorrt).
        torch_version: PyTorch that saved it (torch-tensorrt programs are tied to it).
        torch_tensorrt_version: torch-tensorrt that compiled it.
        created: UTC build time (ISO 8601).
        cmgnet_version: package version that built it.
        artifact_sha256: hash of the engine/program file itself; torch-tensorrt programs are
            unpickled by ``torch.export.load``, so one whose hash differs is never opened.
    """

    kind: str
    tensorrt_version: str
    compute_capability: tuple[int, int]
    gpu_name: str
    precision: str
    input_shapes: dict[str, dict[str, list[int]]]
    max_batch: int
    text_model_id: str | None
    spec: InferenceRecord
    onnx_sha256: str | None = None
    torch_version: str | None = None
    torch_tensorrt_version: str | None = None
    created: str = ""
    cmgnet_version: str = dataclasses.field(default_factory=lambda: _package_version())
    artifact_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["spec"] = self.spec.to_json()
        return tagged(_METADATA_FORMAT, _METADATA_VERSION, data)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str | Path = "<dict>") -> EngineMetadata:
        """Inverse of :meth:`to_json`.

        Raises:
            DeployError: not engine metadata, another version, or missing/malformed fields.
        """
        try:
            untagged(data, [(_METADATA_FORMAT, _METADATA_VERSION)])
        except ValueError as err:
            what = str(err) if not isinstance(data, dict) else \
                f"not cmgnet engine metadata of version {_METADATA_VERSION} ({err})"
            raise DeployError(f"{source}: {what}; {_REBUILD}") from None
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if missing := sorted(required - data.keys()):
            raise DeployError(f"{source}: engine metadata lacks {missing}; {_REBUILD}")
        values = {k: v for k, v in data.items() if k in names}
        try:
            values["spec"] = InferenceRecord.from_json(data["spec"], source)
            values["compute_capability"] = tuple(int(v) for v in data["compute_capability"])
            values["max_batch"] = int(data["max_batch"])
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise DeployError(f"{source}: malformed engine metadata ({err}); {_REBUILD}") from err

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> EngineMetadata:
        """Read the metadata JSON.

        Raises:
            DeployError: the file is missing or unreadable (the engine cannot be checked).
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise DeployError(
                f"{path}: engine metadata not found; an engine without it cannot be checked against this "
                f"machine, so it is not loaded; {_REBUILD}"
            ) from err
        except (OSError, ValueError) as err:
            raise DeployError(f"{path}: unreadable engine metadata ({err}); {_REBUILD}") from err
        return cls.from_json(data, path)


def metadata_path(engine_path: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def _describe_text(record: InferenceRecord) -> str:
    if record.text_model is None:
        return "no text"
    return f"{record.text_model!r} ({record.text_max_length} tokens x {record.text_hidden_size})"


def check_engine_metadata(
    meta: EngineMetadata,
    env: EngineEnvironment,
    *,
    bundle_spec: InferenceRecord | None = None,
    onnx_sha256: str | None = None,
    torch_version: str | None = None,
    source: str | Path = "engine",
) -> None:
    """Refuse an engine that does not fit this machine or the bundle it sits in.

    Args:
        meta: the engine's metadata.
        env: this process's TensorRT version and GPU.
        bundle_spec: the record (``inference.json``) beside the engine, if any: text encoder and image
            size must agree (an engine left over from an earlier export would not).
        onnx_sha256: hash of the ``model.onnx`` beside the engine, if any.
        torch_version: this process's PyTorch (checked for torch-tensorrt programs).
        source: the engine path, for the message.

    Raises:
        EngineMismatchError: listing every mismatch, what was expected, and how to rebuild.
    """
    problems = []
    if meta.tensorrt_version != env.tensorrt_version:
        problems.append(
            f"built with TensorRT {meta.tensorrt_version}, this process has TensorRT {env.tensorrt_version} "
            "(a serialized engine loads only under the TensorRT version that built it)"
        )
    if tuple(meta.compute_capability) != tuple(env.compute_capability):
        built, here = (".".join(map(str, cc)) for cc in (meta.compute_capability, env.compute_capability))
        problems.append(
            f"built for compute capability {built} ({meta.gpu_name}), this GPU is {here} ({env.gpu_name}) "
            "(engines are specific to a GPU architecture)"
        )
    if torch_version is not None and meta.torch_version is not None and meta.torch_version != torch_version:
        problems.append(f"saved with PyTorch {meta.torch_version}, this process has PyTorch {torch_version}")
    if bundle_spec is not None:
        engine_text, bundle_text = _describe_text(meta.spec), _describe_text(bundle_spec)
        if engine_text != bundle_text:  # model id, token count and width: what the engine's inputs depend on
            problems.append(f"takes text features of {engine_text}, but the bundle's {RECORD_NAME} says {bundle_text}")
        if tuple(meta.spec.image_size) != tuple(bundle_spec.image_size):
            problems.append(
                f"built for images {meta.spec.image_size}, the bundle's {RECORD_NAME} says {bundle_spec.image_size}"
            )
    if onnx_sha256 is not None and meta.onnx_sha256 is not None and meta.onnx_sha256 != onnx_sha256:
        problems.append(f"built from a different {ONNX_NAME} than the one beside it (the ONNX was re-exported)")
    if problems:
        listed = "\n  - ".join(problems)
        raise EngineMismatchError(f"{source} cannot be used here:\n  - {listed}\nFix: {_REBUILD}")


# ----------------------------------------------------------------------------- profile


@dataclass(frozen=True)
class ShapeRange:
    """One input's optimisation-profile shapes."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def onnx_input_dims(onnx_path: str | Path) -> dict[str, list[int | str]]:
    """Graph inputs of an ONNX file: fixed dims as ints, dynamic ones by their symbolic name."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    def dims(value: onnx.ValueInfoProto) -> list[int | str]:
        shape = value.type.tensor_type.shape.dim
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape]

    return {value.name: dims(value) for value in graph.input if value.name not in initializers}


def profile_shapes(
    inputs: dict[str, list[int | str]],
    image_size: tuple[int, int],
    max_batch: int,
    opt_batch: int | None = None,
) -> dict[str, ShapeRange]:
    """The single optimisation profile: batch ``1..max_batch``, everything else fixed.

    Args:
        inputs: from :func:`onnx_input_dims` (dim 0 is the batch).
        image_size: ``(height, width)`` of the bundle; dynamic image sides are fixed to it
            because the runtime always resizes to it, and a fixed size lets TensorRT pick
            the fastest kernels.
        max_batch: largest batch the engine accepts.
        opt_batch: batch TensorRT tunes for (default ``min(8, max_batch)``).

    Returns:
        ``{input name: ShapeRange}``.

    Raises:
        DeployError: bad batch bounds, or a dynamic dim this profile cannot fix.
    """
    opt_batch = min(8, max_batch) if opt_batch is None else opt_batch
    if not 1 <= opt_batch <= max_batch:
        raise DeployError(f"need 1 <= opt_batch ({opt_batch}) <= max_batch ({max_batch})")
    shapes = {}
    for name, dims in inputs.items():
        rest = []
        for axis, dim in enumerate(dims[1:], start=1):
            if isinstance(dim, int) and dim > 0:
                rest.append(dim)
            elif name == IMAGE_INPUT and axis in (2, 3):
                rest.append(image_size[axis - 2])
            else:
                raise DeployError(
                    f"input {name!r} has dynamic dim {axis} ({dim!r}); only batch and image sides may be dynamic"
                )
        shapes[name] = ShapeRange((1, *rest), (opt_batch, *rest), (max_batch, *rest))
    return shapes


# ----------------------------------------------------------------------------- build


def default_timing_cache(env: EngineEnvironment) -> Path:
    """Per-machine timing cache file (timings are valid for one TensorRT version and GPU)."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cmgnet"
    cc = "".join(map(str, env.compute_capability))
    return root / f"tensorrt-{env.tensorrt_version}-sm{cc}.timing-cache"


def _check_precision(trt: ModuleType, precision: str, env: EngineEnvironment) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    flag = {"fp16": "FP16", "bf16": "BF16"}.get(precision)
    if flag and not hasattr(trt.BuilderFlag, flag):
        raise DeployError(
            f"TensorRT {trt.__version__} builds strongly typed networks only (BuilderFlag.{flag} was removed): "
            "convert model.onnx to mixed precision (NVIDIA ModelOpt AutoCast) and build with precision='typed'"
        )
    if precision == "bf16" and env.compute_capability < (8, 0):
        raise DeployError(f"bf16 needs compute capability >= 8.0; {env.gpu_name} is {env.compute_capability}: use fp16")


def _write_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(memoryview(data))
    tmp.replace(path)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    precision: str = "fp16",
    max_batch: int = 32,
    opt_batch: int | None = None,
    workspace_gib: float = 4.0,
    timing_cache: str | Path | None = None,
    verbose: bool = False,
) -> EngineMetadata:
    """Build a TensorRT engine from a bundle's ONNX file and write its metadata beside it.

    Not run in this repository (no GPU, no TensorRT); see the module docstring.

    Args:
        onnx_path: ``model.onnx`` of an exported bundle (its ``deploy.json`` is read).
        engine_path: where to write the serialized engine (``model.engine``).
        precision: ``fp16`` (default), ``bf16`` (Ampere+), ``fp32`` or ``typed`` (see module docstring).
        max_batch: largest batch of the optimisation profile.
        opt_batch: batch the kernels are tuned for (default ``min(8, max_batch)``).
        workspace_gib: builder workspace limit.
        timing_cache: timing cache file, read if present and updated after the build
            (default: :func:`default_timing_cache`); it makes rebuilds much faster.
        verbose: TensorRT INFO logging instead of WARNING.

    Returns:
        The metadata written to ``<engine_path>.json``.

    Raises:
        BackendUnavailableError: TensorRT or a GPU is missing (checked before any work).
        DeployError: the parser rejects the ONNX, an unsupported precision, or the build fails.
    """
    trt = require_tensorrt()
    env = current_environment(trt)
    _check_precision(trt, precision, env)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    spec = InferenceRecord.read(record_path(onnx_path.parent) or onnx_path.parent / RECORD_NAME)
    shapes = profile_shapes(onnx_input_dims(onnx_path), spec.image_size, max_batch, opt_batch)

    logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if precision == "typed" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DeployError(f"TensorRT's ONNX parser rejected {onnx_path}:\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision in ("fp16", "bf16"):
        config.set_flag(getattr(trt.BuilderFlag, precision.upper()))
        # LayerNorm after attention overflows in half precision; TensorRT's advice is fp32 compute for it.
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.__class__ = trt.INormalizationLayer  # the Python binding's way to downcast an ILayer
                layer.compute_precision = trt.float32
    profile = builder.create_optimization_profile()
    for name, shape in shapes.items():
        profile.set_shape(name, shape.min, shape.opt, shape.max)
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache is not None else default_timing_cache(env)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeployError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(engine_path, serialized)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(cache_path, config.get_timing_cache().serialize())

    meta = EngineMetadata(
        kind="tensorrt",
        tensorrt_version=env.tensorrt_version,
        compute_capability=env.compute_capability,
        gpu_name=env.gpu_name,
        precision=precision,
        input_shapes={n: {"min": list(s.min), "opt": list(s.opt), "max": list(s.max)} for n, s in shapes.items()},
        max_batch=max_batch,
        text_model_id=spec.text_model,
        spec=spec,
        onnx_sha256=file_sha256(onnx_path),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    meta.save(metadata_path(engine_path))
    return meta


# ----------------------------------------------------------------------------- inference


def _torch_dtypes(trt: ModuleType) -> dict[Any, torch.dtype]:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "bool": torch.bool,
             "int32": torch.int32, "int64": torch.int64, "int8": torch.int8}
    return {getattr(trt, name): dtype for name, dtype in table.items() if hasattr(trt, name)}


def bundle_checks(engine_path: Path) -> tuple[InferenceRecord | None, str | None]:
    """The record (``inference.json``, or an older ``deploy.json``) and ``model.onnx`` hash beside an engine, where present."""
    folder = engine_path.parent
    found = record_path(folder)
    spec = InferenceRecord.read(found) if found is not None else None
    sha = file_sha256(folder / ONNX_NAME) if (folder / ONNX_NAME).is_file() else None
    return spec, sha


class TensorRTRunner:
    """Runs a serialized engine on the GPU (a :class:`cmgnet.deploy.runtime.Runner`).

    The metadata is read and checked first (clear errors for a missing TensorRT, a missing
    GPU, another TensorRT version or GPU, a stale engine), then the engine is deserialized.
    Not run in this repository (no GPU, no TensorRT); see the module docstring.

    Args:
        engine_path: the ``.engine`` file (its ``.engine.json`` beside it).
        device: CUDA device index.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, device: int = 0) -> None:
        self.path = Path(engine_path)
        self.metadata = EngineMetadata.load(metadata_path(self.path))
        trt = require_tensorrt()
        env = current_environment(trt, device)
        bundle_spec, onnx_sha = bundle_checks(self.path)
        check_engine_metadata(self.metadata, env, bundle_spec=bundle_spec, onnx_sha256=onnx_sha, source=self.path)

        self.device = torch.device("cuda", device)
        self.max_batch = self.metadata.max_batch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(
                f"{self.path}: TensorRT could not deserialize the engine (see its log); {_REBUILD}"
            )
        self.context = self.engine.create_execution_context()
        dtypes = _torch_dtypes(trt)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        expected = list(self.metadata.spec.input_names)
        if sorted(self.inputs) != sorted(expected) or OUTPUT_NAME not in names:
            raise EngineMismatchError(
                f"{self.path}: engine tensors {names} are not {expected} -> {OUTPUT_NAME!r}; {_REBUILD}"
            )

    def __call__(self, image: Tensor, text_features: Tensor | None, text_mask: Tensor | None) -> Tensor:
        given = {IMAGE_INPUT: image, TEXT_INPUTS[0]: text_features, TEXT_INPUTS[1]: text_mask}
        if image.shape[0] > self.max_batch:
            raise DeployError(f"batch {image.shape[0]} exceeds the engine's profile maximum {self.max_batch}")
        stream = torch.cuda.current_stream(self.device)
        keep = []  # device buffers must outlive the asynchronous launch
        for name in self.inputs:
            tensor = given[name].to(self.device, self.dtypes[name]).contiguous()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        shape = tuple(self.context.get_tensor_shape(OUTPUT_NAME))
        out = torch.empty(shape, dtype=self.dtypes[OUTPUT_NAME], device=self.device)
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise DeployError(f"{self.path}: TensorRT execution failed (see its log)")
        stream.synchronize()
        return out.float().cpu()

