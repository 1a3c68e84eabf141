"""Issue 11, part 2: every entry point fails with one line naming the file, exit 1 (2: usage), no traceback.

Entry points run in-process (``main(argv)``), stderr captured.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, one_error_line, tiny_config

from cmgnet.cli import main as cli_main
from cmgnet.data.check import main as check_main
from cmgnet.errors import CheckpointError, cli_entry
from cmgnet.inference import InferenceRecord
from cmgnet.model import CMGNet
from cmgnet.train.config import save_config
from cmgnet.train.testing import synthetic_dataset, tiny_experiment

SIZE = 32


@pytest.fixture(autouse=True)
def _private_cache(private_cache):
    """Every test here gets its own cache (conftest.private_cache)."""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A synthetic dataset, a tiny checkpoint (with record and experiment.yaml) and its bundle."""
    root = tmp_path_factory.mktemp("errors")
    data = synthetic_dataset(root / "data", n_train=4, n_val=2, n_test=2, size=SIZE)
    model = CMGNet(tiny_config()).eval()
    model.inference = InferenceRecord(image_size=(SIZE, SIZE), text_model="tiny-random-bert", text_max_length=24)
    checkpoint = model.save_pretrained(root / "checkpoint")
    save_config(tiny_experiment(data, root / "runs", image_size=SIZE), checkpoint / "experiment.yaml")
    assert cli_main(["export", str(checkpoint), "--out", str(root / "bundle"), "--verify-batches"]) == 0
    image = next((data / "ISIC-2017_Test_v2_Data").glob("*.jpg"))
    return {"root": root, "data": data, "checkpoint": checkpoint, "bundle": root / "bundle", "image": image}


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_FAULTS = {
    "empty weights": ("model.safetensors", b""),
    "truncated weights": ("model.safetensors", None),
    "garbage weights": ("model.safetensors", b"\x00garbage" * 20),
    "unknown arch": ("config.json", json.dumps({"model": "no-such-net", "config": {}}).encode()),
    "unknown key": ("config.json", "unknown_key"),
    "mistyped value": ("config.json", "mistyped"),
    "array config": ("config.json", b"[1, 2, 3]"),
    "bad inference.json": ("inference.json", json.dumps({"format": "cmgnet-inference", "version": 1,
                                                          "mean": [0.5]}).encode()),
}


def break_checkpoint(checkpoint: Path, fault: str) -> Path:
    name, content = CHECKPOINT_FAULTS[fault]
    path = checkpoint / name
    if content is None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content in ("unknown_key", "mistyped"):
        saved = json.loads(path.read_text())
        saved["config"]["unknown_key" if content == "unknown_key" else "base_width"] = 1 if content == "unknown_key" \
            else "eight"
        path.write_text(json.dumps(saved))
    else:
        path.write_bytes(content)
    return path


def run_entry(entry: str, checkpoint: Path, tmp_path: Path, image: Path) -> int:
    if entry == "predict":
        return cli_main(["predict", str(checkpoint), str(image), "--out", str(tmp_path / "out"), "--no-progress"])
    if entry == "export":
        return cli_main(["export", str(checkpoint), "--out", str(tmp_path / "bundle"), "--verify-batches"])
    if entry == "evaluate":
        return cli_main(["evaluate", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "eval"), "--no-hd95"])
    spec = importlib.util.spec_from_file_location("latency_bench", REPO_ROOT / "benchmarks" / "latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--checkpoint", str(checkpoint), "--backends", "eager", "--batches", "1", "--iters", "1",
                        "--warmup", "0", "--out", str(tmp_path / "latency.json")])


@pytest.mark.parametrize("entry", ["predict", "export", "evaluate", "benchmarks/latency.py"])
@pytest.mark.parametrize("fault", list(CHECKPOINT_FAULTS))
def test_a_broken_checkpoint_is_one_line(assets, tmp_path, capsys, entry, fault):
    checkpoint = copy(assets["checkpoint"], tmp_path / "checkpoint")
    bad = break_checkpoint(checkpoint, fault)
    assert run_entry(entry, checkpoint, tmp_path, assets["image"]) == 1
    line = one_error_line(capsys.readouterr().err, bad)
    if fault == "unknown arch":
        assert "no-such-net" in line
    if fault == "unknown key":
        assert "unknown_key" in line
    if fault == "mistyped value":
        assert "base_width" in line or "eight" in line


def test_debug_shows_the_traceback(assets, tmp_path, monkeypatch):
    checkpoint = copy(assets["checkpoint"], tmp_path / "checkpoint")
    break_checkpoint(checkpoint, "empty weights")
    args = ["export", str(checkpoint), "--out", str(tmp_path / "b"), "--verify-batches"]
    with pytest.raises(CheckpointError, match="model.safetensors"):
        cli_main([*args, "--debug"])
    monkeypatch.setenv("CMGNET_DEBUG", "1")
    with pytest.raises(CheckpointError):
        cli_main(args)


def test_cli_entry_exit_codes(capsys):
    @cli_entry
    def usage(argv):
        from cmgnet.errors import UsageError

        raise UsageError("--x contradicts y")

    @cli_entry
    def bug(argv):
        raise ZeroDivisionError("division by zero")

    assert usage([]) == 2 and "error: --x contradicts y" in capsys.readouterr().err
    assert bug([]) == 1
    assert "ZeroDivisionError: division by zero (rerun with --debug" in capsys.readouterr().err


def test_resume_skips_a_damaged_latest_checkpoint(assets, tmp_path, capsys):
    from cmgnet.train import Trainer

    cfg = tiny_experiment(assets["data"], tmp_path / "runs", "train.epochs=2", "eval.hd95=false", image_size=SIZE)
    Trainer(cfg).fit()
    steps = sorted((tmp_path / "runs" / "tiny" / "checkpoints").glob("step-*"))
    assert len(steps) == 2
    for damage, target in (("truncated weights", "model/model.safetensors"), ("garbage state", "trainer_state.json")):
        run = copy(tmp_path / "runs", tmp_path / damage.replace(" ", "-"))
        bad = run / "tiny" / "checkpoints" / steps[-1].name / target
        bad.write_bytes(bad.read_bytes()[:40] if damage == "truncated weights" else b"{not json")
        overrides = [f"{k}={v}" for k, v in {"logging.output_dir": run, "train.epochs": 3}.items()]
        argv = ["--config", str(run / "tiny" / "config.yaml"), *overrides]
        assert cli_main(["train", *argv]) == 0
        out = capsys.readouterr().out
        assert f"skipping checkpoint {bad.parents[1] if 'model' in target else bad.parent}" in out and str(bad) in out
        assert re.search(rf"resumed from .*{steps[0].name}", out), out


# ----------------------------------------------------------------------------- bundles and ONNX

BUNDLE_FAULTS = {
    "1-element mean": ("inference.json", lambda d: d | {"mean": [0.5]}),
    "array spec": ("inference.json", lambda d: [d]),
    "text null": ("inference.json", lambda d: d | {"text_model": None}),  # a text-guided model.onnx: refused at load
    "garbage onnx": ("model.onnx", b"this is not an onnx protobuf"),
    "truncated onnx": ("model.onnx", None),
    "corrupt text cache": ("text_cache/tiny-random-bert.safetensors", b"\x01\x02garbage"),
}


@pytest.mark.parametrize("fault", list(BUNDLE_FAULTS))
def test_a_broken_bundle_is_one_line(assets, tmp_path, capsys, fault):
    bundle = copy(assets["bundle"], tmp_path / "bundle")
    name, change = BUNDLE_FAULTS[fault]
    path = bundle / name
    if callable(change):
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    elif change is None:
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_bytes(change)
    assert cli_main(["predict", str(bundle), str(assets["image"]), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    one_error_line(capsys.readouterr().err, path)


def test_an_ep_file_must_match_its_recorded_hash(assets, tmp_path, capsys):
    from cmgnet.deploy.spec import file_sha256
    from cmgnet.deploy.trt_engine import EngineMetadata

    bundle = copy(assets["bundle"], tmp_path / "bundle")
    program = bundle / "model_trt.ep"
    program.write_bytes(b"an ExportedProgram zip")
    meta = EngineMetadata(kind="torch-tensorrt", tensorrt_version="10.0", compute_capability=(8, 0), gpu_name="A100",
                          precision="fp16", input_shapes={}, max_batch=4, text_model_id="tiny-random-bert",
                          spec=InferenceRecord.load(bundle), artifact_sha256=file_sha256(program))
    meta.save(bundle / "model_trt.ep.json")
    program.write_bytes(b"a different, tampered file")
    assert cli_main(["predict", str(program), str(assets["image"]), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "differs from" in one_error_line(capsys.readouterr().err, program)


def test_a_text_model_folder_with_only_a_pickle(assets, tmp_path, capsys):
    folder = tmp_path / "text-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    checkpoint = copy(assets["checkpoint"], tmp_path / "checkpoint")
    saved = json.loads((checkpoint / "config.json").read_text())
    saved["config"]["text_model"] = str(folder)
    (checkpoint / "config.json").write_text(json.dumps(saved))
    for entry in ("predict", "export"):
        assert run_entry(entry, checkpoint, tmp_path, assets["image"]) == 1
        line = one_error_line(capsys.readouterr().err, folder)
        assert "pytorch_model.bin" in line and "weights_only" not in line


# ----------------------------------------------------------------------------- data


def broken_dataset(assets, tmp_path: Path, fault: str) -> tuple[Path, Path]:
    data = copy(assets["data"], tmp_path / "data")
    if fault == "truncated image":
        bad = next((data / "ISIC-2017_Validation_Data").glob("*.jpg"))
        bad.write_bytes(bad.read_bytes()[:200])
    else:  # a grey-level mask
        bad = next((data / "ISIC-2017_Validation_Part1_GroundTruth").glob("*.png"))
        from PIL import Image

        Image.new("L", Image.open(bad).size, 100).save(bad)
    return data, bad


@pytest.mark.parametrize("entry", ["train", "evaluate", "ablate"])
@pytest.mark.parametrize("fault", ["truncated image", "grey mask"])
def test_bad_data_is_one_line_before_training(assets, tmp_path, capsys, entry, fault):
    data, bad = broken_dataset(assets, tmp_path, fault)
    cfg = tiny_experiment(data, tmp_path / "runs", "eval.splits=[val]", image_size=SIZE)
    config = save_config(cfg, tmp_path / "cfg.yaml")
    argv = {"train": ["train", "--config", str(config)],
            "ablate": ["ablate", "--config", str(config), "--variants", "unet"],
            "evaluate": ["evaluate", "--checkpoint", str(assets["checkpoint"]), "--config", str(config),
                         "--split", "val", "--out", str(tmp_path / "eval")]}[entry]
    assert cli_main(argv) == 1
    one_error_line(capsys.readouterr().err, bad)
    assert not list((tmp_path / "runs").glob("*/checkpoints/step-*"))  # failed before the first step


def test_full_validation_is_cached_by_size_and_mtime(assets, tmp_path):
    from cmgnet.data.readers import read_dataset
    from cmgnet.data.validate import cache_dir, validate_records

    data = copy(assets["data"], tmp_path / "data")
    records = read_dataset("isic2017", data)
    assert not validate_records(records, level="full").errors
    assert list(cache_dir().glob("validated-*.json"))
    mask = records[0].mask_path
    from PIL import Image

    Image.new("L", Image.open(mask).size, 100).save(mask)  # changed file: decoded again, and caught
    assert [str(e.path) for e in validate_records(records, level="full").errors] == [str(mask)]


def test_data_check_reports_orphan_masks_and_unknown_split_ids(assets, tmp_path, capsys):
    data = copy(assets["data"], tmp_path / "data")
    image = next((data / "ISIC-2017_Training_Data").glob("*.jpg"))
    image.unlink()
    csv = tmp_path / "split.csv"
    csv.write_text(f"image_id,split\n{image.stem},train\nISIC_9999999,test\n")
    orphan = data / "ISIC-2017_Training_Part1_GroundTruth" / f"{image.stem}_segmentation.png"
    assert check_main([str(data), "--split-csv", str(csv)]) == 1
    out = capsys.readouterr().out
    assert f"{orphan}: mask without an image" in out
    assert f"{csv}, row 2: image id {image.stem!r} is not in the dataset" in out
    assert f"{csv}, row 3: image id 'ISIC_9999999'" in out


# ----------------------------------------------------------------------------- predict


def test_predict_refuses_to_overwrite_and_names_unreadable_images(assets, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["predict", str(assets["bundle"]), str(assets["image"]), "--out", str(out), "--no-progress"]
    assert cli_main(args) == 0
    capsys.readouterr()
    assert cli_main(args) == 1
    assert "--overwrite" in one_error_line(capsys.readouterr().err, out)
    assert cli_main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a not a png at all")
    assert cli_main([*args[:2], str(bad), "--out", str(tmp_path / "o2"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "BytesIO" not in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the no-pickle rule

PACKAGES = ("cmgnet", "deploy", "benchmarks", "launch")


def _call_text(text: str, start: int) -> str:
    """The argument text of a call whose ``(`` ends just before ``start`` (nested parentheses balanced)."""
    depth = 1
    for end in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if depth == 0:
            return text[start - 1 : end + 1]
    return text[start - 1 :]


def test_nothing_unpickles_without_weights_only():
    assert "weights_only=True" not in _call_text("torch.load(f(x)) + g(weights_only=True)", 11)
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            text = path.read_text()
            for match in re.finditer(r"\btorch\.load\s*\(", text):
                call = _call_text(text, match.end())
                if "weights_only=True" not in call:
                    offenders.append(f"{path.relative_to(REPO_ROOT)}: {call.splitlines()[0]}")
            for match in re.finditer(r"\b(?:pickle|cPickle|dill|joblib)\.(?:loads?|Unpickler)\b|^\s*import pickle",
                                     text, re.M):
                offenders.append(f"{path.relative_to(REPO_ROOT)}: {match.group(0).strip()}")
    assert not offenders, offenders
