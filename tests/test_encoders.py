"""Pluggable encoders: features per stride, ImageNet weights, and CMG-Net/U-Net on top of them."""

from __future__ import annotations

import pytest
import torch

from cmgnet.model import CMGNet, SegmentationModel, UNet, UNetConfig, convert_config, create_model
from cmgnet.model.encoders import EfficientNetLiteEncoder, create_encoder, encoder_normalization, list_encoders
from cmgnet.model.tta import flip_tta

LITE = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
# channels of the last block at strides 2/4/8/16/32 (the EfficientNet-Lite width multipliers)
LITE_CHANNELS = {
    "efficientnet-lite0": (16, 24, 40, 112, 320),
    "efficientnet-lite1": (16, 24, 40, 112, 320),
    "efficientnet-lite2": (16, 24, 48, 120, 352),
}
ABLATIONS = {"full": {}, "no_masa": {"masa": False}, "no_text": {"text": False}, "no_cmfm": {"cmfm": False},
             "no_alpha": {"alpha": False}}


def lite_config(**overrides):
    from tests.conftest import tiny_config

    values = {"encoder": "efficientnet-lite0", "encoder_weights": "none", "fusion_scales": (32, 16, 8),
              "fusion_layers": (1, 1, 1)}
    return tiny_config(**(values | overrides))


def test_registry_lists_every_encoder():
    assert set(list_encoders()) == {"unet", *LITE}


@pytest.mark.parametrize("name", LITE)
def test_lite_features_at_every_stride(name):
    enc = create_encoder(name).eval()
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        feats = enc(x)
    assert enc.strides == (2, 4, 8, 16, 32)
    assert tuple(f.shape[1] for f in feats) == LITE_CHANNELS[name] == enc.out_channels
    assert [tuple(f.shape[-2:]) for f in feats] == [(96 // s, 160 // s) for s in enc.strides]


def test_unet_encoder_features_at_every_stride():
    enc = create_encoder("unet", widths=(8, 16, 32, 64, 128))
    feats = enc(torch.randn(2, 3, 32, 48))
    assert [f.shape[1:] for f in feats] == [(c, 32 // s, 48 // s) for c, s in zip((8, 16, 32, 64, 128), enc.strides)]
    with pytest.raises(ValueError, match="from scratch"):
        create_encoder("unet", weights="imagenet")


def test_fixed_same_padding_is_exact_at_other_sizes():
    # The package precomputes TF "SAME" pads for 224 px; at multiples of 32 they must equal
    # the pads computed for the actual size.
    from efficientnet_lite_pytorch import EfficientNet

    enc = create_encoder("efficientnet-lite0").eval()
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=256)
    ref.load_state_dict(_lite_state(enc, ref))
    ref.eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        got = enc(x)[-1]
        want = ref._swish(ref._bn0(ref._conv_stem(x)))
        for block in ref._blocks:
            want = block(want)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_folded_padding_gives_the_package_outputs_and_gradients(layout):
    # Stride-1 convs carry their SAME padding themselves (no ZeroPad2d copy): training-mode
    # outputs and every gradient must match the package's network at fp32 tolerance.
    from efficientnet_lite_pytorch import EfficientNet

    enc = create_encoder("efficientnet-lite0", drop_path_rate=0.0).train().to(memory_format=layout)
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=224)
    ref.load_state_dict(_lite_state(enc, ref))
    ref = ref.train().to(memory_format=layout)
    padded = [m for m in enc.modules() if isinstance(getattr(m, "static_padding", None), torch.nn.ZeroPad2d)]
    assert len(padded) == 5 and all(tuple(m.stride) == (2, 2) for m in padded)  # stem + the 4 stride-2 depthwise
    x = torch.randn(2, 3, 64, 96).contiguous(memory_format=layout)
    x_ref = x.clone().requires_grad_()
    x = x.requires_grad_()
    got = enc(x)[-1]
    want = ref._swish(ref._bn0(ref._conv_stem(x_ref)))
    for block in ref._blocks:
        want = block(want)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(got)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    ref_params = dict(ref.named_parameters())
    for name, param in enc.named_parameters():
        key = name.replace("stem.0.", "_conv_stem.").replace("stem.1.", "_bn0.").replace("blocks.", "_blocks.", 1)
        torch.testing.assert_close(param.grad, ref_params[key].grad, msg=name)


def _lite_state(enc, ref):
    """The encoder's weights under the package's own key names (head keys from ``ref``)."""
    state = dict(ref.state_dict())
    for k, v in enc.state_dict().items():
        key = k.replace("stem.0.", "_conv_stem.").replace("stem.1.", "_bn0.").replace("blocks.", "_blocks.", 1)
        assert key in state, key
        state[key] = v
    return state


@pytest.mark.parametrize("name", LITE)
def test_imagenet_weights_load_with_weights_only_and_change_the_output(name, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    torch.manual_seed(0)
    pretrained = create_encoder(name, weights="imagenet").eval()
    torch.manual_seed(0)
    scratch = create_encoder(name, weights="none").eval()
    assert calls == [True]
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(pretrained(x)[-1], scratch(x)[-1])
    # ImageNet BatchNorm statistics are not the fresh-init ones
    assert not torch.allclose(pretrained.stem[1].running_var, torch.ones_like(pretrained.stem[1].running_var))


def test_encoder_normalization_comes_from_the_encoder():
    assert encoder_normalization("efficientnet-lite0") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert encoder_normalization("unet") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert EfficientNetLiteEncoder.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_ablation_with_a_pretrained_encoder(name):
    net = CMGNet(lite_config(**ABLATIONS[name])).train()
    net.encoder.drop_path_rate = 0.0  # drop-connect can drop a whole block for both images of a draw
    out = net(torch.randn(2, 3, 64, 96), text=["Skin lesion.", "Symmetric lesion with regular borders."])
    assert out.shape == (2, 1, 64, 96)
    out.square().mean().backward()
    dead = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    assert not dead, f"{name}: no gradient for {dead}"
    assert (net.masa is not None) == ABLATIONS[name].get("masa", True)
    assert bool(net.fusion) == ABLATIONS[name].get("text", True)


def test_cmfm_sits_at_the_configured_scales_of_any_encoder():
    net = CMGNet(lite_config())
    assert sorted(net.fusion) == ["16", "32", "8"]
    assert hasattr(net.fusion["32"].layers[0], "image_self") and not hasattr(net.fusion["8"].layers[0], "image_self")
    with pytest.raises(ValueError, match="not among the network's scales"):
        lite_config(fusion_scales=(64,), fusion_layers=(1,))


def test_plain_unet_baseline_on_the_same_encoder():
    full = lite_config()
    unet_cfg = convert_config(full, "unet")
    assert isinstance(unet_cfg, UNetConfig) and unet_cfg.encoder == "efficientnet-lite0"
    unet = create_model("unet", **vars(unet_cfg))
    assert isinstance(unet, UNet) and not isinstance(unet, CMGNet)
    cmg = CMGNet(full)
    # same image branch: encoder + decoder + head parameters match one to one
    image_branch = {k: v.shape for k, v in cmg.state_dict().items() if k.startswith(("encoder.", "decoder.", "head."))}
    assert image_branch == {k: v.shape for k, v in unet.state_dict().items()}
    assert unet(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


@pytest.mark.parametrize("arch", ["cmgnet", "unet"])
def test_round_trip_with_a_pretrained_encoder(arch, tmp_path):
    cfg = lite_config() if arch == "cmgnet" else convert_config(lite_config(), "unet")
    net = create_model(arch, **vars(cfg)).eval()
    net.save_pretrained(tmp_path)
    back = SegmentationModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back(x, text=["Skin lesion."] * 2), net(x, text=["Skin lesion."] * 2))


def test_freeze_encoder_bn_keeps_statistics_through_train():
    net = CMGNet(lite_config(freeze_encoder_bn=True)).train()
    bn = net.encoder.stem[1]
    before = bn.running_mean.clone()
    net(torch.randn(2, 3, 64, 64) * 3, text=["Skin lesion."] * 2)
    assert not bn.training and not bn.weight.requires_grad
    torch.testing.assert_close(bn.running_mean, before)
    assert any(m.training for m in net.decoder.modules())


def test_encoder_lr_multiplier_groups():
    from cmgnet.train.optim import build_optimizer
    from cmgnet.train.config import OptimConfig

    net = CMGNet(lite_config())
    opt = build_optimizer(net, OptimConfig(lr=1e-3, encoder_lr_mult=0.1))
    enc = {id(p) for p in net.encoder.parameters()}
    for group in opt.param_groups:
        in_enc = {id(p) in enc for p in group["params"]}
        assert len(in_enc) == 1
        assert group["lr"] == pytest.approx(1e-4 if in_enc.pop() else 1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for p in net.parameters() if p.requires_grad)


def test_experiment_config_types_model_by_arch_and_takes_encoder_normalization():
    from cmgnet.train.config import load_config

    cfg = load_config(None, ["arch=unet", "model.encoder=efficientnet-lite0", "model.encoder_weights=imagenet"])
    assert isinstance(cfg.model, UNetConfig) and not hasattr(cfg.model, "masa")
    assert cfg.data.mean == (0.5, 0.5, 0.5) and cfg.data.std == (0.5, 0.5, 0.5)
    explicit = load_config(None, ["model.encoder=efficientnet-lite0", "data.mean=[0.4,0.4,0.4]", "data.std=[0.2,0.2,0.2]"])
    assert explicit.data.mean == (0.4, 0.4, 0.4)
    with pytest.raises(KeyError, match="masa"):
        load_config(None, ["arch=unet", "model.masa=false"])
    with pytest.raises(KeyError, match="arch"):
        load_config(None, ["arch=nope"])


def test_flip_tta_is_equivariant_and_exact_for_a_flip_invariant_net():
    net = UNet(UNetConfig(base_width=4, depth=2)).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        out = flip_tta(net, x)
        torch.testing.assert_close(flip_tta(net, x.flip(-1)), out.flip(-1), atol=1e-5, rtol=1e-4)
        # with identity only it is the plain forward (logit of sigmoid)
        torch.testing.assert_close(flip_tta(net, x, flips=((),)), net(x), atol=1e-4, rtol=1e-4)
