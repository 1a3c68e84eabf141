"""Issue 23: writers that destroy each other's work, and a full disk that names no path.

Concurrency tests start real processes, bounded in time: the first writer runs in this
process and, at a chosen point, starts the second one (``python -m cmgnet.cli ...``) and
waits for it; a helper process that takes a lock and is killed with SIGKILL shows that no
stale lock survives it.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, one_error_line, tiny_config
from PIL import Image

from cmgnet.cli import main as cli_main
from cmgnet.inference import InferenceRecord
from cmgnet.model import CMGNet
from cmgnet.outputs import LOCK_NAME, OutputInUseError, OutputLock, WriteFailedError, writing
from cmgnet.train import checkpoint as ckpt
from cmgnet.train.config import save_config
from cmgnet.train.testing import synthetic_dataset, tiny_experiment

SIZE = 32
CHILD_TIMEOUT = 300  # seconds; a stuck child fails the test instead of hanging it
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as open()/write() raise it: no file name


@pytest.fixture(autouse=True)
def _private_cache(private_cache):
    """Every test here gets its own cache (conftest.private_cache)."""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A synthetic data set (2 steps per epoch), a tiny checkpoint with its record, and a training config."""
    root = tmp_path_factory.mktemp("locks")
    data = synthetic_dataset(root / "data", n_train=8, n_val=2, n_test=3, size=SIZE)
    model = CMGNet(tiny_config()).eval()
    model.inference = InferenceRecord(image_size=(SIZE, SIZE), text_model="tiny-random-bert", text_max_length=24)
    checkpoint = model.save_pretrained(root / "checkpoint")
    experiment = tiny_experiment(data, root / "runs", "eval.hd95=false", "eval.overlays=0", image_size=SIZE)
    save_config(experiment, checkpoint / "experiment.yaml")
    return {"root": root, "data": data, "checkpoint": checkpoint, "images": data / "ISIC-2017_Test_v2_Data"}


def training_config(assets, tmp_path: Path, *overrides: str) -> tuple[Path, Path]:
    """A tiny training config file (2 epochs of 2 steps, a checkpoint per step) and its run directory."""
    cfg = tiny_experiment(assets["data"], tmp_path / "runs", "train.checkpoint_every_steps=1", "eval.splits=[]",
                          "eval.hd95=false", "eval.overlays=0", *overrides, image_size=SIZE)
    return save_config(cfg, tmp_path / "tiny.yaml"), tmp_path / "runs" / "tiny"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    """``python -m cmgnet.cli ARGS`` in a new process (this environment), bounded in time."""
    return subprocess.run([sys.executable, "-m", "cmgnet.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT, cwd=REPO_ROOT)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: relative path -> (size, mtime in ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the lock itself

HOLDER = textwrap.dedent("""
    import sys, time
    from cmgnet.outputs import OutputLock
    OutputLock(sys.argv[1]).acquire()
    time.sleep(float(sys.argv[2]))
""")


@pytest.mark.slow
def test_a_lock_names_its_holder_and_dies_with_it(tmp_path):
    folder = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(CHILD_TIMEOUT)])
    try:
        deadline = time.monotonic() + 60
        while not ((folder / LOCK_NAME).exists() and (folder / LOCK_NAME).read_text().strip() == str(holder.pid)):
            assert holder.poll() is None and time.monotonic() < deadline, "the helper never took the lock"
            time.sleep(0.05)
        start = time.monotonic()
        with pytest.raises(OutputInUseError) as refused:
            OutputLock(folder).acquire()
        assert time.monotonic() - start < 5  # refused at once, not after waiting for the holder
        assert str(folder) in str(refused.value) and f"pid {holder.pid}" in str(refused.value)
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert (folder / LOCK_NAME).exists()  # the killed holder's file stays, but not its lock
    with OutputLock(folder) as lock:
        assert lock.held and (folder / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (folder / LOCK_NAME).exists()


def test_a_lock_leaves_no_empty_folder_behind(tmp_path):
    with OutputLock(tmp_path / "new" / "out"):
        assert (tmp_path / "new" / "out").is_dir()
    assert not (tmp_path / "new" / "out").exists()  # nothing was written: the folder it made goes too
    (tmp_path / "kept").mkdir()
    with OutputLock(tmp_path / "kept"):
        (tmp_path / "kept" / "result.txt").write_text("x")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["result.txt"]


# ----------------------------------------------------------------------------- two writers at once


@pytest.mark.slow
def test_a_second_predict_into_the_same_out_fails_at_once(assets, tmp_path, monkeypatch, capsys):
    """The second predict starts while the first holds --out, before the first wrote any mask."""
    from cmgnet.deploy.runtime import Segmenter

    out = tmp_path / "out"
    args = ["predict", assets["checkpoint"], assets["images"], "--out", out, "--no-progress"]
    second: list[subprocess.CompletedProcess] = []
    real_predict = Segmenter.predict

    def predict_while_another_starts(self, images, texts=None):
        if not second:
            second.append(run_cli(*args))
        return real_predict(self, images, texts)

    monkeypatch.setattr(Segmenter, "predict", predict_while_another_starts)
    assert cli_main([*map(str, args), "--batch-size", "1"]) == 0
    assert second and second[0].returncode == 1, second
    one_error_line(second[0].stderr, out, f"pid {os.getpid()}")
    # The first one's output is complete and agrees with its masks.
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    ids = sorted(p.stem for p in assets["images"].glob("*.jpg"))
    assert sorted(r["image_id"] for r in rows) == ids and {r["status"] for r in rows} == {"ok"}
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == ids
    for row in rows:
        mask = np.asarray(Image.open(row["mask_path"])) > 127
        assert int(row["lesion_pixels"]) == int(mask.sum()) and mask.shape == (int(row["height"]), int(row["width"]))
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_second_training_with_the_same_run_name_fails_at_once(assets, tmp_path):
    """The second training starts mid-run (two checkpoints written); it touches nothing and the first finishes."""
    from cmgnet.train import Trainer, load_config

    config, run_dir = training_config(assets, tmp_path)

    class RacedAtStep2(Trainer):
        second = None

        def on_step_end(self, loss):
            super().on_step_end(loss)
            if self.state.global_step == 2 and self.second is None:
                self.before = snapshot(run_dir)
                self.second = run_cli("train", "--config", config)
                self.after = snapshot(run_dir)

    first = RacedAtStep2(load_config(config))
    result = first.fit()
    assert first.second.returncode == 1, first.second
    one_error_line(first.second.stderr, run_dir, f"pid {os.getpid()}", "logging.run_name")
    assert first.after == first.before  # nothing of the first run was deleted or rewritten
    assert result.state.global_step == 4
    latest = ckpt.CheckpointManager(run_dir / "checkpoints").latest()
    assert latest.name == "step-00000004" and ckpt.verify_checkpoint(latest) is None
    assert result.best_dir is not None and not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert not (run_dir / LOCK_NAME).exists()


def _ship(assets, tmp_path: Path, out: Path) -> int:
    """``launch/ship_model.py`` on the tiny checkpoint, with an evaluation summary that fits it."""
    from cmgnet import ship as ship_model
    import torch

    from cmgnet.metrics import per_image_rows
    from cmgnet.train.evaluate import build_result

    rows = per_image_rows(torch.ones(1, 1, 8, 8, dtype=torch.bool), torch.ones(1, 1, 8, 8, dtype=torch.bool), ["a"])
    (tmp_path / "eval").mkdir(exist_ok=True)
    (tmp_path / "eval" / "summary.json").write_text(
        json.dumps({"test/none": build_result(rows, "test", "none", False).to_json()}))
    return ship_model.main(["--checkpoint", str(assets["checkpoint"]), "--name", "tiny", "--eval",
                            str(tmp_path / "eval"), "--wall-time", "1 min", "--out", str(out)])


ENTRIES = ("predict", "export", "evaluate", "train", "ablate", "compare", "ship_model")


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_writer_refuses_a_folder_in_use(assets, tmp_path, capsys, entry):
    """Another process holds the folder (a lock taken here stands for it): one line, exit 1, nothing touched."""
    config, run_dir = training_config(assets, tmp_path)
    folder = {"train": run_dir, "ablate": tmp_path / "runs" / "tiny-ablation",
              "compare": tmp_path / "runs" / "tiny-compare"}.get(entry, tmp_path / "out")
    argv = {
        "predict": ["predict", assets["checkpoint"], assets["images"], "--out", folder, "--no-progress"],
        "export": ["export", assets["checkpoint"], "--out", folder, "--verify-batches", "--tensorrt", "skip"],
        "evaluate": ["evaluate", "--checkpoint", assets["checkpoint"], "--out", folder, "--no-hd95"],
        "train": ["train", "--config", config],
        "ablate": ["ablate", "--config", config, "--variants", "unet"],
        "compare": ["compare", "--config", config, "--models", "unet"],
    }.get(entry)
    with OutputLock(folder):
        before = snapshot(folder)
        if entry == "ship_model":
            with pytest.raises(SystemExit) as stopped:
                _ship(assets, tmp_path, folder)
            message = str(stopped.value.code)
        else:
            assert cli_main(list(map(str, argv))) == 1
            message = one_error_line(capsys.readouterr().err)
        assert str(folder) in message and f"pid {os.getpid()}" in message
        assert snapshot(folder) == before
    if entry in ("train", "ablate", "compare"):
        assert not any(p.is_dir() and p.name.startswith("tiny-") for p in (tmp_path / "runs").iterdir())


# ----------------------------------------------------------------------------- one --overwrite rule


@pytest.mark.slow
def test_export_refuses_an_existing_bundle_unless_overwrite(assets, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    args = ["export", str(assets["checkpoint"]), "--out", str(bundle), "--verify-batches", "--tensorrt", "skip"]
    bundle.mkdir()
    for name in ("deploy.json", "model.onnx", "model.int8.onnx"):  # an earlier (older) export, of another model
        (bundle / name).write_text(f"the earlier {name}")
    before = snapshot(bundle)
    assert cli_main(args) == 1
    one_error_line(capsys.readouterr().err, bundle, "--overwrite")
    assert snapshot(bundle) == before
    assert cli_main([*args, "--overwrite"]) == 0
    assert not (bundle / "model.int8.onnx").exists() and not (bundle / "deploy.json").exists()  # replaced, not merged
    assert json.loads((bundle / "inference.json").read_text())["image_size"] == [SIZE, SIZE]
    assert not (bundle / LOCK_NAME).exists()


def test_evaluate_refuses_an_existing_evaluation_unless_overwrite(assets, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(assets["checkpoint"]), "--out", str(out), "--split", "test",
            "--text-regime", "none", "--no-hd95", "--overlays", "0"]
    assert cli_main(args) == 0
    (out / "val-oracle").mkdir()
    (out / "val-oracle" / "metrics.json").write_text("{}")  # of an earlier evaluation with other regimes
    before = snapshot(out)
    assert cli_main(args) == 1
    one_error_line(capsys.readouterr().err, out, "--overwrite")
    assert snapshot(out) == before
    assert cli_main([*args, "--overwrite"]) == 0
    assert not (out / "val-oracle" / "metrics.json").exists()  # replaced, not merged
    assert set(json.loads((out / "summary.json").read_text())) == {"test/none"}
    assert not (out / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- a full disk names the path


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_names_the_file_and_keeps_the_previous(assets, tmp_path, monkeypatch,
                                                                                capsys):
    config, run_dir = training_config(assets, tmp_path)
    real_save_file = ckpt.save_file

    def full_disk_at_step_2(tensors, filename, *args, **kwargs):
        if ".tmp-step-00000002" in str(filename):
            raise ENOSPC
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_disk_at_step_2)
    assert cli_main(["train", "--config", str(config)]) == 1
    written = run_dir / "checkpoints" / ".tmp-step-00000002" / "optimizer.safetensors"
    one_error_line(capsys.readouterr().err, written, "No space left on device")
    latest = ckpt.CheckpointManager(run_dir / "checkpoints").latest()
    assert latest.name == "step-00000001" and ckpt.verify_checkpoint(latest) is None
    ckpt.load_state(latest, "optimizer")
    monkeypatch.setattr(ckpt, "save_file", real_save_file)
    # The failed run let go of its directory: the same command resumes it and finishes.
    assert cli_main(["train", "--config", str(config)]) == 0
    assert ckpt.CheckpointManager(run_dir / "checkpoints").latest().name == "step-00000004"


@pytest.mark.parametrize("entry", ["predict", "export", "evaluate"])
def test_a_full_disk_names_the_result_being_written(assets, tmp_path, monkeypatch, capsys, entry):
    from safetensors import SafetensorError

    from cmgnet.text import TextFeatureCache
    from cmgnet.train import evaluate

    out = tmp_path / "out"

    def full(*args, **kwargs):
        raise ENOSPC

    def full_rust_writer(*args, **kwargs):  # safetensors says it in its message only
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    if entry == "predict":
        monkeypatch.setattr(Image.Image, "save", full)
        argv = ["predict", assets["checkpoint"], assets["images"], "--out", out, "--no-progress"]
        named = out / "masks" / f"{sorted(assets['images'].glob('*.jpg'))[0].stem}.png"
    elif entry == "export":
        monkeypatch.setattr(TextFeatureCache, "save", full_rust_writer)
        argv = ["export", assets["checkpoint"], "--out", out, "--verify-batches", "--tensorrt", "skip"]
        named = out
    else:
        monkeypatch.setattr(evaluate, "write_result", full)
        argv = ["evaluate", "--checkpoint", assets["checkpoint"], "--out", out, "--split", "test",
                "--text-regime", "none", "--no-hd95", "--overlays", "0"]
        named = out / "test-none"
    assert cli_main(list(map(str, argv))) == 1
    line = one_error_line(capsys.readouterr().err, "No space left on device")
    assert line.startswith(f"error: {named}: cannot write"), line


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_the_safetensors_writer_failing_for_real_names_the_file(tmp_path):
    """A file-size limit makes the real writers fail (EFBIG) the way a full disk does."""
    script = textwrap.dedent("""
        import resource, signal, sys, torch
        from pathlib import Path
        from cmgnet.outputs import WriteFailedError
        from cmgnet.outputs import atomic_write_text
        from cmgnet.train.checkpoint import save_state
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        for write in (lambda: save_state({"w": torch.zeros(10000)}, Path(sys.argv[1]), "optimizer"),
                      lambda: atomic_write_text(Path(sys.argv[1]) / "latest", "x" * 10000)):
            try:
                write()
            except WriteFailedError as err:
                print(err)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{tmp_path / 'optimizer.safetensors'}: cannot write (File too large)",
                                        f"{tmp_path / 'latest'}: cannot write (File too large)"]


def test_writing_leaves_other_errors_alone(tmp_path):
    with pytest.raises(FileNotFoundError):  # an input that is missing is no write failure
        with writing(tmp_path / "out"):
            open(tmp_path / "missing.csv").close()
    with pytest.raises(OSError, match="simulated"):
        with writing(tmp_path / "out"):
            raise OSError("simulated")
    with pytest.raises(WriteFailedError, match="Read-only file system"):
        with writing(tmp_path / "out", "the bundle"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
