"""CMG-Net model: shapes, gradients, ablations, text handling, serialisation."""

from __future__ import annotations

import pytest
import torch

from cmgnet.model import CMGNet, SegmentationModel
from cmgnet.text import NEUTRAL_SENTENCE
from cmgnet.train.ablate import VARIANTS

SENTENCES = [
    "Asymmetric lesion with irregular borders and multiple colors.",
    "Symmetric lesion with regular borders.",
    NEUTRAL_SENTENCE,
]
# Paper table 3's rows as CMG-Net switches, from the one table the ablation runner uses
# ("unet" as CMG-Net with every switch off: the same network the U-Net row trains).
ABLATIONS = {key: {k: v for k, v in switches.items() if k != "arch"} for key, (_, switches) in VARIANTS.items()}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_output_shape(make_tiny_config, batch, size):
    net = CMGNet(make_tiny_config()).eval()
    with torch.no_grad():
        out = net(torch.randn(batch, 3, *size), text=SENTENCES[:batch])
    assert out.shape == (batch, 1, *size)
    assert torch.isfinite(out).all()


def test_rejects_sides_not_multiple_of_stride(make_tiny_config):
    with pytest.raises(ValueError, match="multiples of 16"):
        CMGNet(make_tiny_config())(torch.randn(1, 3, 40, 64))


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_gradients_reach_every_trainable_parameter(make_tiny_config, name):
    net = CMGNet(make_tiny_config(**ABLATIONS[name])).train()
    net(torch.randn(2, 3, 32, 48), text=SENTENCES[:2]).square().mean().backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert trainable
    dead = [n for n, p in trainable if p.grad is None or not torch.any(p.grad != 0)]
    assert not dead, f"{name}: no gradient for {dead}"


def test_frozen_text_encoder_gets_no_gradient(make_tiny_config):
    net = CMGNet(make_tiny_config()).train()
    net(torch.randn(2, 3, 32, 32), text=SENTENCES[:2]).mean().backward()
    backbone = list(net.text_branch.encoder.backbone.parameters())
    assert all(not p.requires_grad and p.grad is None for p in backbone)
    assert not net.text_branch.encoder.backbone.training  # frozen encoder stays in eval mode


def test_unfrozen_text_encoder_trains(make_tiny_config):
    net = CMGNet(make_tiny_config(freeze_text=False)).train()
    net(torch.randn(2, 3, 32, 32), text=SENTENCES[:2]).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.text_branch.encoder.backbone.parameters())


def test_ablation_flags_remove_exactly_their_module(make_tiny_config):
    def modules(**flags):
        return {n.split(".")[0] + "." + n.split(".")[1] if n.startswith("fusion") else n.split(".")[0]
                for n, _ in CMGNet(make_tiny_config(**flags)).named_parameters()}

    def types(**flags):
        return {type(m).__name__ for m in CMGNet(make_tiny_config(**flags)).modules()}

    full = modules()
    assert full - modules(masa=False) == {"masa"}
    assert full - modules(text=False) == {"text_branch", "fusion.16", "fusion.8", "fusion.4"}
    assert "CrossModalFusion" in types() and "CrossModalFusion" not in types(cmfm=False)
    assert "TextAdditionFusion" in types(cmfm=False)
    full_names = {n for n, _ in CMGNet(make_tiny_config()).named_parameters()}
    removed = full_names - {n for n, _ in CMGNet(make_tiny_config(alpha=False)).named_parameters()}
    gate = {n for n in full_names if ".gate." in n and n.startswith("fusion")}
    assert gate and gate <= removed
    # Besides the gate, only a last layer's text -> image attention goes: it fed nothing but the gate.
    assert all(".text_to_image." in n for n in removed - gate)
    assert modules(masa=False, text=False, cmfm=False, alpha=False) == {"encoder", "decoder", "head"}


def test_no_text_uses_neutral_sentence(make_tiny_config):
    net = CMGNet(make_tiny_config()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), net(x, text=[NEUTRAL_SENTENCE] * 2))


def test_precomputed_features_equal_sentences(make_tiny_config):
    net = CMGNet(make_tiny_config()).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats, mask = net.text_branch.encoder.encode_live(SENTENCES)
        torch.testing.assert_close(net(x, feats, mask), net(x, text=SENTENCES), atol=1e-5, rtol=1e-5)


def test_padding_is_masked(make_tiny_config):
    net = CMGNet(make_tiny_config()).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats, mask = net.text_branch.encoder(SENTENCES)
        assert not mask.all(), "fixture must contain padding"
        noisy = feats.clone()
        noisy[~mask] = torch.randn_like(noisy[~mask]) * 100
        longer = torch.cat([feats, torch.randn(3, 5, feats.shape[-1])], dim=1)
        longer_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
        ref = net(x, feats, mask)
        torch.testing.assert_close(net(x, noisy, mask), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(net(x, longer, longer_mask), ref, atol=1e-5, rtol=1e-5)


def test_text_cache_equals_live_and_skips_backbone(make_tiny_config, tmp_path):
    net = CMGNet(make_tiny_config(text_cache_dir=str(tmp_path))).train()
    encoder = net.text_branch.encoder
    live, live_mask = encoder.encode_live(SENTENCES)
    cached, cached_mask = encoder(SENTENCES)
    assert torch.equal(live_mask, cached_mask)
    torch.testing.assert_close(cached[cached_mask], live[live_mask], atol=1e-5, rtol=1e-5)

    calls = encoder.backbone_calls
    for _ in range(3):  # a warm training loop never runs BERT
        net(torch.randn(3, 3, 32, 32), text=SENTENCES[::-1]).mean().backward()
    assert encoder.backbone_calls == calls

    encoder.cache.save()
    reloaded = CMGNet(make_tiny_config(text_cache_dir=str(tmp_path))).text_branch.encoder
    feats, mask = reloaded(SENTENCES)
    assert reloaded.backbone_calls == 0  # served from disk
    torch.testing.assert_close(feats[mask], live[live_mask], atol=1e-5, rtol=1e-5)


def test_modality_dropout_replaces_sentences(make_tiny_config):
    net = CMGNet(make_tiny_config(modality_dropout=1.0))
    x = torch.randn(2, 3, 32, 32)
    net.train()
    torch.manual_seed(1)
    dropped = net(x, text=SENTENCES[:2])
    torch.manual_seed(1)
    neutral = net(x, text=[NEUTRAL_SENTENCE] * 2)
    torch.testing.assert_close(dropped, neutral)
    net.eval()  # never at inference
    with torch.no_grad():
        assert not torch.allclose(net(x, text=SENTENCES[:2]), net(x, text=[NEUTRAL_SENTENCE] * 2))


def test_eval_is_deterministic(make_tiny_config):
    net = CMGNet(make_tiny_config()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x, text=SENTENCES[:2]), net(x, text=SENTENCES[:2]))


# The contract every registered model meets (forward, backward, save/load, ONNX): tests/test_models_shared.py


def test_frozen_encoder_not_saved(make_tiny_config, tmp_path):
    from safetensors.torch import load_file

    CMGNet(make_tiny_config()).save_pretrained(tmp_path)
    assert not any(k.startswith("text_branch.encoder.") for k in load_file(tmp_path / "model.safetensors"))
    CMGNet(make_tiny_config(freeze_text=False)).save_pretrained(tmp_path / "ft")
    assert any(k.startswith("text_branch.encoder.") for k in load_file(tmp_path / "ft" / "model.safetensors"))


def test_load_rejects_mismatched_weights(make_tiny_config, tmp_path):
    CMGNet(make_tiny_config(masa=False)).save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["config"]["masa"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        SegmentationModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a saved cmgnet model"):
        SegmentationModel.from_pretrained(tmp_path / "missing")
