"""The weight average (train.ema_decay): its arithmetic, that validation and best/ use it, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cmgnet.model import create_model
from cmgnet.model.base import WEIGHTS_NAME
from cmgnet.train import Trainer, load_config
from cmgnet.train import checkpoint as ckpt
from cmgnet.train.engine import EMA_STATE
from cmgnet.train.ema import WeightEMA
from cmgnet.train.testing import TINY_MODEL, synthetic_dataset, tiny_experiment


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory.getbasetemp() / "synthetic")


def _model():
    torch.manual_seed(0)
    return create_model("cmgnet", **TINY_MODEL).to(memory_format=torch.channels_last)


def test_average_follows_the_warmed_up_decay_and_skips_the_frozen_text_encoder():
    model = _model()
    ema = WeightEMA(model, decay=0.9)
    assert not any(k.startswith("text_branch.encoder.") for k in ema.shadow)  # not saved, not averaged
    name, param = next((k, p) for k, p in model.named_parameters() if p.dim() == 4)
    start = param.detach().clone()
    expected = start.clone()
    for step in range(1, 4):
        with torch.no_grad():
            param.add_(1.0)
        ema.update()
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * param.detach()
    torch.testing.assert_close(ema.shadow[name], expected)
    counters = [k for k in ema.shadow if k.endswith("num_batches_tracked")]
    assert counters and all(ema.shadow[k].dtype == torch.long for k in counters)


def test_applied_swaps_in_the_average_and_restores_the_live_weights():
    model = _model()
    ema = WeightEMA(model, decay=0.5)
    name, param = next((k, p) for k, p in model.named_parameters() if p.dim() == 4)
    with torch.no_grad():
        param.mul_(3.0)
    live = param.detach().clone()
    with ema.applied():
        torch.testing.assert_close(param.detach(), ema.shadow[name])
        assert not torch.equal(param.detach(), live)
    assert torch.equal(param.detach(), live)
    assert param.is_contiguous(memory_format=torch.channels_last)  # the layout survives the swap


def test_state_round_trip_and_mismatch():
    ema = WeightEMA(_model(), decay=0.99)
    ema.update()
    other = WeightEMA(_model(), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and all(torch.equal(other.shadow[k], v) for k, v in ema.shadow.items())
    state = ema.state_dict()
    state["weights"] = dict(list(state["weights"].items())[1:])
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(state)


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_decay_out_of_range_is_a_config_error(decay):
    with pytest.raises(ValueError, match="ema_decay"):
        load_config(None, [f"train.ema_decay={decay}"])


def test_run_validates_keeps_and_resumes_the_average(data_root, tmp_path):
    common = ["train.ema_decay=0.8", "train.checkpoint_every_steps=1", "train.deterministic=true", "eval.splits=[]"]
    # One epoch, one validation: best/ must hold the average at its end, not the raw weights.
    one = Trainer(tiny_experiment(data_root, tmp_path / "b", "train.epochs=1", *common)).fit()
    last = ckpt.CheckpointManager(one.run_dir / "checkpoints").latest()
    raw = load_file(str(last / "model" / WEIGHTS_NAME))
    averaged = ckpt.load_state(last, EMA_STATE)
    best = load_file(str(one.best_dir / WEIGHTS_NAME))
    assert averaged["updates"] == one.state.global_step
    assert all(torch.equal(best[k], averaged["weights"][k].contiguous()) for k in best)
    assert any(not torch.equal(best[k], raw[k]) for k in best if best[k].is_floating_point())
    assert json.loads((one.best_dir / "metrics.json").read_text())["weights"] == "ema"

    # Resumed for a second epoch: the same average as an uninterrupted two-epoch run.
    full = Trainer(tiny_experiment(data_root, tmp_path / "a", "train.epochs=2", *common))
    full.fit()
    torch.manual_seed(1234)
    resumed = Trainer(tiny_experiment(data_root, tmp_path / "b", "train.epochs=2", *common))
    resumed.fit()
    assert resumed.ema.updates == full.ema.updates == 2 * one.state.global_step
    for k, v in full.ema.shadow.items():
        torch.testing.assert_close(resumed.ema.shadow[k], v)


def test_resuming_a_run_without_an_average_starts_one_from_its_weights(data_root, tmp_path, caplog):
    common = ["train.deterministic=true", "eval.splits=[]"]
    first = Trainer(tiny_experiment(data_root, tmp_path, "train.epochs=1", *common)).fit()
    resumed = Trainer(tiny_experiment(data_root, tmp_path, "train.epochs=2", "train.ema_decay=0.9", *common))
    with caplog.at_level("INFO", logger="cmgnet.train"):
        resumed.fit()
    assert "holds no weight average" in caplog.text
    assert resumed.ema.updates == resumed.state.global_step - first.state.global_step
