"""The trained model shipped in the package: loads by name, segments the shipped examples."""

from __future__ import annotations

import json
import re

import pytest
import torch

from cmgnet.shipped import EXAMPLES_DIR, PRETRAINED_DIR, describe, list_pretrained, resolve_pretrained

NAME = "isic-cmgnet-lite0"
# Measured on the five shipped examples (ISIC 2017 validation images, never trained on) at their
# original 256 px, as served (largest component, one pass): mean Dice 0.896 (0.96-0.97, and 0.62 on the
# seborrheic keratosis). The bar
# leaves room for platform rounding; a broken contract (size, normalisation) falls far below it.
MIN_MEAN_DICE = 0.85


def test_registry_resolves_names_and_paths(tmp_path):
    assert NAME in list_pretrained()
    assert resolve_pretrained(NAME) == PRETRAINED_DIR / NAME
    assert resolve_pretrained(tmp_path) == tmp_path  # a path stays a path
    row = next(r for r in describe() if r["name"] == NAME)
    assert row["arch"] == "cmgnet" and row["encoder"] == "efficientnet-lite0"
    assert float(row["size_mb"]) < 20.0


def test_shipped_weights_are_fp16_and_load_by_name():
    from safetensors import safe_open

    from cmgnet.model import SegmentationModel

    with safe_open(str(PRETRAINED_DIR / NAME / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "F16" in dtypes and "F32" not in dtypes
    net = SegmentationModel.from_pretrained(NAME).eval()
    assert net.config.encoder == "efficientnet-lite0" and net.inference.image_size == (256, 256)
    assert next(net.parameters()).dtype == torch.float32  # fp16 on disk, fp32 to compute


def test_shipped_model_segments_the_examples(tmp_path):
    from cmgnet.demo import segment_examples

    dice = segment_examples(tmp_path / "out")
    assert len(dice) == len(list((EXAMPLES_DIR / "images").glob("*.jpg"))) == 5
    assert sum(dice.values()) / len(dice) > MIN_MEAN_DICE, dice
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 5


def test_cli_lists_the_model_and_prints_its_card(capsys):
    from cmgnet.cli import main

    assert main(["models"]) == 0
    assert NAME in capsys.readouterr().out
    assert main(["models", NAME]) == 0
    card = capsys.readouterr().out
    assert "CC BY-NC 4.0" in card and "Not a medical device" in card and "| metadata |" in card


def test_ship_tool_writes_fp16_weights_and_a_card(tmp_path, make_tiny_config):
    import yaml

    from cmgnet import ship as ship_model
    from cmgnet.inference import InferenceRecord
    from cmgnet.metrics import per_image_rows
    from cmgnet.model import CMGNet
    from cmgnet.train.evaluate import build_result

    src = tmp_path / "best"
    net = CMGNet(make_tiny_config(encoder="efficientnet-lite0", fusion_scales=(32,), fusion_layers=(1,)))
    net.inference = InferenceRecord(image_size=(64, 64), mean=(0.5,) * 3, std=(0.5,) * 3, stride=32)
    net.save_pretrained(src)
    exp = {"train": {"epochs": 1, "batch_size": 2, "mixed_precision": "bf16", "channels_last": True},
           "optim": {"lr": 1e-3, "encoder_lr_mult": 0.3},
           "data": {"format": "isic2018", "protocol": "split-csv", "augment": "paper", "scale_range": [0.75, 1.33], "shift_range": 0.1,
                    "text_regime_train": "oracle", "text_regime_eval": "metadata"}}
    (src / "experiment.yaml").write_text(yaml.safe_dump(exp))
    rows = per_image_rows(torch.ones(2, 1, 8, 8, dtype=torch.bool), torch.ones(2, 1, 8, 8, dtype=torch.bool), ["a", "b"])
    result = build_result(rows, "test", "metadata", True)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"test/metadata": result.to_json()}))
    out = tmp_path / "shipped"
    args = ["--checkpoint", str(src), "--name", "tiny", "--eval", str(tmp_path / "eval"), "--wall-time", "1 min",
            "--out", str(out)]
    # A missing evaluation ends in one line naming the file, before anything is written.
    with pytest.raises(SystemExit, match=r"summary\.json: cannot read an evaluation summary"):
        ship_model.main([*args[:5], str(tmp_path), *args[6:]])
    assert not out.exists()
    # Post-processing chosen after training: the evaluations must have used it, or nothing ships.
    with pytest.raises(SystemExit, match="did not use the served post-processing 'largest'"):
        ship_model.main([*args, "--postprocess", "largest"])
    assert not out.exists()
    assert ship_model.main(args) == 0
    card = (out / "README.md").read_text()
    assert re.search(r"\| metadata +\| no +\| 100\.0 +\| 100\.0-100\.0 +\|", card) and "post-processing `none`" in card
    assert "bf16 autocast, channels-last" in card and "zoom x0.75-1.33 and shift up to 10%" in card
    assert "released under CC BY-NC 4.0" in card and "(121 ISIC 2017 validation images)" in card
    result.info["postprocess"] = "largest"
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"test/metadata": result.to_json()}))
    assert ship_model.main([*args, "--postprocess", "largest", "--note", "Chosen on val."]) == 0
    assert InferenceRecord.load(out).postprocess == "largest" and InferenceRecord.load(src).postprocess == "none"
    card = (out / "README.md").read_text()
    assert "post-processing `largest`" in card and "|\n\nChosen on val.\n\n" in card
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for v in load_file(str(out / "model.safetensors")).values() if v.is_floating_point())
    from cmgnet.integrity import file_sha256, recorded_sha256

    assert recorded_sha256(out / "config.json") == file_sha256(out / "model.safetensors")  # the fp16 file's
    assert "flip TTA off" in card
    # Flip TTA chosen after training: one of the evaluations must report it.
    with pytest.raises(SystemExit, match=r"no evaluation used the served TTA setting \(on\)"):
        ship_model.main([*args, "--postprocess", "largest", "--tta"])
    tta = build_result(rows, "test", "metadata", True)
    tta.info.update(postprocess="largest", tta=True)
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"test/metadata": result.to_json(),
                                                                 "test/metadata/tta": tta.to_json()}))
    assert ship_model.main([*args, "--postprocess", "largest", "--tta"]) == 0
    assert InferenceRecord.load(out).tta is True and "flip TTA on (4 passes)" in (out / "README.md").read_text()
    assert re.search(r"\| metadata +\| flip x4 +\| 100\.0 +\|", (out / "README.md").read_text())


def test_evaluate_by_name_on_a_test_only_folder_in_every_regime(tmp_path, capsys):
    """No experiment file, no training split: the model's record and its own classifier suffice."""
    from cmgnet.data.synthetic import generate_dataset
    from cmgnet.text.pseudo_text import TEXT_REGIMES
    from cmgnet.train.cli import evaluate_main

    root = generate_dataset(tmp_path / "ISIC2017", n_train=0, n_val=0, n_test=3, size=64)
    with pytest.raises(SystemExit) as stop:
        evaluate_main(["--checkpoint", NAME])
    assert stop.value.code == 2
    assert "pass --config, or name the data (data.root=FOLDER" in capsys.readouterr().err
    out = tmp_path / "eval"
    evaluate_main(["--checkpoint", NAME, f"data.root={root}", "--text-regime", *TEXT_REGIMES, "--no-hd95",
                   "--overlays", "0", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {f"test/{regime}" for regime in TEXT_REGIMES}
    for result in summary.values():
        assert result["n_images"] == 3 and result["image_size"] == 256  # the model's own size, not the default
        assert result["tta"] is False and result["postprocess"] == "largest"  # as served
    assert summary["test/predicted"]["diagnosis"]["n"] == 3
    assert "majority_class" not in summary["test/predicted"]["diagnosis"]  # no training split to count


def test_a_card_names_every_source_and_the_strictest_licence():
    from cmgnet.ship import data_lines

    data = {"sources": [
        {"name": "isic", "format": "isic2018", "protocol": "split-csv", "weight": 0.6},
        {"name": "ham10000", "format": "ham10000", "protocol": "grouped", "split_fractions": [0.9, 0.05, 0.05],
         "weight": 0.4}]}
    bullets, heading, licence = data_lines(data)
    assert "- Data (isic): ISIC 2018" in bullets and "60% of each epoch" in bullets
    assert "- Data (ham10000): HAM10000" in bullets and "90:5:5 (train:val:test); 40% of each epoch" in bullets
    assert heading == "" and "CC BY-NC-SA 4.0" in licence and "same terms" in licence
