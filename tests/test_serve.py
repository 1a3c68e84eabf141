"""Serving: ``cmgnet serve`` (a real Triton Inference Server on 127.0.0.1), its client and the exported repository.

A tiny model trained at a non-default size (48 px) and normalisation (mean 0.5, std 0.25)
with recorded post-processing is served once per module; its masks must equal the
predictor's (:class:`cmgnet.deploy.Segmenter`) for the same images and metadata, for 8
concurrent clients, and every bad request must get an error naming the problem while the
server keeps serving. The repository ``cmgnet export --triton-repo`` writes is checked against
Triton's model-configuration schema, and its Python-backend part runs on the same bundled
``tritonserver``; the network's own backends (ONNX Runtime, TensorRT) are not in that
server, so a Python-backend stand-in running the same ``model.onnx`` takes their place.

Server tests skip, with the reason, where no serving environment (numpy < 2, nvidia-pytriton:
``make setup`` makes ``.venv-serve``) exists.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmgnet.cli import main as cli_main
from cmgnet.data.metadata import MetadataEntry, entry_from_mapping
from cmgnet.deploy.server import ServeError, find_serving_env, launch, model_path, served_tta
from cmgnet.deploy.triton_model import RequestHandler
from cmgnet.deploy.triton_repo import (
    ONNX_MODEL,
    SERVED_NAME,
    Batching,
    RequestLimits,
    onnx_config,
    serve_config,
    tensorrt_config,
)
from cmgnet.errors import UsageError
from cmgnet.inference import InferenceRecord

SIZE = 48
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
STARTUP_S = 300  # model load in the stub: torch import, ONNX Runtime session (minutes on a busy 2-core machine)
SIZES = [(70, 50, "JPEG"), (40, 90, "PNG"), (64, 64, "BMP"), (47, 33, "PNG"), (96, 120, "JPEG"), (48, 48, "PNG"),
         (100, 30, "JPEG"), (55, 81, "PNG")]
"""Width, height and format of the served test images: landscape and portrait, none at the network's size."""
METADATA = [{"age": 55, "sex": "male", "site": "back"}, None, {"age": "70", "sex": "f"}, {"site": "face"},
            {"description": "Asymmetric lesion with irregular borders."}, None, {"sex": "female", "age": 31},
            {"age": 40}]


def _model_config_pb2():
    pytest.importorskip("google.protobuf", reason="protobuf (cmgnet[client]) is not installed")
    return pytest.importorskip("tritonclient.grpc.model_config_pb2",
                               reason="tritonclient (cmgnet[client]) is not installed").ModelConfig


def _parse(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, _model_config_pb2()())


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# ----------------------------------------------------------------------------- without a server


def test_configs_parse_against_tritons_schema():
    record = InferenceRecord(image_size=(SIZE, 64), mean=MEAN, std=STD, text_model="tiny-random-bert",
                             text_max_length=24, text_hidden_size=32, model="cmgnet")
    served = _parse(serve_config("/models/x", Batching(8, 5000, 2), RequestLimits(max_pixels=10**6), tta=False))
    assert served.backend == "python" and served.max_batch_size == 8
    assert served.dynamic_batching.max_queue_delay_microseconds == 5000
    [group] = served.instance_group
    assert group.count == 2 and group.kind == group.KIND_CPU
    assert [(i.name, i.optional) for i in served.input] == [("IMAGE", False), ("METADATA", True)]
    assert served.output[0].name == "MASK" and list(served.output[0].dims) == [-1, -1]
    assert served.parameters["model"].string_value == "/models/x"
    assert served.parameters["max_pixels"].string_value == "1000000"
    assert served.parameters["tta"].string_value == "false"
    assert "tta" not in _parse(serve_config("/m", Batching(), RequestLimits())).parameters  # as recorded
    unbatched = _parse(serve_config("/m", Batching(1, 0), RequestLimits()))
    assert not unbatched.HasField("dynamic_batching")  # --max-batch 1: every request alone

    onnx = _parse(onnx_config(record, Batching(32, 500, 1, "KIND_GPU"), tensorrt_fp16=True))
    assert onnx.platform == "onnxruntime_onnx" and onnx.max_batch_size == 32
    assert {i.name: list(i.dims) for i in onnx.input} == {"image": [3, SIZE, 64], "text_features": [24, 32],
                                                          "text_mask": [24]}
    [accelerator] = onnx.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"

    shapes = {"image": {"min": [1, 3, SIZE, 64], "opt": [8, 3, SIZE, 64], "max": [16, 3, SIZE, 64]},
              "text_features": {"min": [1, 24, 32], "opt": [8, 24, 32], "max": [16, 24, 32]},
              "text_mask": {"min": [1, 24], "opt": [8, 24], "max": [16, 24]}}
    plan = _parse(tensorrt_config(record, shapes, 16, Batching(kind="KIND_GPU")))
    assert plan.platform == "tensorrt_plan" and plan.max_batch_size == 16  # the profile's, not the default
    assert {i.name: list(i.dims) for i in plan.input} == {n: s["max"][1:] for n, s in shapes.items()}
    assert plan.HasField("dynamic_batching") and plan.instance_group[0].kind == plan.instance_group[0].KIND_GPU


def test_tensorrt_config_refuses_a_profile_that_is_not_the_config():
    from cmgnet.deploy import DeployError

    record = InferenceRecord(image_size=(SIZE, SIZE))
    varying = {"image": {"min": [1, 3, 32, 32], "opt": [4, 3, SIZE, SIZE], "max": [8, 3, SIZE, SIZE]}}
    with pytest.raises(DeployError, match="fixed other dimensions"):
        tensorrt_config(record, varying, 8, Batching())
    with pytest.raises(DeployError, match="inputs"):
        tensorrt_config(record, {"pixels": varying["image"]}, 8, Batching())


class _FakeSegmenter:
    """Masks that encode which image and metadata they were made from."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def predict(self, images, texts):
        from types import SimpleNamespace

        self.calls.append(len(images))
        return [SimpleNamespace(mask=np.full(image.shape[:2], (t is not None) and t.age == 55, dtype=bool))
                for image, t in zip(images, texts)]


def _item(data: bytes) -> np.ndarray:
    return np.array([[data]], dtype=object)


def test_request_handler_answers_each_request_of_a_batch_on_its_own():
    segmenter = _FakeSegmenter()
    handler = RequestHandler(segmenter, RequestLimits())
    good = _encoded(np.zeros((20, 30, 3), np.uint8), "PNG")
    results = handler([(_item(good), _item(b'{"age": 55}')), (_item(b"nope"), None), (_item(good), None),
                       (_item(good), _item(b"{oops"))])
    assert segmenter.calls == [2]  # the two valid requests in one predictor call
    assert results[0].shape == (1, 20, 30) and results[0].dtype == np.uint8 and (results[0] == 255).all()
    assert (results[2] == 0).all()
    assert "IMAGE[0]: unreadable image" in str(results[1]) and "METADATA[0]: not valid JSON" in str(results[3])


def test_metadata_json_takes_the_csv_columns_rules():
    assert entry_from_mapping({"age": 55, "sex": "M", "site": "lower_extremity"}) == MetadataEntry(
        age=55.0, sex="male", site="lower extremity")
    for bad, message in (({"age": 200}, "age"), ({"weight": 1}, "unknown key"), ({"sex": ["m"]}, "string or a number")):
        with pytest.raises(ValueError, match=message):
            entry_from_mapping(bad)


def test_serve_refuses_a_port_in_use_in_one_line(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        grpc, metrics = _free_ports(2)
        assert cli_main(["serve", "isic-cmgnet-lite0", "--port", str(port), "--grpc-port", str(grpc),
                         "--metrics-port", str(metrics)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    # Either the serving environment is missing (said so) or the port is named.
    assert f"127.0.0.1:{port} is not available" in err or "no serving environment" in err


def test_serve_checks_tta_against_the_models_record_before_starting(capsys):
    """The shipped model records one pass: --tta needs --force, and is refused before any server starts."""
    model = model_path("isic-cmgnet-lite0")
    assert served_tta(model, None, False) is None and served_tta(model, False, False) is False
    with pytest.raises(UsageError, match=r"--tta True overrides tta=False recorded in .*inference\.json"):
        served_tta(model, True, False)
    assert served_tta(model, True, True) is True
    capsys.readouterr()
    assert cli_main(["serve", "isic-cmgnet-lite0", "--tta"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --force" in err and "Traceback" not in err


def test_serve_refuses_a_numpy_2_environment_in_one_line(monkeypatch, capsys):
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        pytest.skip("this environment has numpy < 2")
    monkeypatch.setenv("CMGNET_SERVE_ENV", sys.executable)
    assert cli_main(["serve", "isic-cmgnet-lite0"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"numpy {numpy.__version__}" in err and "needs numpy < 2" in err


# ----------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def serving_env():
    pytest.importorskip("tritonclient.grpc", reason="tritonclient (cmgnet[client]) is not installed")
    try:
        return find_serving_env()
    except ServeError as err:
        pytest.skip(f"no serving environment for Triton ({err})")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch tiny run at 48 px, mean 0.5, std 0.25, largest+fill; its images as files of assorted sizes."""
    from cmgnet.data.readers import read_dataset
    from cmgnet.train import Trainer
    from cmgnet.train.testing import synthetic_dataset, tiny_experiment

    root = tmp_path_factory.mktemp("serve")
    data = synthetic_dataset(root / "data", n_train=8, n_val=4, n_test=4, size=SIZE)
    cfg = tiny_experiment(data, root / "runs", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
                          "data.text_regime_eval=metadata", "eval.hd95=false", "eval.postprocess=largest+fill",
                          "train.epochs=1", image_size=SIZE)
    best = Trainer(cfg).fit().best_dir
    record = InferenceRecord.load(best)
    assert record.image_size == (SIZE, SIZE) and record.mean == MEAN and record.postprocess == "largest+fill"
    test = sorted((r for r in read_dataset("isic2017", data) if r.split == "test"), key=lambda r: r.image_id)
    pixels = [np.array(Image.open(r.image_path).convert("RGB")) for r in test]
    files = [_encoded(np.array(Image.fromarray(pixels[i % len(pixels)]).resize((w, h))), fmt)
             for i, (w, h, fmt) in enumerate(SIZES)]
    return {"best": best, "root": root, "files": files}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache folder (the ONNX export of the checkpoint), inherited by the server process."""
    folder = tmp_path_factory.mktemp("cache")
    before = os.environ.get("CMGNET_CACHE_DIR")
    os.environ["CMGNET_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("CMGNET_CACHE_DIR", None)
    else:
        os.environ["CMGNET_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def expected(serving_env, trained, cache):
    """The predictor's masks for the served images (its load also fills the cache the server then reuses)."""
    return _predicted(trained)


@pytest.fixture(scope="module")
def expected_tta(serving_env, trained, cache):
    """The same with flip TTA, as the ``server`` fixture serves the model (its record says no TTA)."""
    return _predicted(trained, tta=True, force=True)


def _predicted(trained, **settings):
    from cmgnet.data.imageio import decode_image
    from cmgnet.deploy import Segmenter

    segmenter = Segmenter.load(trained["best"], **settings)
    images = [decode_image(np.frombuffer(f, np.uint8), Path("test")) for f in trained["files"]]
    texts = [entry_from_mapping(m) if m else None for m in METADATA]
    return [p.mask.astype(np.uint8) * 255 for p in segmenter.predict(images, texts)]


@pytest.fixture(scope="module")
def server(serving_env, trained, expected):
    """``cmgnet serve`` as a user runs it (the CLI, in a process of its own), stopped with SIGTERM at the end."""
    http, grpc, metrics = _free_ports(3)
    command = [sys.executable, "-m", "cmgnet.cli", "serve", str(trained["best"]), "--port", str(http),
               "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--queue-delay-us", "100000",
               "--tta", "--force"]  # the record says no TTA: the flag reaches the predictor in the server
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + STARTUP_S
    while not _ready(http):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            reader.join(5)
            pytest.fail(f"cmgnet serve did not become ready (exit {process.poll()}):\n{''.join(lines)[-3000:]}")
        time.sleep(0.5)
    while not (repository := re.search(r"repository (\S+)", "".join(lines))) and time.monotonic() < deadline:
        time.sleep(0.1)  # the banner follows readiness
    assert repository, "".join(lines)
    yield {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "metrics": f"127.0.0.1:{metrics}",
           "process": process, "repository": Path(repository.group(1))}
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)
    reader.join(5)
    assert code == 0, "".join(lines)[-3000:]
    assert not Path(repository.group(1)).parent.exists(), "the temporary folder was left behind"


def _ready(http: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _metric(server, name: str) -> float:
    with urllib.request.urlopen(f"http://{server['metrics']}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf'^{name}{{model="{SERVED_NAME}",version="1"}} (\S+)$', text, re.M)
    assert match, f"{name} not among the metrics"
    return float(match.group(1))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_server_answers_8_concurrent_clients_with_the_predictors_masks(server, trained, expected_tta):
    from cmgnet.deploy.client import SegmentationClient

    executions = _metric(server, "nv_inference_exec_count")
    barrier = threading.Barrier(len(SIZES))
    masks: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            remote = SegmentationClient(server["grpc"], "grpc") if i % 2 else SegmentationClient(server["http"])
            barrier.wait(timeout=60)
            masks[i] = remote.segment(trained["files"][i], METADATA[i])
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(SIZES))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    for i, (width, height, _) in enumerate(SIZES):
        assert masks[i].shape == (height, width) and masks[i].dtype == np.uint8
        assert set(np.unique(masks[i])) <= {0, 255}
        assert (masks[i] != expected_tta[i]).sum() <= 1, f"image {i}: the server's mask is not the predictor's"
    # The dynamic batcher grouped them: fewer model executions than requests.
    assert _metric(server, "nv_inference_exec_count") - executions < len(SIZES)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_infer_remote_writes_the_servers_masks(server, trained, expected_tta, tmp_path):
    import csv

    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, (_, _, fmt) in enumerate(SIZES):
        (images / f"lesion{i}.{fmt.lower().replace('jpeg', 'jpg')}").write_bytes(trained["files"][i])
        rows.append({"image_id": f"lesion{i}", **{k: "" for k in ("age", "sex", "site", "description")},
                     **{k: str(v) for k, v in (METADATA[i] or {}).items()}})
    with open(tmp_path / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image_id", "age", "sex", "site", "description"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    assert cli_main(["infer-remote", str(images), "--url", server["grpc"], "--protocol", "grpc", "--out", str(out),
                     "--metadata", str(tmp_path / "metadata.csv")]) == 0
    for i in range(len(SIZES)):
        mask = np.array(Image.open(out / "masks" / f"lesion{i}.png"))
        assert (mask != expected_tta[i]).sum() <= 1, i


BAD_REQUESTS = {
    "not an image": (lambda files: b"plain text, not an image", "IMAGE[0]: unreadable image"),
    "truncated JPEG": (lambda files: files[0][: len(files[0]) // 2], "IMAGE[0]: truncated"),
    "1 x 1 image": (lambda files: _encoded(np.zeros((1, 1, 3), np.uint8), "PNG"), "1x1, below the 16-pixel minimum"),
    "10000 x 10 image": (lambda files: _encoded(np.zeros((10, 10000, 3), np.uint8), "PNG"), "10000x10, below"),
    "elongated image": (lambda files: _encoded(np.zeros((20, 400, 3), np.uint8), "PNG"), "more elongated than"),
    "above the pixel limit": (lambda files: _encoded(np.zeros((9000, 9000), np.uint8), "PNG"), "above the 80 MP"),
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_server_refuses_each_bad_request_names_it_and_keeps_serving(server, trained, expected_tta, cache):
    from cmgnet.deploy.client import RemoteError, SegmentationClient

    http = SegmentationClient(server["http"])
    watched = [trained["best"], cache, server["repository"].parent]  # the model, the cache, the server's folder
    before = _files(watched)
    for make, message in BAD_REQUESTS.values():
        with pytest.raises(RemoteError, match=re.escape(message)):
            http.segment(make(trained["files"]))
    for metadata, message in (("{not json", "METADATA[0]: not valid JSON"), ("[1, 2]", "expected a JSON object"),
                              ('{"age": "old"}', "age 'old' is not a number"), ('{"colour": "red"}', "unknown key")):
        with pytest.raises(RemoteError, match=re.escape(message)):
            _raw_infer(http, [("IMAGE", [[trained["files"][0]]], "BYTES"), ("METADATA", [[metadata.encode()]], "BYTES")])
    with pytest.raises(RemoteError, match="data-type is 'UINT8', but model 'cmgnet' expects 'BYTES'"):
        _raw_infer(http, [("IMAGE", np.zeros((1, 1), np.uint8), "UINT8")])
    with pytest.raises(RemoteError, match="IMAGE: missing required input"):
        _raw_infer(http, [("METADATA", [[b"{}"]], "BYTES")])
    # Still serving, and nothing was written: not beside the model, in the cache or in the server's folder.
    assert (http.segment(trained["files"][1], METADATA[1]) == expected_tta[1]).all()
    assert _files(watched) == before
    assert server["process"].poll() is None


def _raw_infer(client, tensors):
    """A request built by hand (wrong types, missing inputs), through the client's connection."""
    from cmgnet.deploy.client import RemoteError

    inputs = []
    for name, value, dtype in tensors:
        tensor = client.module.InferInput(name, list(np.shape(value)), dtype)
        tensor.set_data_from_numpy(np.array(value, dtype=object if dtype == "BYTES" else None))
        inputs.append(tensor)
    try:
        return client.client.infer(SERVED_NAME, inputs)
    except Exception as err:  # noqa: BLE001 - the server's InferenceServerException
        raise RemoteError(err.message() if callable(getattr(err, "message", None)) else str(err)) from None


def _files(folders) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for folder in folders for p in Path(folder).rglob("*")
            if p.is_file() and ".pytest_cache" not in p.parts and "__pycache__" not in p.parts}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_reports_a_model_that_fails_to_load_in_one_line(serving_env, trained, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(trained["best"], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    ports = [str(p) for p in _free_ports(3)]
    assert cli_main(["serve", str(damaged), "--port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: the server stopped before the model was ready") and str(weights) in err


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_server_health_readiness_and_metrics(server):
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{SERVED_NAME}/ready"):
        with urllib.request.urlopen(f"http://{server['http']}{path}", timeout=10) as response:
            assert response.status == 200, path
    with urllib.request.urlopen(f"http://{server['http']}/v2/models/{SERVED_NAME}/config", timeout=10) as response:
        config = json.loads(response.read())
    assert config["max_batch_size"] == 8 and "dynamic_batching" in config
    assert _metric(server, "nv_inference_request_success") >= 0


# ----------------------------------------------------------------------------- the exported repository


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """``cmgnet export CHECKPOINT --triton-repo DIR``: the repository alone (its bundle a temporary step)."""
    repo = tmp_path_factory.mktemp("exported") / "repo"
    assert cli_main(["export", str(trained["best"]), "--triton-repo", str(repo), "--verify-batches", "1",
                     "--tensorrt", "skip", "--triton-instances", "2"]) == 0
    return {"repo": repo}


@pytest.fixture(scope="module")
def schema():
    """Triton's ModelConfig message (skips, before any export, without tritonclient)."""
    return _model_config_pb2()


@pytest.mark.slow
def test_exported_repository_configs_parse(schema, exported):
    configs = {p.parent.name: _parse(p.read_text()) for p in exported["repo"].glob("*/config.pbtxt")}
    assert set(configs) == {SERVED_NAME, ONNX_MODEL}  # no TensorRT here: no plan
    for name, config in configs.items():
        assert config.name == name and config.HasField("dynamic_batching") and config.instance_group, name
    assert configs[SERVED_NAME].parameters["network"].string_value == ONNX_MODEL
    assert configs[SERVED_NAME].instance_group[0].count == 2
    assert configs[ONNX_MODEL].platform == "onnxruntime_onnx" and configs[ONNX_MODEL].max_batch_size == 32
    assert {i.name: list(i.dims) for i in configs[ONNX_MODEL].input}["image"] == [3, SIZE, SIZE]
    assert (exported["repo"] / ONNX_MODEL / "1" / "model.onnx").is_file()
    assert (exported["repo"] / SERVED_NAME / "1" / "inference.json").is_file()


STAND_IN = '''
"""Test stand-in for Triton's ONNX Runtime backend (absent from the bundled server): the same model.onnx."""
import json
from pathlib import Path

import onnxruntime
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.output = config["output"][0]["name"]
        folder = Path(args["model_repository"]) / args["model_version"]
        self.session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            logits = self.session.run([self.output], feeds)[0]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output, logits)]))
        return responses
'''


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_exported_repository_python_model_runs_on_the_bundled_server(serving_env, exported, trained, expected,
                                                                     tmp_path):
    from google.protobuf import text_format

    from cmgnet.deploy.client import SegmentationClient

    repo = tmp_path / "repo"
    shutil.copytree(exported["repo"], repo)
    network = _parse((repo / ONNX_MODEL / "config.pbtxt").read_text())
    network.platform, network.backend = "", "python"  # same name, inputs and outputs; no GPU, no accelerator
    network.ClearField("optimization")
    for group in network.instance_group:
        group.kind = group.KIND_CPU
    (repo / ONNX_MODEL / "config.pbtxt").write_text(text_format.MessageToString(network))
    (repo / ONNX_MODEL / "1" / "model.py").write_text(STAND_IN)

    http, grpc, metrics = _free_ports(3)
    server = launch(repo, serving_env, "127.0.0.1", {"--port": http, "--grpc-port": grpc, "--metrics-port": metrics})
    try:
        server.wait_ready(timeout=STARTUP_S)
        client = SegmentationClient(f"127.0.0.1:{grpc}", "grpc")
        masks = [client.segment(f, m) for f, m in zip(trained["files"][:4], METADATA[:4])]
        with pytest.raises(Exception, match="IMAGE\\[0\\]: truncated"):
            client.segment(trained["files"][0][:-300])
    finally:
        code = server.stop()
    assert code == 0
    for i, mask in enumerate(masks):  # the predictor's on the checkpoint: same record, same network
        assert (mask != expected[i]).sum() <= 1, i
