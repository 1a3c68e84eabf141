"""Eager CPU inference: BatchNorm folded, channels-last, micro-batches; same logits, caller's model untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from cmgnet.deploy.runners import TorchRunner
from cmgnet.model import CMGNet, create_model


def _with_statistics(net):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("batch", [1, 5])
def test_cpu_runner_gives_the_model_logits_in_micro_batches(batch):
    torch.manual_seed(0)
    net = _with_statistics(CMGNet(tiny_config()))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    runner = TorchRunner(net, "cpu", cpu_micro_batch=2)
    assert runner.micro_batch == 2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in runner.model.encoder.modules())
    image = torch.randn(batch, 3, 64, 64)
    features, mask = net.text_branch.encoder(["Asymmetric lesion."] * batch)
    got = runner(image, features, mask)
    with torch.inference_mode():
        want = net(image, features, mask)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the caller's model is not folded or moved to channels-last
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_image_only_network_runs_without_text():
    net = _with_statistics(create_model("unet", base_width=8, depth=4))
    runner = TorchRunner(net, "cpu", cpu_micro_batch=3)
    image = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        want = net(image)
    torch.testing.assert_close(runner(image, None, None), want, rtol=1e-4, atol=1e-4)
