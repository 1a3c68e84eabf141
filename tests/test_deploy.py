"""Deploy: ONNX export and its checks, ONNX Runtime parity, the Segmenter runtime, `cmgnet predict`.

One tiny CMG-Net is exported once per module (the export dominates the run time); the tests
then exercise the bundle from every side.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from cmgnet.cli import main as cli_main
from cmgnet.data.records import LesionRecord
from cmgnet.deploy import BackendUnavailableError, DeployError, Segmenter
from cmgnet.deploy.export import STANDARD_SENTENCES, _build_tensorrt, verify_onnx
from cmgnet.deploy.predict import lesion_statistics
from cmgnet.deploy.runners import onnxruntime_session, preprocess
from cmgnet.deploy.runtime import bundle_text_encoder, postprocess
from cmgnet.deploy.spec import ENGINE_NAME, INT8_ONNX_NAME, ONNX_NAME, RECORD_NAME, TEXT_CACHE_DIR, file_sha256
from cmgnet.deploy.trt_engine import onnx_input_dims, profile_shapes
from cmgnet.errors import UsageError
from cmgnet.inference import InferenceRecord
from cmgnet.model import CMGNet
from cmgnet.text import NEUTRAL_SENTENCE
from cmgnet.text.pseudo_text import TEMPLATES
from cmgnet.train.tracking import log_to_run

SIZE = 64
MELANOMA = TEMPLATES["melanoma"]


def _images(count: int, seed: int = 0) -> list[np.ndarray]:
    """RGB images of assorted sizes (not multiples of 16, portrait and landscape)."""
    rng = np.random.default_rng(seed)
    sizes = [(50, 70), (90, 40), (64, 64), (33, 47), (120, 96)]
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(count)]


def _record(**fields) -> LesionRecord:
    values = dict(diagnosis=None, age=None, sex=None, site=None, description=None)
    return LesionRecord(image_id="x", image_path="x.jpg", mask_path=None, split=None, source="test",
                        **(values | fields))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny checkpoint exported with `cmgnet export` (int8 included); yields its paths and model."""
    root = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    model = CMGNet(tiny_config()).eval()
    with torch.no_grad():  # centre the logits so masks are neither empty nor full: comparisons mean something
        model.head.bias -= model(torch.randn(2, 3, SIZE, SIZE)).median()
    model.save_pretrained(root / "checkpoint")
    calibration = root / "calibration"
    calibration.mkdir()
    for i, image in enumerate(_images(3, seed=1)):
        Image.fromarray(image).save(calibration / f"c{i}.png")
    rc = cli_main([
        "export", str(root / "checkpoint"), "--out", str(root / "bundle"), "--image-size", str(SIZE),
        "--verify-batches", "1", "3", "--max-batch", "4", "--int8-calibration", str(calibration),
    ])
    return {"rc": rc, "checkpoint": root / "checkpoint", "bundle": root / "bundle", "model": model, "root": root}


# ----------------------------------------------------------------------------- export


def test_export_writes_a_complete_bundle(exported):
    bundle = exported["bundle"]
    assert exported["rc"] == 0
    for name in (ONNX_NAME, RECORD_NAME, INT8_ONNX_NAME, "model.int8.agreement.json"):
        assert (bundle / name).is_file(), name
    assert any((bundle / TEXT_CACHE_DIR).iterdir())
    assert not (bundle / ENGINE_NAME).exists()  # no TensorRT here: skipped, not failed
    assert not (bundle / "deploy.json").exists()  # one record, one file name
    record = InferenceRecord.load(bundle)
    assert record.image_size == (SIZE, SIZE) and record.threshold == 0.5 and record.opset == 18
    assert record.text_model == "tiny-random-bert" and record.text_max_length == 24 and record.text_hidden_size == 32
    assert record.model == "cmgnet" and record.text_cache == TEXT_CACHE_DIR and record.network_config["base_width"] == 8
    agreement = json.loads((bundle / "model.int8.agreement.json").read_text())
    assert agreement["images"] == 3 and 0.0 <= agreement["mean_dice"] <= 1.0


def test_onnx_graph_passes_checker_and_has_the_documented_io(exported):
    path = exported["bundle"] / ONNX_NAME
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    assert {op.domain: op.version for op in model.opset_import}[""] == 18
    dims = onnx_input_dims(path)
    assert dims == {
        "image": ["batch", 3, "height", "width"], "text_features": ["batch", 24, 32], "text_mask": ["batch", 24],
    }
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    float_, bool_ = onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL
    assert types == {"image": float_, "text_features": float_, "text_mask": bool_}
    assert [o.name for o in model.graph.output] == ["logits"]
    embedded = json.loads({p.key: p.value for p in model.metadata_props}["cmgnet.inference"])
    assert InferenceRecord.from_json(embedded) == InferenceRecord.load(exported["bundle"])


@pytest.mark.parametrize("batch,size", [(1, (64, 64)), (2, (64, 64)), (5, (48, 80))])
def test_onnxruntime_matches_pytorch(exported, batch, size):
    """Several batch sizes, and an image size other than the exported example (dynamic H/W)."""
    model = exported["model"]
    segmenter = Segmenter.from_model(model, image_size=size)
    sentences = [STANDARD_SENTENCES[i % 3] for i in range(batch)]  # different lengths: padding exercised
    features, mask = segmenter.text_inputs(sentences)
    image = preprocess(_images(batch), segmenter.record)
    with torch.no_grad():
        expected = model(image, features, mask).numpy()
    session = onnxruntime_session(exported["bundle"] / ONNX_NAME)
    got = session.run(None, {"image": image.numpy(), "text_features": features.numpy(), "text_mask": mask.numpy()})[0]
    assert got.shape == (batch, 1, *size)
    assert np.abs(got - expected).max() < 1e-4
    assert np.array_equal(got > 0, expected > 0)
    assert 0 < (expected > 0).mean() < 1  # masks are not trivially empty or full


def test_verify_onnx_catches_a_model_that_changed(exported):
    record = InferenceRecord.load(exported["bundle"])
    changed = CMGNet(tiny_config()).eval()
    changed.load_state_dict(exported["model"].state_dict())
    with torch.no_grad():
        changed.head.bias += 0.5
    with pytest.raises(DeployError, match="disagrees with PyTorch"):
        verify_onnx(exported["bundle"] / ONNX_NAME, changed, record, batch_sizes=(1,))


def test_profile_shapes_from_the_exported_onnx(exported):
    shapes = profile_shapes(onnx_input_dims(exported["bundle"] / ONNX_NAME), (SIZE, SIZE), max_batch=32)
    assert shapes["image"].min == (1, 3, SIZE, SIZE)
    assert shapes["image"].opt == (8, 3, SIZE, SIZE)
    assert shapes["image"].max == (32, 3, SIZE, SIZE)
    assert shapes["text_features"].max == (32, 24, 32) and shapes["text_mask"].min == (1, 24)


def test_text_cache_serves_the_standard_sentences(exported):
    encoder = bundle_text_encoder(InferenceRecord.load(exported["bundle"]), exported["bundle"])
    cached, cached_mask = encoder(list(STANDARD_SENTENCES))
    assert encoder.backbone_calls == 0  # served from the bundle, BERT never ran
    live, live_mask = exported["model"].text_branch.encoder.encode_live(list(STANDARD_SENTENCES))
    torch.testing.assert_close(cached[cached_mask], live[live_mask], atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*noload.*")  # inside MLflow's SQLAlchemy store
def test_mlflow_logging_and_its_failures(exported, tmp_path, capsys, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("deploy", artifact_location=(tmp_path / "artifacts").as_uri()))
    assert log_to_run(exported["bundle"], run.info.run_id, uri)
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "deploy")}
    assert {"deploy/model.onnx", "deploy/inference.json"} <= logged

    assert not log_to_run(exported["bundle"], "no-such-run", uri)
    assert "could not log the bundle to MLflow run no-such-run" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    assert not log_to_run(exported["bundle"], run.info.run_id, uri)
    assert "mlflow is not installed" in capsys.readouterr().err


# ----------------------------------------------------------------------------- runtime


def test_backends_agree_on_the_same_images(exported):
    images = _images(5)
    texts = [MELANOMA, None, _record(age=55.0, sex="male", site="back"), "A clinician's note.", NEUTRAL_SENTENCE]
    torch_seg = Segmenter.load(exported["checkpoint"], image_size=SIZE, batch_size=2, backend="torch")
    ort_seg = Segmenter.load(exported["bundle"], batch_size=3)
    int8_seg = Segmenter.load(exported["bundle"] / INT8_ONNX_NAME)
    assert (torch_seg.backend, ort_seg.backend, int8_seg.backend) == ("torch", "onnxruntime", "onnxruntime")
    reference = torch_seg.predict(images, texts)
    for other in (ort_seg.predict(images, texts), int8_seg.predict(images, texts)):
        for image, a, b in zip(images, reference, other):
            assert a.mask.shape == b.mask.shape == image.shape[:2]
            assert a.mask.dtype == bool and a.probability.dtype == np.float32
            assert a.sentence == b.sentence
    for a, b in zip(reference, ort_seg.predict(images, texts)):
        assert np.abs(a.probability - b.probability).max() < 1e-5
        assert np.array_equal(a.mask, b.mask)
    assert reference[2].sentence == "Lesion on the back of a 55-year-old male patient."
    assert reference[1].sentence == NEUTRAL_SENTENCE


def test_batching_does_not_change_results(exported):
    images = _images(5, seed=3)
    one = Segmenter.load(exported["bundle"], batch_size=1).predict(images, MELANOMA)
    many = Segmenter.load(exported["bundle"], batch_size=4).predict(images, MELANOMA)
    for a, b in zip(one, many):
        assert np.abs(a.probability - b.probability).max() < 1e-5


def test_text_forms_and_regimes(exported):
    segmenter = Segmenter.load(exported["bundle"])
    record = _record(diagnosis="melanoma", age=40.0)
    assert segmenter.sentences(None, 2) == [NEUTRAL_SENTENCE] * 2
    assert segmenter.sentences("  ", 1) == [NEUTRAL_SENTENCE]
    assert segmenter.sentences(record, 1) == ["Lesion of a 40-year-old patient."]  # metadata regime: no diagnosis
    assert segmenter.sentences([record, "x"], 2)[1] == "x"
    with pytest.raises(UsageError, match="text_regime=metadata recorded"):  # the contract: not silently
        Segmenter.load(exported["bundle"], text_regime="oracle")
    assert Segmenter.load(exported["bundle"], text_regime="oracle", force=True).sentence(record).startswith(MELANOMA)
    assert Segmenter.load(exported["bundle"], text_regime="none", force=True).sentence(record) == NEUTRAL_SENTENCE
    with pytest.raises(ValueError, match="2 texts for 3 images"):
        segmenter.sentences(["a", "b"], 3)
    with pytest.raises(ValueError, match="text_regime"):
        Segmenter.load(exported["bundle"], text_regime="predicted")
    features, mask = segmenter.text_inputs([NEUTRAL_SENTENCE, MELANOMA])
    assert features.shape == (2, 24, 32) and mask.shape == (2, 24) and mask.dtype == torch.bool
    assert mask[0].sum() < mask[1].sum()  # padded to the exported length, padding masked


def test_preprocess_and_postprocess():
    record = InferenceRecord(image_size=(32, 48), stride=16)
    image = np.full((10, 20, 3), 128, dtype=np.uint8)
    x = preprocess([image, image[:5]], record)
    assert x.shape == (2, 3, 32, 48)
    expected = (128 / 255 - np.array(record.mean)) / np.array(record.std)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), expected, rtol=1e-5)

    logits = torch.full((1, 1, 4, 4), -3.0)
    logits[..., :2, :] = 3.0  # top half lesion
    [(probability, mask)] = postprocess(logits, [(8, 6)], threshold=0.5)
    assert probability.shape == mask.shape == (8, 6)
    assert mask[:3].all() and not mask[5:].any()


def test_load_errors_are_clear(exported, tmp_path):
    with pytest.raises(DeployError, match="no such file"):
        Segmenter.load(tmp_path / "missing")
    with pytest.raises(DeployError, match="neither a checkpoint"):
        Segmenter.load(tmp_path)
    with pytest.raises(DeployError, match="PyTorch backend needs the checkpoint"):
        Segmenter.load(exported["bundle"], backend="torch")
    with pytest.raises(DeployError, match="is a PyTorch checkpoint"):
        Segmenter.load(exported["checkpoint"], backend="tensorrt")
    with pytest.raises(DeployError, match="onnxruntime model; it cannot run on backend 'tensorrt'"):
        Segmenter.load(exported["bundle"] / ONNX_NAME, backend="tensorrt")
    with pytest.raises(DeployError, match="no model.engine for backend 'tensorrt'"):
        Segmenter.load(exported["bundle"], backend="tensorrt")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="PyTorch sees no CUDA GPU"):
            Segmenter.load(exported["checkpoint"], device="cuda")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailableError, match="no CUDA provider"):
            Segmenter.load(exported["bundle"], device="cuda")


def test_auto_backend_uses_onnxruntime_when_tensorrt_is_missing(exported, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(exported["bundle"], bundle)
    (bundle / ENGINE_NAME).write_bytes(b"engine built elsewhere")
    assert Segmenter.load(bundle).backend == "onnxruntime"


def test_onnxruntime_runs_all_flip_views_of_a_batch_in_one_call(exported):
    """8 images x 4 flips in one ONNX Runtime call (chunked to its max batch), the same numbers as one call per view."""
    images = _images(5, seed=4)
    batched = Segmenter.load(exported["bundle"], tta=True, force=True, batch_size=4)
    assert batched.runner.batch_views and batched.batch_size == 4
    calls = []
    runner = batched.runner

    class Counting:
        name, max_batch, batch_views = runner.name, 6, True  # a max batch below 4 x 4 views: chunked

        def __call__(self, image, features, mask):
            calls.append(image.shape[0])
            return runner(image, features, mask)

    batched.runner = Counting()
    got = batched.predict(images, MELANOMA)
    assert calls == [6, 6, 4, 4]  # 16 views of the first 4 images, then 4 views of the fifth
    sequential = Segmenter.load(exported["bundle"], tta=True, force=True, batch_size=4)
    Counting.batch_views = False  # flip_tta's loop: one call per view
    sequential.runner = Counting()
    calls.clear()
    for a, b in zip(got, sequential.predict(images, MELANOMA)):
        assert np.abs(a.probability - b.probability).max() < 1e-6 and np.array_equal(a.mask, b.mask)
    assert calls == [4, 4, 4, 4, 1, 1, 1, 1]


def test_onnxruntime_splits_a_batch_over_two_half_thread_sessions(exported):
    """Two images or more run as two halves at once (the same logits as one session); one image, one session."""
    from cmgnet.deploy.runners import OnnxRuntimeRunner

    path = exported["bundle"] / ONNX_NAME
    runner = OnnxRuntimeRunner(path, "cpu", num_threads=2)
    segmenter = Segmenter.load(exported["bundle"])
    features, mask = segmenter.text_inputs([MELANOMA, NEUTRAL_SENTENCE, MELANOMA, "A note.", MELANOMA])
    image = preprocess(_images(5, seed=5), segmenter.record)
    single = runner.session.run(None, {"image": image.numpy(), "text_features": features.numpy(),
                                       "text_mask": mask.numpy()})[0]
    assert runner(image[:1], features[:1], mask[:1]).shape == (1, 1, SIZE, SIZE) and not runner._lanes
    split = runner(image, features, mask).numpy()
    assert len(runner._lanes) == 2 and split.shape == single.shape == (5, 1, SIZE, SIZE)
    assert np.abs(split - single).max() < 1e-5
    one_thread = OnnxRuntimeRunner(path, "cpu", num_threads=1)
    assert np.abs(one_thread(image, features, mask).numpy() - single).max() < 1e-5 and not one_thread._lanes


def _legacy_bundle(bundle, folder):
    """``bundle`` as `cmgnet export` wrote it before the one record: a version-1 ``deploy.json``."""
    shutil.copytree(bundle, folder)
    record = InferenceRecord.load(folder)
    (folder / RECORD_NAME).unlink()
    (folder / "deploy.json").write_text(json.dumps({
        "format": "cmgnet-deploy", "version": 1, "model": "cmgnet", "image_size": list(record.image_size),
        "stride": record.stride, "mean": list(record.mean), "std": list(record.std), "threshold": record.threshold,
        "text": {"model_id": record.text_model, "max_length": record.text_max_length,
                 "hidden_size": record.text_hidden_size, "weights": None, "cache": "text_cache"},
        "opset": 18, "model_config": {}, "center_crop": False, "text_regime": "metadata", "tta": False,
        "postprocess": "none"}, indent=2))
    return folder


def test_a_bundle_exported_before_the_record_still_serves(exported, tmp_path):
    legacy = _legacy_bundle(exported["bundle"], tmp_path / "old")
    images = _images(3, seed=6)
    old = Segmenter.load(legacy).predict(images, MELANOMA)
    new = Segmenter.load(exported["bundle"]).predict(images, MELANOMA)
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(old, new))
    with pytest.raises(UsageError, match="deploy.json"):  # contradictions name the old file
        Segmenter.load(legacy, threshold=0.7)


@pytest.mark.slow  # two real exports (about 20 s each on two cores)
def test_a_checkpoint_on_onnxruntime_is_exported_once_per_weights(exported, tmp_path, monkeypatch, capsys):
    from cmgnet.deploy import cache, export

    monkeypatch.setenv("CMGNET_CACHE_DIR", str(tmp_path / "cache"))
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(exported["checkpoint"], checkpoint)
    exports = []
    real_export = export.export_bundle
    monkeypatch.setattr(export, "export_bundle", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    images = _images(4, seed=7)
    reference = Segmenter.load(checkpoint, backend="torch", image_size=SIZE).predict(images, MELANOMA)

    first = Segmenter.load(checkpoint, image_size=SIZE)  # auto, on a CPU: ONNX Runtime
    assert first.backend == "onnxruntime" and len(exports) == 1 and "exporting" in capsys.readouterr().err
    [folder] = cache.onnx_cache_root().iterdir()
    assert folder.name == file_sha256(checkpoint / "model.safetensors")
    manifest = json.loads((folder / cache.MANIFEST_NAME).read_text())
    assert [p["mask_flips"] for p in manifest["parity"]] == [0, 0]  # the export's own parity check ran
    for a, b in zip(reference, first.predict(images, MELANOMA)):
        assert a.mask.sum() > 0 and 2 * (a.mask & b.mask).sum() / (a.mask.sum() + b.mask.sum()) >= 0.999

    stamp = (folder / ONNX_NAME).stat().st_mtime_ns
    second = Segmenter.load(checkpoint, backend="onnxruntime", image_size=SIZE)
    assert second.backend == "onnxruntime" and len(exports) == 1 and "exporting" not in capsys.readouterr().err
    assert (folder / ONNX_NAME).stat().st_mtime_ns == stamp  # reused, not rewritten

    model = CMGNet.from_pretrained(checkpoint)
    with torch.no_grad():
        model.head.bias += 2.0  # new weights: another hash, another export
    model.save_pretrained(checkpoint)
    changed = Segmenter.load(checkpoint, image_size=SIZE)
    assert len(exports) == 2 and len(list(cache.onnx_cache_root().iterdir())) == 2
    assert sum(p.mask.sum() for p in changed.predict(images, MELANOMA)) > sum(p.mask.sum() for p in reference)

    assert not [p for p in cache.onnx_cache_root().iterdir() if p.name.startswith(".")]  # no temporary left

    stale = manifest | {"torch": "0.0"}  # exported by another PyTorch: not used, replaced by the next export
    (folder / cache.MANIFEST_NAME).write_text(json.dumps(stale))
    assert not cache._valid(folder, manifest)
    fresh = tmp_path / "fresh"
    shutil.copytree(folder, fresh)
    (fresh / cache.MANIFEST_NAME).write_text(json.dumps(manifest))
    cache._move_into_place(fresh, folder, manifest)
    assert cache._valid(folder, manifest) and not fresh.exists()


def test_backend_torch_and_a_failed_export_keep_pytorch(exported, tmp_path, monkeypatch, capsys):
    from cmgnet.deploy import export

    monkeypatch.setenv("CMGNET_CACHE_DIR", str(tmp_path / "cache"))
    assert Segmenter.load(exported["checkpoint"], backend="torch").backend == "torch"
    assert not (tmp_path / "cache").exists()  # nothing exported for PyTorch

    tries = []

    def unexportable(*args, **kwargs):  # what torch.export raises for a network it cannot trace
        tries.append(1)
        raise RuntimeError("Could not guard on data-dependent expression Eq(1, u0)")

    monkeypatch.setattr(export, "export_bundle", unexportable)
    assert Segmenter.load(exported["checkpoint"]).backend == "torch"  # auto: falls back, saying why
    err = capsys.readouterr().err
    assert "running on PyTorch, not ONNX Runtime" in err and "ONNX export failed (RuntimeError: Could not guard" in err
    [marker] = (tmp_path / "cache" / "onnx").glob("*.failed.json")
    assert Segmenter.load(exported["checkpoint"]).backend == "torch" and len(tries) == 1  # not tried again
    with pytest.raises(DeployError, match=f"failed before .*Could not guard.*{marker.name}"):
        Segmenter.load(exported["checkpoint"], backend="onnxruntime")  # asked for by name: the failure is the answer


# ----------------------------------------------------------------------------- predict


def test_lesion_statistics():
    mask = np.zeros((10, 20), dtype=bool)
    mask[1:4, 2:6] = True  # 12 px
    mask[7:9, 15:20] = True  # 10 px
    probability = np.where(mask, 0.9, 0.1).astype(np.float32)
    stats = lesion_statistics(mask, probability)
    assert stats["lesion_pixels"] == 22 and stats["components"] == 2 and stats["largest_component_pixels"] == 12
    assert (stats["bbox_x0"], stats["bbox_y0"], stats["bbox_x1"], stats["bbox_y1"]) == (2, 1, 19, 8)
    assert stats["lesion_fraction"] == pytest.approx(0.11) and stats["mean_probability"] == pytest.approx(0.9)
    assert lesion_statistics(np.zeros((3, 3), bool), np.zeros((3, 3), np.float32))["components"] == 0


@pytest.mark.parametrize("model_key", ["bundle", "checkpoint"])
def test_predict_cli_survives_a_corrupt_image(exported, tmp_path, model_key, capsys):
    images = tmp_path / "images"
    images.mkdir()
    arrays = _images(3, seed=5)
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(images / f"ISIC_{i}.{'png' if i % 2 else 'jpg'}")
    (images / "ISIC_9.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "notes.csv").write_text("ignored: not an image\n")
    metadata = tmp_path / "metadata.csv"
    metadata.write_text("image_id,diagnosis,age,sex,site\nISIC_0,melanoma,55,male,back\n")
    out = tmp_path / "out"

    rc = cli_main(["predict", str(exported[model_key]), str(images), "--out", str(out), "--metadata", str(metadata),
                   "--batch-size", "2", "--image-size", str(SIZE), "--no-progress"])
    assert rc == 1  # one image failed
    err = capsys.readouterr().err
    assert "ISIC_9.jpg" in err and "truncated" in err
    rows = {r["image_id"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    assert rows["ISIC_9"]["status"] == "error" and rows["ISIC_9"]["error"]
    for i, array in enumerate(arrays):
        row = rows[f"ISIC_{i}"]
        assert row["status"] == "ok"
        mask = np.array(Image.open(out / "masks" / f"ISIC_{i}.png"))
        overlay = Image.open(out / "overlays" / f"ISIC_{i}.png")
        assert mask.shape == array.shape[:2] and set(np.unique(mask)) <= {0, 255}
        assert overlay.size == (array.shape[1], array.shape[0]) and overlay.mode == "RGB"
        assert int(row["lesion_pixels"]) == int((mask > 0).sum())
        assert (int(row["height"]), int(row["width"])) == array.shape[:2]
    assert rows["ISIC_0"]["sentence"] == "Lesion on the back of a 55-year-old male patient."
    assert rows["ISIC_1"]["sentence"] == NEUTRAL_SENTENCE


def test_predict_cli_exit_codes(exported, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(_images(1)[0]).save(image)
    listing = tmp_path / "list.txt"
    listing.write_text("a.png\n")
    args = ["predict", str(exported["bundle"]), str(listing), "--out", str(tmp_path / "out"), "--no-progress"]
    assert cli_main([*args, "--text", MELANOMA, "--no-overlays"]) == 0
    assert next(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))["sentence"] == MELANOMA
    assert not (tmp_path / "out" / "overlays").exists()
    assert cli_main(["predict", str(exported["bundle"]), str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_predict_tta_switch_overrides_the_record_either_way():
    from cmgnet.deploy.cli import predict_parser

    base = ["model", "images", "--out", "masks"]
    assert [predict_parser().parse_args([*base, *flag]).tta for flag in ([], ["--tta"], ["--no-tta"])] == [None, True, False]


def test_export_cli_tensorrt_modes_without_tensorrt(exported, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on the project's machines
    args = argparse.Namespace(tensorrt="require", precision="fp16", max_batch=4, opt_batch=None, workspace_gib=1.0,
                              timing_cache=None)
    assert not _build_tensorrt(args, exported["bundle"])
    assert "TensorRT is not installed" in capsys.readouterr().err
    args.tensorrt = "auto"
    assert _build_tensorrt(args, exported["bundle"])
    assert "no TensorRT engine built" in capsys.readouterr().out
