"""Issue 23, non-finite numbers: never a silent wrong answer from NaN or inf.

Training skips (never applies) a step whose loss is NaN/inf and stops after
``train.max_nonfinite_steps`` in a row, keeping the last good checkpoint and ``best/``; weights
are checked against their recorded SHA-256 and for NaN/inf at load; the network's output is
checked at inference. Entry points run in-process (``main(argv)``) as in ``test_errors.py``.

This file is also the worker of the DDP test: ``torchrun --nproc_per_node 2 tests/test_nonfinite.py OUT DATA``.
"""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import one_error_line
from test_train import fresh_accelerate_state  # noqa: F401 - a fixture: bf16 needs its own Accelerate state

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
DDP_PORT = "29531"


def nan_loss(monkeypatch, bad) -> None:
    """Make the training loss NaN on the micro-batches (1-based call numbers) for which ``bad(n)`` holds.

    The NaN is multiplied in, so its gradients are NaN too: an applied step would poison the weights.
    """
    import cmgnet.train.engine as engine

    real = engine.build_loss

    def build(cfg):
        fn, calls = real(cfg), [0]

        def loss(logits, mask):
            calls[0] += 1
            value = fn(logits, mask)
            return value * float("nan") if bad(calls[0]) else value

        return loss

    monkeypatch.setattr(engine, "build_loss", build)


def damage(path: Path) -> None:
    """Overwrite 4 bytes in the middle of a safetensors file's data region (the header stays valid) with NaN."""
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", bytes(raw[:8]))[0]
    at = start + ((len(raw) - start) // 2) // 4 * 4
    raw[at : at + 4] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(raw))


def drop_hash(record: Path) -> None:
    """Remove the recorded SHA-256, as in a record written before hashes existed."""
    from cmgnet.integrity import SHA256_KEY

    data = json.loads(record.read_text())
    del data[SHA256_KEY]
    record.write_text(json.dumps(data, indent=2) + "\n")


@pytest.fixture(autouse=True)
def _private_cache(private_cache):
    """Every test here gets its own cache (conftest.private_cache)."""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from cmgnet.train.testing import synthetic_dataset

    return synthetic_dataset(tmp_path_factory.getbasetemp() / "synthetic-nonfinite", n_train=8, n_val=2, n_test=2,
                             size=SIZE)


@pytest.fixture(scope="module")
def checkpoint(data_root, tmp_path_factory) -> Path:
    """A tiny saved model with its inference record and experiment.yaml (what ``evaluate`` reads)."""
    from conftest import tiny_config

    from cmgnet.inference import InferenceRecord
    from cmgnet.model import CMGNet
    from cmgnet.train.config import save_config
    from cmgnet.train.testing import tiny_experiment

    root = tmp_path_factory.mktemp("nonfinite")
    torch.manual_seed(0)
    model = CMGNet(tiny_config()).eval()
    model.inference = InferenceRecord(image_size=(SIZE, SIZE), text_model="tiny-random-bert", text_max_length=24)
    saved = model.save_pretrained(root / "checkpoint")
    save_config(tiny_experiment(data_root, root / "runs", image_size=SIZE), saved / "experiment.yaml")
    return saved


@pytest.fixture
def image(data_root) -> Path:
    return next((data_root / "ISIC-2017_Test_v2_Data").glob("*.jpg"))


def run_entry(entry: str, model: Path, image: Path, out: Path) -> int:
    from cmgnet.cli import main

    argv = {"predict": ["predict", str(model), str(image), "--out", str(out), "--no-progress"],
            "evaluate": ["evaluate", "--checkpoint", str(model), "--out", str(out), "--no-hd95"],
            "export": ["export", str(model), "--out", str(out), "--verify-batches"]}[entry]
    return main(argv)


# ----------------------------------------------------------------------------- weights at load


def test_save_pretrained_records_the_weights_hash_and_refuses_nan(checkpoint, tmp_path):
    from cmgnet.errors import CheckpointError
    from cmgnet.integrity import file_sha256, recorded_sha256
    from cmgnet.model import SegmentationModel

    assert recorded_sha256(checkpoint / "config.json") == file_sha256(checkpoint / "model.safetensors")
    model = SegmentationModel.from_pretrained(checkpoint)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(CheckpointError, match="non-finite weights"):
        model.save_pretrained(tmp_path / "nan")
    assert not (tmp_path / "nan" / "model.safetensors").exists()


@pytest.mark.parametrize("entry", ["predict", "evaluate", "export"])
@pytest.mark.parametrize("recorded", [True, False], ids=["hash-recorded", "no-hash"])
def test_damaged_weight_bytes_are_one_line_naming_the_file(checkpoint, image, tmp_path, capsys, entry, recorded):
    import shutil

    model = Path(shutil.copytree(checkpoint, tmp_path / "checkpoint"))
    damage(model / "model.safetensors")
    if not recorded:
        drop_hash(model / "config.json")
    assert run_entry(entry, model, image, tmp_path / "out") == 1
    line = one_error_line(capsys.readouterr().err, model / "model.safetensors")
    if recorded:
        assert f"do not match the SHA-256 recorded in {model / 'config.json'}" in line
    else:
        assert "non-finite model weights: tensor '" in line
    assert "model.onnx" not in line  # export blames the weights, not its own output
    assert not list((tmp_path / "out").glob("**/*.png")) and not (tmp_path / "out" / "model.onnx").exists()


def test_a_record_without_a_hash_still_loads_and_a_bad_hash_value_is_named(checkpoint, tmp_path):
    import shutil

    from cmgnet.errors import CheckpointError
    from cmgnet.integrity import SHA256_KEY
    from cmgnet.model import SegmentationModel

    model = Path(shutil.copytree(checkpoint, tmp_path / "checkpoint"))
    drop_hash(model / "config.json")
    SegmentationModel.from_pretrained(model)
    saved = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(saved | {SHA256_KEY: 42}))
    with pytest.raises(CheckpointError, match=f"{SHA256_KEY}: expected 64") as err:
        SegmentationModel.from_pretrained(model)
    assert str(model / "config.json") in str(err.value)


def test_the_diagnosis_classifier_records_and_verifies_its_hash(tmp_path):
    from cmgnet.errors import CheckpointError
    from cmgnet.integrity import file_sha256, recorded_sha256
    from cmgnet.train.diagnosis import CONFIG_NAME, WEIGHTS_NAME, DiagnosisClassifier

    folder = DiagnosisClassifier(["melanoma", "nevus"], width=4).save(tmp_path / "diagnosis")
    assert recorded_sha256(folder / CONFIG_NAME) == file_sha256(folder / WEIGHTS_NAME)
    DiagnosisClassifier.load(folder)
    damage(folder / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="do not match the SHA-256 recorded in") as err:
        DiagnosisClassifier.load(folder)
    assert str(folder / WEIGHTS_NAME) in str(err.value)
    drop_hash(folder / CONFIG_NAME)
    with pytest.raises(CheckpointError, match="non-finite classifier weights"):
        DiagnosisClassifier.load(folder)


def test_the_shipped_model_records_the_hashes_of_its_weights():
    from cmgnet.integrity import file_sha256, recorded_sha256
    from cmgnet.shipped import PRETRAINED_DIR, list_pretrained

    assert list_pretrained()
    for name in list_pretrained():
        folder = PRETRAINED_DIR / name
        pairs = [(folder / "config.json", folder / "model.safetensors")]
        if (folder / "diagnosis").is_dir():
            pairs.append((folder / "diagnosis" / "classifier.json", folder / "diagnosis" / "classifier.safetensors"))
        for record, weights in pairs:
            assert recorded_sha256(record) == file_sha256(weights), record


def test_an_optimizer_state_with_nan_is_refused_at_resume(tmp_path):
    from cmgnet.errors import CheckpointError
    from cmgnet.train import checkpoint as ckpt

    ckpt.save_state({"exp_avg": torch.tensor([1.0, float("inf")])}, tmp_path, "optimizer")
    with pytest.raises(CheckpointError, match="non-finite optimizer state: tensor") as err:
        ckpt.load_state(tmp_path, "optimizer")
    assert str(tmp_path / "optimizer.safetensors") in str(err.value)


# ----------------------------------------------------------------------------- inference


def test_nan_probabilities_fail_predict_naming_the_model(checkpoint, image, tmp_path, capsys, monkeypatch):
    from cmgnet.model import CMGNet

    real = CMGNet.forward
    monkeypatch.setattr(CMGNet, "forward", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    out = tmp_path / "out"
    from cmgnet.cli import main

    # PyTorch's own output (ONNX Runtime's is the test below): the patched forward runs there.
    assert main(["predict", str(checkpoint), str(image), "--out", str(out), "--no-progress", "--backend", "torch"]) == 1
    line = one_error_line(capsys.readouterr().err, image, checkpoint / "model.safetensors")
    assert "returned NaN or inf for 1 of 1 images" in line
    assert not list((out / "masks").glob("*.png"))  # no empty mask
    with open(out / "predictions.csv") as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["error"]


@pytest.mark.slow
def test_nan_probabilities_from_onnxruntime_name_the_onnx_file(checkpoint, image, tmp_path, capsys, monkeypatch):
    from cmgnet.deploy.runners import OnnxRuntimeRunner

    bundle = tmp_path / "bundle"
    assert run_entry("export", checkpoint, image, bundle) == 0
    real = OnnxRuntimeRunner.__call__
    monkeypatch.setattr(OnnxRuntimeRunner, "__call__", lambda self, *a: real(self, *a) * float("nan"))
    capsys.readouterr()
    assert run_entry("predict", bundle, image, tmp_path / "out") == 1
    one_error_line(capsys.readouterr().err, image, bundle / "model.onnx")
    assert not list((tmp_path / "out" / "masks").glob("*.png"))


# ----------------------------------------------------------------------------- training


def _train_config(data_root: Path, out: Path, *overrides: str) -> Path:
    from cmgnet.train.config import save_config
    from cmgnet.train.testing import tiny_experiment

    cfg = tiny_experiment(data_root, out, "train.epochs=3", "train.batch_size=2", "eval.splits=[]",
                          "model.modality_dropout=0.0", *overrides)
    return save_config(cfg, out / "cfg.yaml")


def _assert_finite_and_loadable(folder: Path) -> None:
    from cmgnet.integrity import nonfinite_tensors
    from cmgnet.model import SegmentationModel

    assert not nonfinite_tensors(load_file(str(folder / "model.safetensors"))), folder
    SegmentationModel.from_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize("setup, step", [("fp32", 7), ("bf16 autocast, grad_accum=2", 4)])
def test_a_nan_loss_stops_training_keeping_the_last_good_checkpoint_and_best(data_root, tmp_path, capsys, monkeypatch,
                                                                            fresh_accelerate_state, setup, step):
    from cmgnet.cli import main
    from cmgnet.train import checkpoint as ckpt
    from cmgnet.train.tracking import Tracker

    # 4 micro-batches per epoch; NaN from micro-batch 6 on: epoch 2's second step (or window) onwards.
    nan_loss(monkeypatch, lambda n: n >= 6)
    ended = []
    monkeypatch.setattr(Tracker, "end", lambda self, status="FINISHED": ended.append(status))
    extra = ["train.mixed_precision=bf16", "train.grad_accum=2"] if setup.startswith("bf16") else []
    config = _train_config(data_root, tmp_path, "train.max_nonfinite_steps=1", *extra)
    assert main(["train", "--config", str(config)]) == 1
    run = tmp_path / "tiny"
    line = one_error_line(capsys.readouterr().err, run)
    assert f"training stopped at step {step} (epoch 2): the loss was NaN or inf on 2 optimiser step(s) in a row" in line
    assert "checkpoints/" in line and "best/ are kept" in line
    assert ended == ["FAILED"]
    kept = ckpt.CheckpointManager(run / "checkpoints").complete()
    assert [p.name for p in kept] == ["step-00000002" if extra else "step-00000004"]  # epoch 1's end
    _assert_finite_and_loadable(kept[-1] / "model")
    _assert_finite_and_loadable(run / "best")
    assert json.loads((run / "best" / "metrics.json").read_text())["epoch"] == 1


def _trainable(trainer) -> torch.Tensor:
    return next(p for p in trainer._unwrapped().parameters() if p.requires_grad)


class _Snapshots:
    """Records one weight after every optimiser step (on_step_end)."""

    def __init__(self, trainer_cls):
        self.weights: list[torch.Tensor] = []
        outer = self

        class Recording(trainer_cls):
            def on_step_end(self, loss: float) -> None:
                outer.weights.append(_trainable(self).detach().clone())
                super().on_step_end(loss)

        self.trainer_cls = Recording


@pytest.mark.slow
def test_a_transient_nan_is_skipped_not_applied_under_accumulation(data_root, tmp_path, monkeypatch):
    from cmgnet.train import Trainer, load_config

    # grad_accum=2: the NaN is in the first micro-batch of step 2's window, the second one is finite.
    nan_loss(monkeypatch, lambda n: n == 3)
    cfg = load_config(_train_config(data_root, tmp_path, "train.grad_accum=2", "train.epochs=2",
                                    "train.ema_decay=0.5"))
    snaps = _Snapshots(Trainer)
    result = snaps.trainer_cls(cfg).fit()
    assert result.state.global_step == 4 and result.state.nonfinite_steps == 0
    before, skipped, after = snaps.weights[0], snaps.weights[1], snaps.weights[2]
    assert torch.equal(before, skipped)  # step 2 changed nothing
    assert not torch.equal(skipped, after) and torch.isfinite(after).all()
    assert all(r["train_loss"] == r["train_loss"] for r in result.state.history)  # no nan epoch mean
    _assert_finite_and_loadable(result.best_dir)


@pytest.mark.slow
def test_nan_weights_are_never_saved(data_root, tmp_path):
    from cmgnet.errors import NonFiniteError
    from cmgnet.train import Trainer, load_config
    from cmgnet.train import checkpoint as ckpt

    class Poisoned(Trainer):
        def on_step_end(self, loss: float) -> None:
            if self.state.global_step == 2:  # e.g. an overflow in an applied step with a finite loss
                with torch.no_grad():
                    _trainable(self).fill_(float("inf"))
            super().on_step_end(loss)

    cfg = load_config(_train_config(data_root, tmp_path, "train.checkpoint_every_steps=1"))
    with pytest.raises(NonFiniteError, match=r"training stopped at step 2 \(epoch 1\): weight '.+' is NaN or inf, "
                                             r"so the checkpoint was not saved; checkpoints/step-00000001 is kept"):
        Poisoned(cfg).fit()
    kept = ckpt.CheckpointManager(tmp_path / "tiny" / "checkpoints").complete()
    assert [p.name for p in kept] == ["step-00000001"]
    _assert_finite_and_loadable(kept[0] / "model")


@pytest.mark.slow
def test_a_nonfinite_validation_score_never_becomes_best(data_root, tmp_path):
    from cmgnet.train import Trainer, load_config

    class NanScore(Trainer):
        def evaluate(self, split, text_regime, **kwargs):
            result = super().evaluate(split, text_regime, **kwargs)
            result.summary["per_image_mean"]["dice"] = float("nan")
            return result

    result = NanScore(load_config(_train_config(data_root, tmp_path, "train.epochs=1"))).fit()
    assert result.best_dir is None and result.state.best_epoch == -1


@pytest.mark.slow
def test_auto_resume_skips_a_checkpoint_whose_weights_were_damaged(data_root, tmp_path):
    from cmgnet.train import Trainer, load_config
    from cmgnet.train import checkpoint as ckpt

    config = _train_config(data_root, tmp_path, "train.epochs=1", "train.checkpoint_every_steps=2")
    Trainer(load_config(config)).fit()
    root = tmp_path / "tiny" / "checkpoints"
    latest = ckpt.CheckpointManager(root).latest()
    damage(latest / "model" / "model.safetensors")
    assert "do not match the SHA-256 recorded in" in ckpt.verify_checkpoint(latest)
    trainer = Trainer(load_config(config))
    trainer.checkpoints = ckpt.CheckpointManager(root)
    previous = trainer._resume_path()
    assert previous is not None and previous != latest and ckpt.verify_checkpoint(previous) is None


# ----------------------------------------------------------------------------- DDP


def _ddp_params(out: Path, data_root: Path, max_nonfinite: int, grad_clip: float) -> dict[str, torch.Tensor]:
    from test_train_distributed import InMemoryData, _config

    from cmgnet.train import Trainer
    from cmgnet.train.engine import build_accelerator

    cfg = _config(out, data_root, grad_accum=1)
    cfg.train.max_nonfinite_steps = max_nonfinite
    cfg.optim.grad_clip = grad_clip
    accelerator = build_accelerator(cfg)
    trainer = Trainer(cfg, data=InMemoryData(accelerator.process_index, accelerator.num_processes),
                      accelerator=accelerator)
    trainer.fit()
    return {n: p.detach().clone() for n, p in trainer._unwrapped().named_parameters()}


def worker(out: Path, data_root: Path) -> None:
    """Run inside ``torchrun --nproc_per_node 2``: a NaN on rank 1 only, transient then persistent."""
    from _pytest.monkeypatch import MonkeyPatch
    from safetensors.torch import save_file

    from cmgnet.errors import NonFiniteError

    rank = int(os.environ["RANK"])
    with MonkeyPatch.context() as mp:  # 2 steps per epoch; rank 1's loss is NaN at step 2 only
        nan_loss(mp, lambda n: rank == 1 and n == 2)
        # No clipping: rank 0 sees no NaN of its own (not even the gradient norm), only the shared flag.
        params = _ddp_params(out / "transient", data_root, max_nonfinite=1, grad_clip=0.0)
    save_file({k: v.contiguous() for k, v in params.items()}, str(out / f"transient-{rank}.safetensors"))
    with MonkeyPatch.context() as mp:  # rank 1's loss is NaN from step 3 (epoch 2) on
        nan_loss(mp, lambda n: rank == 1 and n >= 3)
        try:
            _ddp_params(out / "persistent", data_root, max_nonfinite=0, grad_clip=1.0)
            message = "no error"
        except NonFiniteError as err:
            message = str(err)
    (out / f"persistent-{rank}.txt").write_text(message)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_agree_to_skip_and_to_stop(data_root, tmp_path):
    from test_train_distributed import _env

    out = tmp_path / "ddp"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", DDP_PORT,
           __file__, str(out), str(data_root)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [load_file(str(out / f"transient-{r}.safetensors")) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) and torch.isfinite(ranks[0][k]).all() for k in ranks[0])
    messages = [(out / f"persistent-{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1] and "training stopped at step 3 (epoch 2): the loss was NaN or inf" in messages[0]


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
