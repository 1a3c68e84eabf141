"""torch-tensorrt path: the network compiled ahead of time into an ExportedProgram with TensorRT engines.

The alternative to ONNX -> TensorRT: ``torch_tensorrt.compile(ir="dynamo")`` traces the model
with ``torch.export``, converts supported subgraphs to TensorRT engines (the rest stays in
PyTorch, so an unsupported op never blocks deployment) and ``torch_tensorrt.save`` writes
``model_trt.ep``. Inputs and outputs are those of ``model.onnx`` (image, text features, text
mask -> logits) with the same batch ``1..max_batch`` profile; the same metadata JSON as the
TensorRT engine sits beside it, plus the PyTorch version (ExportedPrograms are tied to it).

fp16: torch-tensorrt releases with rule-based autocast (``enable_autocast``) get it, older
ones the ``enabled_precisions`` builder flag.

Not run in this repository: no GPU, and torch-tensorrt cannot be installed on its CI or
development machines. The metadata, checks and errors without torch-tensorrt are tested; the
compile/save/load calls follow the torch-tensorrt documentation and were not executed.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from cmgnet import kernels
from cmgnet.model import SegmentationModel

from .errors import BackendUnavailableError, DeployError
from cmgnet.inference import InferenceRecord

from .spec import file_sha256
from .trt_engine import (
    EngineMetadata,
    bundle_checks,
    check_engine_metadata,
    current_environment,
    metadata_path,
    require_tensorrt,
)

PRECISIONS = ("fp16", "fp32")


def require_torch_tensorrt() -> ModuleType:
    """Import torch-tensorrt, or explain how to get it.

    Raises:
        BackendUnavailableError: not installed.
    """
    try:
        import torch_tensorrt
    except ImportError as err:
        raise BackendUnavailableError(
            "torch-tensorrt is not installed. On a machine with an NVIDIA GPU: pip install torch-tensorrt "
            f"(the release built for PyTorch {torch.__version__.split('+')[0]}). "
            "Without a GPU use the ONNX Runtime backend (--backend onnxruntime)."
        ) from err
    return torch_tensorrt


def example_inputs(spec: InferenceRecord, batch: int, device: str | torch.device = "cpu") -> tuple[Tensor, ...]:
    """Inputs of the network's traced signature: image (+ text features and mask) at ``batch``."""
    image = torch.randn(batch, 3, *spec.image_size, device=device)
    if spec.text_model is None:
        return (image,)
    features = torch.randn(batch, spec.text_max_length, spec.text_hidden_size, device=device)
    mask = torch.ones(batch, spec.text_max_length, dtype=torch.bool, device=device)
    return image, features, mask


def compile_torch_tensorrt(
    model: SegmentationModel,
    spec: InferenceRecord,
    out_path: str | Path,
    *,
    precision: str = "fp16",
    max_batch: int = 32,
    opt_batch: int | None = None,
) -> EngineMetadata:
    """Compile ``model`` with torch-tensorrt and save it as an ExportedProgram plus metadata.

    Not run in this repository (no GPU, no torch-tensorrt); see the module docstring.

    Args:
        model: the network.
        spec: its inference record (image size, text encoder).
        out_path: the ``.ep`` file to write (metadata goes to ``<out_path>.json``).
        precision: ``fp16`` or ``fp32``.
        max_batch: largest batch accepted.
        opt_batch: batch TensorRT tunes for (default ``min(8, max_batch)``).

    Returns:
        The metadata written beside the program.

    Raises:
        BackendUnavailableError: torch-tensorrt, TensorRT or a GPU is missing.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    torch_tensorrt = require_torch_tensorrt()
    env = current_environment(require_tensorrt())
    opt_batch = min(8, max_batch) if opt_batch is None else opt_batch
    model = model.eval().cuda()
    shapes, inputs = {}, []
    for name, tensor in zip(spec.input_names, example_inputs(spec, 1, "cuda")):
        rest = tuple(tensor.shape[1:])
        shape = {"min": [1, *rest], "opt": [opt_batch, *rest], "max": [max_batch, *rest]}
        shapes[name] = shape
        inputs.append(torch_tensorrt.Input(min_shape=shape["min"], opt_shape=shape["opt"], max_shape=shape["max"],
                                           dtype=tensor.dtype, name=name))
    options = {}
    if precision == "fp16":
        settings = {f.name for f in dataclasses.fields(torch_tensorrt.dynamo.CompilationSettings)}
        # TensorRT >= 10.12 deprecates weak typing; newer torch-tensorrt replaces it with an autocast pass.
        if "enable_autocast" in settings:
            options = {"use_explicit_typing": True, "enable_autocast": True, "low_precision_type": torch.float16}
        else:
            options = {"enabled_precisions": {torch.float16, torch.float32}}
    # Plain SDPA attention: Triton kernels (the CUDA default for some shapes) are not TensorRT-convertible.
    with torch.no_grad(), kernels.use_backend("sdpa"):
        compiled = torch_tensorrt.compile(model, ir="dynamo", inputs=inputs, **options)
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        torch_tensorrt.save(compiled, str(out_path), output_format="exported_program",
                            inputs=list(example_inputs(spec, opt_batch, "cuda")))
    meta = EngineMetadata(
        kind="torch-tensorrt",
        tensorrt_version=env.tensorrt_version,
        compute_capability=env.compute_capability,
        gpu_name=env.gpu_name,
        precision=precision,
        input_shapes=shapes,
        max_batch=max_batch,
        text_model_id=spec.text_model,
        spec=spec,
        torch_version=torch.__version__,
        torch_tensorrt_version=torch_tensorrt.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        artifact_sha256=file_sha256(out_path),
    )
    meta.save(metadata_path(out_path))
    return meta


def verify_program_hash(path: Path, metadata: EngineMetadata) -> None:
    """Refuse an ``.ep`` file that is not byte-for-byte the one the project's export wrote.

    ``torch.export.load`` unpickles parts of the file, so it must come from a trusted source;
    the SHA-256 recorded by :func:`compile_torch_tensorrt` is checked before anything is loaded.

    Raises:
        DeployError: no recorded hash, or the file's hash differs.
    """
    if metadata.artifact_sha256 is None:
        raise DeployError(f"{path}: its metadata {metadata_path(path).name} records no SHA-256, so the file cannot be "
                          "checked before torch unpickles it; recompile it with `cmgnet export --torch-tensorrt`")
    actual = file_sha256(path)
    if actual != metadata.artifact_sha256:
        raise DeployError(f"{path}: SHA-256 {actual[:12]}... differs from {metadata.artifact_sha256[:12]}... recorded in "
                          f"{metadata_path(path).name} at export: not the file the project wrote, refusing to "
                          "unpickle it; recompile it with `cmgnet export --torch-tensorrt`")


class TorchTensorRTRunner:
    """Runs a saved torch-tensorrt program on the GPU (a :class:`cmgnet.deploy.runtime.Runner`).

    Not run in this repository (no GPU, no torch-tensorrt); see the module docstring.

    Args:
        path: the ``.ep`` file (its ``.ep.json`` beside it).
    """

    name = "torch-tensorrt"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.metadata = EngineMetadata.load(metadata_path(self.path))
        if self.metadata.kind != "torch-tensorrt":
            raise DeployError(f"{self.path}: metadata describes a {self.metadata.kind!r} artefact, not torch-tensorrt")
        verify_program_hash(self.path, self.metadata)
        require_torch_tensorrt()  # registers the TensorRT engine op that torch.export.load needs
        env = current_environment(require_tensorrt())
        bundle_spec, _ = bundle_checks(self.path)
        check_engine_metadata(
            self.metadata, env, bundle_spec=bundle_spec, torch_version=torch.__version__, source=self.path
        )
        self.max_batch = self.metadata.max_batch
        self.module = torch.export.load(str(self.path)).module()

    def __call__(self, image: Tensor, text_features: Tensor | None, text_mask: Tensor | None) -> Tensor:
        if image.shape[0] > self.max_batch:
            raise DeployError(f"batch {image.shape[0]} exceeds the compiled maximum {self.max_batch}")
        args = [image] if self.metadata.spec.text_model is None else [image, text_features, text_mask]
        with torch.inference_mode():
            out = self.module(*[a.cuda(non_blocking=True) for a in args])
        return out.float().cpu()
