"""The one contract every registered model meets: shapes, gradients, text handling, save/load, ONNX.

Each registered model has a tiny config here; registering a model without one fails
:func:`test_every_registered_model_has_a_tiny_config`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from cmgnet.model import SegmentationModel, create_model, list_models

TEXT = dict(text_model="tiny-random-bert", text_max_length=24, fusion_dim=16, fusion_heads=2)
TINY_MODELS: dict[str, dict] = {
    "cmgnet": dict(TINY),
    "unet": dict(base_width=8, depth=4),
    "unetplusplus": dict(base_width=4),
    "transunet": dict(base_width=4, vit_dim=16, vit_layers=2, vit_heads=2, pos_grid=2),
    "swinunet": dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4),
    "guidedecoder": dict(base_width=4, **TEXT),
    "lvit": dict(base_width=4, pos_grid=2, **TEXT),
}
SENTENCES = ["Asymmetric lesion with irregular borders and multiple colors.", "Symmetric lesion with regular borders."]
SIZE = (64, 32)  # non-square, a multiple of every stride (SwinUNETR: 32)


def tiny(name: str) -> SegmentationModel:
    torch.manual_seed(0)
    return create_model(name, **TINY_MODELS[name])


def has_text(net: SegmentationModel) -> bool:
    return getattr(net, "text_branch", None) is not None


def test_every_registered_model_has_a_tiny_config():
    assert set(list_models()) <= set(TINY_MODELS), f"add a tiny config for {set(list_models()) - set(TINY_MODELS)}"
    assert {"unetplusplus", "transunet", "swinunet", "guidedecoder", "lvit"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_shapes_gradients_and_stride(name):
    net = tiny(name).train()
    out = net(torch.randn(2, 3, *SIZE), text=SENTENCES)
    assert out.shape == (2, 1, *SIZE) and torch.isfinite(out).all()
    out.square().mean().backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    dead = [n for n, p in trainable if p.grad is None or not torch.any(p.grad != 0)]
    assert trainable and not dead, f"{name}: no gradient for {dead[:5]}"
    with pytest.raises(ValueError, match="multiples of"):
        net(torch.randn(1, 3, SIZE[0] + 8, SIZE[1]))


@pytest.mark.parametrize("name", list_models())
def test_text_is_used_exactly_by_text_models(name):
    net = tiny(name).eval()
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        guided, neutral = net(x, text=SENTENCES), net(x)
        if has_text(net):
            assert not torch.allclose(guided, neutral), f"{name}: the sentence changes nothing"
            features, mask = net.text_branch.encoder.encode_live(SENTENCES)  # the exported engine's form
            torch.testing.assert_close(net(x, features, mask), guided, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(guided, neutral), f"{name}: an image-only model must ignore text"


@pytest.mark.parametrize("name", list_models())
def test_save_load_round_trip(name, tmp_path):
    net = tiny(name).train()
    for _ in range(2):  # move BN running stats away from their init
        net(torch.randn(2, 3, *SIZE), text=SENTENCES)
    net.eval()
    net.save_pretrained(tmp_path / name)
    assert {p.name for p in (tmp_path / name).iterdir()} == {"config.json", "model.safetensors"}
    loaded = SegmentationModel.from_pretrained(tmp_path / name).eval()
    assert type(loaded) is type(net) and loaded.config == net.config
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(net(x, text=SENTENCES), loaded(x, text=SENTENCES))


@pytest.mark.parametrize("name", list_models())
def test_onnx_export_matches_pytorch(name, tmp_path):
    """The deploy exporter's path: ONNX checker, then ONNX Runtime vs PyTorch at batches 1 and 2."""
    pytest.importorskip("onnxruntime")
    from cmgnet.deploy.export import export_onnx, verify_onnx
    from cmgnet.inference import record_for_model

    net = tiny(name).eval()
    spec = record_for_model(net, image_size=SIZE)
    assert spec.input_names == (("image", "text_features", "text_mask") if has_text(net) else ("image",))
    path = export_onnx(net, spec, tmp_path / "model.onnx", dynamic_size=False)  # dynamic batch; fixed size is faster
    parity = verify_onnx(path, net, spec, batch_sizes=(1, 2))
    assert all(p.ok for p in parity)


@pytest.mark.parametrize("name", list_models())
def test_batchnorm_folding_keeps_eval_outputs(name):
    # Eager CPU inference folds eval-mode BatchNorm into convs (cmgnet.model.fold).
    import copy

    from cmgnet.model.fold import fold_batchnorm

    net = tiny(name)
    with torch.no_grad():  # non-trivial running statistics, as after training
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    net.eval()
    folded = copy.deepcopy(net)
    count = fold_batchnorm(folded)
    assert count <= sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    if name in ("cmgnet", "unet"):  # their DoubleConv stages fold (MONAI's blocks nest BN: left as is)
        assert count > 0
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(folded(x, text=SENTENCES), net(x, text=SENTENCES), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(net.train())


def test_batchnorm_folding_covers_every_efficientnet_lite_block():
    from cmgnet.model.fold import fold_batchnorm

    net = create_model("cmgnet", **{**TINY, "encoder": "efficientnet-lite0", "encoder_weights": "none"}).eval()
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.encoder.modules())
    assert fold_batchnorm(net.encoder) == bns  # the stem and every MBConv block's three
