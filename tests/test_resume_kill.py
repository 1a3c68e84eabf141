"""Exact resume after a real ``kill -9``: a training process is killed at real points and resumed
until it finishes; its final checkpoint must equal an uninterrupted run's, tensor for tensor
(weights, weight average, optimiser, RNG states).

The kill points are the ones where resume used to drift with a data-loader worker (the recipes
use one): right after the first checkpoint, in the middle of the checkpoint write after an
epoch boundary, and in the middle of a write mid-epoch after a validation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmgnet.train import checkpoint as ckpt
from cmgnet.train.testing import synthetic_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# 2 optimiser steps per epoch (8 samples, batch 4). Modality dropout draws from the RNG every
# step, so any draw that a resumed process makes differently shows in the weights.
OVERRIDES = ("train.epochs=3", "train.checkpoint_every_steps=1", "data.num_workers=1", "model.modality_dropout=0.5",
             "train.ema_decay=0.9", "eval.splits=[]")
TRAIN = ("import sys\nfrom cmgnet.train.cli import setup_logging\nfrom cmgnet.train.engine import Trainer\n"
         "from cmgnet.train.testing import tiny_experiment\nsetup_logging()\n"
         "Trainer(tiny_experiment(sys.argv[1], sys.argv[2], *sys.argv[3:])).fit()\n")
DEADLINE_S = 240


def _start(data_root: Path, out: Path, log: Path) -> subprocess.Popen:
    # Its own session, so a failing test can kill the loader workers with it.
    with open(log, "ab") as sink:
        return subprocess.Popen([sys.executable, "-c", TRAIN, str(data_root), str(out), *OVERRIDES], cwd=REPO,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_when(proc: subprocess.Popen, path: Path, log: Path) -> None:
    """SIGKILL the training process as soon as ``path`` exists; its loader worker finds itself
    orphaned and exits on its own, possibly after the resumed process has started (as after a
    real ``kill -9``)."""
    end = time.monotonic() + DEADLINE_S
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{path.name} never appeared (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _finish(proc: subprocess.Popen, log: Path) -> None:
    try:
        code = proc.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert code == 0, log.read_text()[-3000:]


def _final_tensors(out: Path) -> dict[str, torch.Tensor]:
    last = ckpt.CheckpointManager(out / "tiny" / "checkpoints").latest()
    assert last is not None and last.name == "step-00000006"
    return {f"{path.relative_to(last)}:{key}": value for path in sorted(last.rglob("*.safetensors"))
            for key, value in load_file(str(path)).items()}


def test_sigkill_at_real_points_then_resume_equals_uninterrupted(tmp_path):
    data_root = synthetic_dataset(tmp_path / "data", n_train=8, n_val=2, n_test=1)
    full_out, killed_out = tmp_path / "full", tmp_path / "killed"
    full_log, killed_log = tmp_path / "full.log", tmp_path / "killed.log"
    full = _start(data_root, full_out, full_log)  # alongside the interrupted one, in its own run folder
    checkpoints = killed_out / "tiny" / "checkpoints"
    try:
        # The first checkpoint is complete (the pointer is written last).
        _kill_when(_start(data_root, killed_out, killed_log), checkpoints / ckpt.LATEST, killed_log)
        # Writing step 3's weights: resumes at the epoch boundary, from the checkpoint after validation.
        _kill_when(_start(data_root, killed_out, killed_log), checkpoints / ".tmp-step-00000003" / "model", killed_log)
        # Writing step 4's optimiser state: resumes mid-epoch, after a validation.
        _kill_when(_start(data_root, killed_out, killed_log), checkpoints / ".tmp-step-00000004" / "optimizer.json",
                   killed_log)
        _finish(_start(data_root, killed_out, killed_log), killed_log)
    except BaseException:
        if full.poll() is None:
            os.killpg(full.pid, signal.SIGKILL)
        raise
    _finish(full, full_log)
    assert killed_log.read_text().count("resumed from") == 3

    expected, resumed = _final_tensors(full_out), _final_tensors(killed_out)
    assert expected.keys() == resumed.keys()
    differ = sorted(k for k in expected if not torch.equal(expected[k], resumed[k]))
    weights = [float((expected[k] - resumed[k]).abs().max()) for k in differ if k.startswith("model/")]
    assert not differ, f"{len(differ)} tensors differ (weights by up to {max(weights, default=0):.3g}): {differ[:5]}"
