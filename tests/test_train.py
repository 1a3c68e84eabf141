"""Training engine: config tree, checkpoints (atomic, exact resume), a short run, evaluation CLI, ablation."""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cmgnet.model import SegmentationModel
from cmgnet.train import Trainer, load_config
from cmgnet.train import checkpoint as ckpt
from cmgnet.train.config import flatten, to_dict
from cmgnet.train.diagnosis import DiagnosisClassifier
from cmgnet.train.testing import synthetic_dataset, tiny_experiment

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return synthetic_dataset(tmp_path_factory.getbasetemp() / "synthetic")


@pytest.fixture(scope="module")
def short_run(data_root, tmp_path_factory):
    """One tiny training run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("short")
    cfg = tiny_experiment(data_root, out, "train.epochs=4", "eval.text_regimes=[none, predicted, oracle]")
    return Trainer(cfg).fit()


# ---------------------------------------------------------------- config


def test_yaml_overrides_and_base(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\noptim: {name: sgd, lr: 0.01}\ntrain: {epochs: 3}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: child\ntrain: {batch_size: 2}\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.lr=1e-3", "model.masa=false", "model.fusion_scales=[16, 8]",
                                                "model.fusion_layers=[1, 1]", "eval.splits=val"])
    assert (cfg.name, cfg.optim.name, cfg.optim.lr, cfg.train.epochs, cfg.train.batch_size) == ("child", "sgd", 1e-3, 3, 2)
    assert cfg.model.masa is False and cfg.model.fusion_scales == (16, 8)
    assert cfg.eval.splits == ["val"]  # a scalar for a list field becomes a one-element list
    assert flatten(to_dict(cfg))["optim.lr"] == 1e-3


def test_yaml_1_2_booleans_keep_no_a_string(tmp_path):
    # YAML 1.1 reads `no`/`yes`/`off` as booleans; mixed_precision's documented value is "no".
    (tmp_path / "c.yaml").write_text("train: {mixed_precision: no}\nmodel: {masa: false}\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.channels_last=true"])
    assert cfg.train.mixed_precision == "no" and cfg.model.masa is False and cfg.train.channels_last is True
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


@pytest.mark.parametrize("override, error", [
    ("optim.lrr=1", KeyError), ("train.epochs=many", TypeError), ("model.masa=3", TypeError),
    ("data.text_regime_eval=psychic", ValueError), ("novalue", ValueError),
])
def test_bad_overrides_are_errors(override, error):
    with pytest.raises(error):
        load_config(None, [override])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    if path.stem.startswith("compare-"):  # comparison configs: an experiment + a compare: section
        from cmgnet.train.compare import load_compare_config

        cfg, _ = load_compare_config(path)
    else:
        cfg = load_config(path)
    assert cfg.data.image_size % cfg.model.stride == 0


# ---------------------------------------------------------------- checkpoints


def test_state_roundtrip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    ckpt.save_state(opt.state_dict(), tmp_path, "optimizer")
    ckpt.save_state(ckpt.rng_state(), tmp_path, "rng")
    loaded = ckpt.load_state(tmp_path, "optimizer")
    assert loaded["param_groups"] == opt.state_dict()["param_groups"]
    for key, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(loaded["state"][key][name], value)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    ckpt.set_rng_state(ckpt.load_state(tmp_path, "rng"))
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pt"))


def test_crash_during_checkpoint_write_keeps_previous(data_root, tmp_path, monkeypatch):
    cfg = tiny_experiment(data_root, tmp_path, "train.epochs=1", "train.checkpoint_every_steps=1")
    real_save_state = ckpt.save_state
    calls = {"n": 0}

    def dying_save_state(state, directory, name):
        calls["n"] += name == "optimizer"
        if name == "optimizer" and calls["n"] == 2:  # second checkpoint: die after the weights are written
            (directory / "optimizer.safetensors").write_bytes(b"partial")
            raise OSError("simulated crash mid-write")
        real_save_state(state, directory, name)

    monkeypatch.setattr(ckpt, "save_state", dying_save_state)
    with pytest.raises(OSError, match="simulated crash"):
        Trainer(cfg).fit()
    monkeypatch.setattr(ckpt, "save_state", real_save_state)

    root = tmp_path / "tiny" / "checkpoints"
    latest = ckpt.CheckpointManager(root).latest()
    assert latest is not None and latest.name == "step-00000001"
    assert list(root.glob(".tmp-*")), "the interrupted write stays in its temporary directory"
    ckpt.load_state(latest, "optimizer")  # the previous checkpoint is intact and loadable
    SegmentationModel.from_pretrained(latest / "model")
    resumed = Trainer(cfg).fit()  # resume="auto" continues from step 1 and cleans up
    assert resumed.state.global_step == 4 and not list(root.glob(".tmp-*"))


def _last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.CheckpointManager(run_dir / "checkpoints").latest() / "model" / "model.safetensors"))


class _Killed(Exception):
    pass


class _KilledAt(Trainer):
    """Dies right after the checkpoint of a given step (as a SIGKILL after the save would)."""

    kill_step = 5

    def on_step_end(self, loss):
        super().on_step_end(loss)
        if self.state.global_step == self.kill_step:
            raise _Killed


def test_kill_and_resume_equals_uninterrupted(data_root, tmp_path):
    common = ["train.epochs=2", "train.checkpoint_every_steps=1", "train.deterministic=true",
              "model.modality_dropout=0.5", "eval.text_regimes=[none, predicted]", "eval.splits=[]"]
    full = Trainer(tiny_experiment(data_root, tmp_path / "a", *common)).fit()
    interrupted_cfg = tiny_experiment(data_root, tmp_path / "b", *common)
    with pytest.raises(_Killed):
        _KilledAt(interrupted_cfg).fit()  # killed mid-epoch 2 (4 steps per epoch)
    torch.manual_seed(1234)  # a fresh process would have other RNG state
    resumed = Trainer(interrupted_cfg).fit()
    assert resumed.state.global_step == full.state.global_step == 8
    a, b = _last_weights(full.run_dir), _last_weights(resumed.run_dir)
    assert a.keys() == b.keys()
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, f"resumed weights differ: {mismatched[:5]}"
    assert resumed.state.best_metric == pytest.approx(full.state.best_metric)


def test_time_limit_stops_with_checkpoint_validation_and_evaluation(data_root, tmp_path):
    start = time.perf_counter()
    timed = Trainer(tiny_experiment(data_root, tmp_path / "t", "train.epochs=50", "train.time_limit_minutes=1e-5")).fit()
    assert timed.state.global_step == 1 and timed.best_dir is not None and timed.results
    assert ckpt.CheckpointManager(timed.run_dir / "checkpoints").latest().name == "step-00000001"
    # Wall time is accounted once across checkpoints (it bounds the time limit).
    full = Trainer(tiny_experiment(data_root, tmp_path / "f", "train.epochs=1", "train.checkpoint_every_steps=1")).fit()
    assert 0 < full.state.elapsed_s <= time.perf_counter() - start


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state, fixed by the first Accelerator (fp32 in this suite)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_channels_last_trains_saves_and_resumes(data_root, tmp_path, fresh_accelerate_state):
    common = ["train.mixed_precision=bf16", "train.channels_last=true", "train.checkpoint_every_steps=2", "eval.splits=[]"]
    first = Trainer(tiny_experiment(data_root, tmp_path, "train.epochs=1", *common))
    result = first.fit()
    assert first.accelerator.mixed_precision == "bf16"
    conv = next(p for p in first._unwrapped().parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    model = SegmentationModel.from_pretrained(result.best_dir).eval()  # plain NCHW fp32 weights on disk
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(1, 3, 32, 32), text=["Skin lesion."])).all()
    resumed = Trainer(tiny_experiment(data_root, tmp_path, "train.epochs=2", *common)).fit()
    assert resumed.state.global_step == 2 * result.state.global_step


# ---------------------------------------------------------------- a short run


def test_short_run_lowers_loss_and_writes_loadable_best(short_run):
    losses = [h["train_loss"] for h in short_run.state.history]
    assert losses[-1] < losses[0], losses
    model = SegmentationModel.from_pretrained(short_run.best_dir).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 32, 32), text=["Skin lesion."])
    assert out.shape == (1, 1, 32, 32)
    assert (short_run.best_dir / "diagnosis" / "classifier.safetensors").exists()
    best = json.loads((short_run.best_dir / "metrics.json").read_text())
    assert best["convention"] == "per_image_mean" and best["text_regime"] == "none"


def test_final_evaluation_outputs(short_run):
    assert [r.label for r in short_run.results] == ["test/none", "test/predicted", "test/oracle"]
    out = short_run.run_dir / "eval" / "test-oracle"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 5 and metrics["text_regime"] == "oracle"
    assert set(metrics["conventions"]) == {"per_image_mean", "pooled"} and "empty_masks" in metrics
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and {"dice", "hd95", "tp", "text_regime"} <= set(rows[0])
    assert len(list((out / "overlays").glob("*.png"))) == 2
    predicted = json.loads((short_run.run_dir / "eval" / "test-predicted" / "metrics.json").read_text())
    assert 0.0 <= predicted["diagnosis_accuracy"] <= 1.0


def test_diagnosis_classifier_is_kept_on_its_own_validation_score(short_run):
    history = [h["val_diagnosis_balanced_accuracy"] for h in short_run.state.history]
    state = short_run.state
    assert len(history) == 4 and state.best_diagnosis_metric == max(history)
    assert state.best_diagnosis_epoch == history.index(max(history))  # the first epoch reaching it
    kept = short_run.run_dir / "best-diagnosis"
    for name in ("classifier.json", "classifier.safetensors"):  # best/ serves that one, whatever epoch the network's best is
        assert (short_run.best_dir / "diagnosis" / name).read_bytes() == (kept / name).read_bytes()


def test_fine_tuning_starts_from_saved_weights_and_classifier(short_run, data_root, tmp_path):
    from cmgnet.errors import CheckpointError

    best = short_run.best_dir
    cfg = tiny_experiment(data_root, tmp_path, f"train.init_weights={best}", "train.epochs=1", "train.max_steps=1",
                          "eval.text_regimes=[none, predicted]", "optim.lr=1e-9")
    trainer = Trainer(cfg)
    trainer.setup()
    saved = SegmentationModel.from_pretrained(best).state_dict()
    loaded = trainer._unwrapped().state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)  # the network starts from the saved weights
    classifier = DiagnosisClassifier.load(best / "diagnosis")
    task = trainer.auxiliary[0]
    assert all(torch.equal(v, task.unwrapped.state_dict()[k]) for k, v in classifier.state_dict().items())
    assert trainer.state.global_step == 0  # optimiser and schedule start fresh
    trainer.release_run_dir()
    other = tiny_experiment(data_root, tmp_path / "b", f"train.init_weights={best}", "model.fusion_dim=32")
    with pytest.raises(CheckpointError, match="differs from the weights': model.fusion_dim 16 -> 32"):
        Trainer(other).setup()


def test_evaluate_cli_any_split_and_regime(short_run, tmp_path, capsys):
    from cmgnet.train.cli import evaluate_main

    out = tmp_path / "eval"
    evaluate_main(["--checkpoint", str(short_run.best_dir), "--split", "val", "test",
                   "--text-regime", "metadata", "predicted", "--output", str(out), "--no-hd95"])
    printed = capsys.readouterr().out
    assert "per_image_mean" in printed and "pooled" in printed and "val/metadata" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"val/metadata", "val/predicted", "test/metadata", "test/predicted"}
    assert summary["val/metadata"]["n_images"] == 6


def test_evaluate_reports_intervals_thresholded_jaccard_and_metadata_minus_shuffled(short_run, tmp_path, capsys):
    from cmgnet.stats import bootstrap_ci, paired_difference
    from cmgnet.train.cli import evaluate_main
    from cmgnet.train.tracking import eval_metrics

    out = tmp_path / "eval"
    evaluate_main(["--checkpoint", str(short_run.best_dir), "--split", "test", "--text-regime", "shuffled", "metadata",
                   "--output", str(out), "--overlays", "0"])
    printed = capsys.readouterr().out
    assert "95% CI" in printed and "t-jaccard" in printed and "test: metadata - shuffled" in printed
    summary = json.loads((out / "summary.json").read_text())
    per_image = {}
    for regime in ("metadata", "shuffled"):
        with open(out / f"test-{regime}" / "per_image.csv") as f:
            per_image[regime] = {r["image_id"]: r for r in csv.DictReader(f)}
        result = summary[f"test/{regime}"]
        assert json.loads((out / f"test-{regime}" / "metrics.json").read_text()) == result
        means, intervals = result["per_image_mean"], result["per_image_ci95"]
        assert set(intervals) == {"dice", "iou", "thresholded_jaccard", "precision", "recall", "f1", "accuracy", "hd95"}
        for metric in ("dice", "thresholded_jaccard"):
            values = [float(per_image[regime][i][metric]) for i in sorted(per_image[regime])]
            assert means[metric] == pytest.approx(np.mean(values)) and intervals[metric] == list(bootstrap_ci(values))
        assert all(float(r["thresholded_jaccard"]) in (0.0, float(r["iou"])) for r in per_image[regime].values())
    paired = summary["test/shuffled"]["paired"]["metadata_minus_shuffled"]
    dice = {regime: {i: float(r["dice"]) for i, r in rows.items()} for regime, rows in per_image.items()}
    assert paired["dice"] == paired_difference(dice["metadata"], dice["shuffled"])  # CSV floats round-trip
    assert paired["dice"]["n_images"] == 5 and "thresholded_jaccard" in paired and "f1" not in paired
    logged = eval_metrics("test", "shuffled", summary["test/shuffled"])
    assert logged["eval/test/metadata_minus_shuffled/dice"] == paired["dice"]["difference"]
    assert "eval/test/shuffled/thresholded_jaccard" in logged and "eval/test/shuffled/dice_ci95_low" in logged


def test_evaluate_cli_serves_the_checkpoints_recorded_tta_and_postprocess(short_run, tmp_path, monkeypatch):
    """A model shipped with serving choices made after training is evaluated as predict serves it:
    recorded TTA and post-processing, fp32 whatever precision it was trained in."""
    import dataclasses
    import shutil

    import yaml

    from cmgnet.inference import InferenceRecord
    from cmgnet.train import engine
    from cmgnet.train.cli import evaluate_main

    shipped = tmp_path / "shipped"
    shutil.copytree(short_run.best_dir, shipped)
    experiment = yaml.safe_load((shipped / "experiment.yaml").read_text())
    experiment["train"]["mixed_precision"] = "bf16"
    (shipped / "experiment.yaml").write_text(yaml.safe_dump(experiment))
    precisions = []
    build = engine.build_accelerator
    monkeypatch.setattr(engine, "build_accelerator", lambda cfg: precisions.append(cfg.train.mixed_precision) or build(cfg))
    record = InferenceRecord.load(shipped)
    assert (record.tta, record.postprocess) == (False, "none")  # as trained
    dataclasses.replace(record, tta=True, postprocess="largest").save(shipped)

    def served(*extra):
        out = tmp_path / f"eval{len(list(tmp_path.iterdir()))}"
        evaluate_main(["--checkpoint", str(shipped), "--split", "test", "--text-regime", "none", "--output", str(out),
                       "--no-hd95", "--overlays", "0", *extra])
        info = json.loads((out / "summary.json").read_text())["test/none"]
        return info["tta"], info["postprocess"]

    assert served() == (True, "largest")
    assert served("--no-tta", "--postprocess", "fill") == (False, "fill")
    assert served("eval.tta=false", "eval.postprocess=none") == (False, "none")
    assert precisions == ["no"] * 3


def test_ablation_prints_paper_table(data_root, tmp_path, capsys):
    from cmgnet.train.ablate import run_ablation

    cfg = tiny_experiment(data_root, tmp_path, "train.epochs=1", "eval.hd95=false", "eval.overlays=0")
    report = run_ablation(cfg, ["unet", "full"])
    table = capsys.readouterr().out
    assert "| Network" in table and "Baseline (U-Net)" in table and "CMG-Net" in table
    assert [r["variant"] for r in report["rows"]] == ["unet", "full"]
    assert json.loads(report["json"].read_text())["text_regime"] == "none"


def test_cli_reports_config_mistakes_as_usage_errors(capsys):
    from conftest import REPO_ROOT

    from cmgnet.train.cli import evaluate_main, train_main

    demo = str(REPO_ROOT / "configs" / "demo.yaml")
    for main, argv in ((train_main, ["--config", "configs/missing.yaml"]),
                       (train_main, ["--config", demo, "optim.no_such_key=1"]),
                       (evaluate_main, ["--checkpoint", "no/such/run"])):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "missing.yaml" in err and "optim.no_such_key" in err and "no/such/run" in err
    assert "Traceback" not in err
