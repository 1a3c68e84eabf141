"""Issue 11, part 1 and issue 20: one inference record from training to serving.

A tiny model is trained at a non-default size (48 px), normalisation (mean 0.5, std 0.25) and
mask post-processing (largest component + filled holes); ``cmgnet evaluate``, the checkpoint
on PyTorch and on ONNX Runtime (the export cache), the exported bundle, the MLflow pyfunc model
and ``cmgnet predict`` (both backends) must then give the masks training's evaluation scored,
without any setting retyped.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cmgnet.cli import main as cli_main
from cmgnet.data.readers import read_dataset
from cmgnet.deploy import Segmenter
from cmgnet.errors import UsageError
from cmgnet.inference import INFERENCE_NAME, InferenceRecord
from cmgnet.train import Trainer
from cmgnet.train.testing import synthetic_dataset, tiny_experiment

SIZE = 48
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module", autouse=True)
def onnx_cache(tmp_path_factory):
    """The checkpoint's ONNX Runtime export goes to a cache of this module's own."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setenv("CMGNET_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch tiny run at 48 px with custom normalisation, its test images and its bundle."""
    root = tmp_path_factory.mktemp("contract")
    data = synthetic_dataset(root / "data", n_train=8, n_val=4, n_test=4, size=SIZE)
    cfg = tiny_experiment(data, root / "runs", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
                          "data.text_regime_eval=none", "eval.hd95=false", "eval.postprocess=largest+fill",
                          image_size=SIZE)
    result = Trainer(cfg).fit()
    bundle = root / "bundle"
    assert cli_main(["export", str(result.best_dir), "--out", str(bundle), "--verify-batches", "1"]) == 0
    test = sorted((r for r in read_dataset("isic2017", data) if r.split == "test"), key=lambda r: r.image_id)
    return {"result": result, "best": result.best_dir, "bundle": bundle, "test": test, "root": root}


def _evaluated_masks_agree(trained, masks: dict[str, np.ndarray]) -> None:
    """Masks (image id -> H x W bool) give evaluate's per-image counts (a stray pixel at most)."""
    [result] = trained["result"].results
    rows = {r["image_id"]: r for r in result.rows}
    assert set(masks) == set(rows)
    for record in trained["test"]:
        truth = np.array(Image.open(record.mask_path)) > 127
        mask = masks[record.image_id]
        assert mask.shape == truth.shape == (SIZE, SIZE)
        row = rows[record.image_id]
        counts = {"tp": int((mask & truth).sum()), "fp": int((mask & ~truth).sum()), "fn": int((~mask & truth).sum())}
        for key, value in counts.items():
            assert abs(value - row[key]) <= 1, (record.image_id, key, value, row[key])


def test_the_record_is_written_beside_every_copy_of_the_weights(trained):
    best = trained["best"]
    record = InferenceRecord.load(best)
    assert record.image_size == (SIZE, SIZE) and record.mean == MEAN and record.std == STD
    assert record.text_regime == "none" and record.text_model == "tiny-random-bert" and record.stride == 16
    assert record.postprocess == "largest+fill"
    checkpoints = sorted((best.parent / "checkpoints").glob("step-*/model"))
    assert checkpoints and all(InferenceRecord.load(c) == record for c in checkpoints)
    bundled = InferenceRecord.load(trained["bundle"])  # export was given no size or normalisation
    assert bundled.image_size == (SIZE, SIZE) and bundled.mean == MEAN and bundled.std == STD
    assert bundled.text_regime == "none" and bundled.postprocess == "largest+fill"
    # The bundle's record is the checkpoint's, plus what only a bundle has.
    same = {f: getattr(bundled, f) for f in ("text_hidden_size", "model", "opset", "text_cache", "network_config")}
    assert dataclasses.replace(record, **same) == bundled and bundled.opset == 18


SOURCES = {"checkpoint-torch": ("best", "torch"), "checkpoint-onnxruntime": ("best", "auto"),
           "bundle": ("bundle", "auto")}


@pytest.mark.parametrize("source", list(SOURCES))
def test_segmenter_gives_the_evaluated_masks(trained, source):
    model, backend = SOURCES[source]
    segmenter = Segmenter.load(trained[model], backend=backend)
    # On a CPU a checkpoint runs on ONNX Runtime by default (exported once, into the cache).
    assert segmenter.backend == ("torch" if backend == "torch" else "onnxruntime")
    assert segmenter.record.image_size == (SIZE, SIZE) and segmenter.record.mean == MEAN
    predictions = segmenter.predict([r.image_path for r in trained["test"]])
    _evaluated_masks_agree(trained, {r.image_id: p.mask for r, p in zip(trained["test"], predictions)})


@pytest.mark.parametrize("source", list(SOURCES))
def test_predict_cli_gives_the_evaluated_masks(trained, tmp_path, source, capsys):
    model, backend = SOURCES[source]
    out = tmp_path / "out"
    paths = [str(r.image_path) for r in trained["test"]]
    assert cli_main(["predict", str(trained[model]), *paths, "--out", str(out), "--no-progress", "--no-overlays",
                     "--backend", backend]) == 0
    assert f"with {'torch' if backend == 'torch' else 'onnxruntime'};" in capsys.readouterr().out
    masks = {r.image_id: np.array(Image.open(out / "masks" / f"{r.image_id}.png")) > 0 for r in trained["test"]}
    _evaluated_masks_agree(trained, masks)


def test_evaluate_takes_size_and_normalisation_from_the_record(trained, tmp_path):
    """A config that says otherwise (64 px, ImageNet statistics, no post-processing) does not change the score."""
    import yaml

    saved = yaml.safe_load((trained["best"] / "experiment.yaml").read_text())
    saved["data"] |= {"image_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    saved["eval"] |= {"postprocess": "none", "threshold": 0.3}
    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump(saved))
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(trained["best"]), "--config", str(config), "--split", "test",
            "--text-regime", "none", "--no-hd95", "--overlays", "0", "--out", str(out)]
    assert cli_main(args) == 0
    metrics = json.loads((out / "test-none" / "metrics.json").read_text())
    assert metrics["image_size"] == SIZE and metrics["postprocess"] == "largest+fill" and metrics["threshold"] == 0.5
    [result] = trained["result"].results
    expected = {r["image_id"]: (r["tp"], r["fp"], r["fn"]) for r in result.rows}
    with open(out / "test-none" / "per_image.csv") as handle:
        got = {r["image_id"]: (int(r["tp"]), int(r["fp"]), int(r["fn"])) for r in csv.DictReader(handle)}
    assert got == expected
    # An explicit override still wins over the record.
    assert cli_main([*args, "--overwrite", "data.image_size=64"]) == 0
    assert json.loads((out / "test-none" / "metrics.json").read_text())["image_size"] == 64


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")
def test_pyfunc_model_gives_the_evaluated_masks(trained, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    pd = pytest.importorskip("pandas")
    from cmgnet.train.config import LoggingConfig
    from cmgnet.train.tracking import Tracker

    tracker = Tracker(LoggingConfig(output_dir=str(tmp_path), experiment="contract"))
    tracker.start("contract", {}, {})
    uri = tracker.log_model(trained["best"])
    tracker.end()
    assert uri, tracker.reason
    local = mlflow.artifacts.download_artifacts(uri, tracking_uri=tracker.uri)
    requirements = (tmp_path.joinpath(local) / "requirements.txt").read_text()
    assert "torch==" in requirements and "mlflow==" in requirements  # pinned
    assert any(p.name.startswith("input_example") for p in tmp_path.joinpath(local).iterdir())
    model = mlflow.pyfunc.load_model(local)
    frame = pd.DataFrame({"image": [r.image_path.read_bytes() for r in trained["test"]]})  # raw files in
    out = model.predict(frame)
    _evaluated_masks_agree(trained, {r.image_id: m.astype(bool) for r, m in zip(trained["test"], out["mask"])})


def test_a_contradicting_value_is_refused_unless_forced(trained, tmp_path, capsys):
    image = str(trained["test"][0].image_path)
    args = ["predict", str(trained["best"]), image, "--out", str(tmp_path / "o"), "--no-progress", "--image-size", "256"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--image-size 256 overrides image_size=48 48" in err and str(trained["best"] / INFERENCE_NAME) in err
    assert cli_main([*args, "--force"]) == 0
    assert "(forced)" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--mean 0.485 0.456 0.406 overrides mean=0.5 0.5 0.5"):
        Segmenter.load(trained["bundle"], mean=(0.485, 0.456, 0.406))
    assert Segmenter.load(trained["bundle"], threshold=0.5).threshold == 0.5  # agreeing values are fine
    with pytest.raises(UsageError, match="--postprocess none overrides postprocess=largest"):
        Segmenter.load(trained["best"], postprocess="none")
    bundle = tmp_path / "bundle"
    rc = cli_main(["export", str(trained["best"]), "--out", str(bundle), "--threshold", "0.7", "--verify-batches"])
    assert rc == 2 and "--threshold 0.7 overrides threshold=0.5" in capsys.readouterr().err


def test_center_crop_is_applied_and_pasted_back():
    from cmgnet.deploy.runners import preprocess
    from cmgnet.deploy.runtime import postprocess

    spec = InferenceRecord(model="cmgnet", image_size=(16, 16), stride=16, center_crop=True)
    image = np.zeros((16, 32, 3), dtype=np.uint8)
    image[:, 8:24] = 255  # the centred square is white, the sides black
    x = preprocess([image], spec)
    assert x.shape == (1, 3, 16, 16) and bool((x > 0).all())
    [(probability, mask)] = postprocess(torch.full((1, 1, 16, 16), 5.0), [(16, 32)], 0.5, center_crop=True)
    assert mask[:, 8:24].all() and not mask[:, :8].any() and not mask[:, 24:].any()
    data = json.loads(json.dumps(spec.to_json()))
    assert InferenceRecord.from_json(data).center_crop is True
