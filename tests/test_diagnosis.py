"""The diagnosis classifier behind the ``predicted`` regime: balanced loss, report, round trip."""

from __future__ import annotations

import pytest
import torch

from cmgnet.train.diagnosis import DiagnosisClassifier, balanced_weights, diagnosis_report

CLASSES = ["melanoma", "nevus", "seborrheic_keratosis"]


def _fixture(n_per_class=(6, 36, 6), seed=0):
    """Imbalanced toy images whose mean colour tells the class (nevus the majority, as in ISIC)."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for k, n in enumerate(n_per_class):
        base = torch.zeros(3, 1, 1)
        base[k] = 1.5
        images.append(base + 0.6 * torch.randn(n, 3, 16, 16, generator=g))
        labels += [CLASSES[k]] * n
    return torch.cat(images), labels


def test_balanced_weights_are_inverse_frequency():
    w = balanced_weights(CLASSES, ["nevus"] * 8 + ["melanoma"] * 2 + [None, "unknown"])
    assert w[0] == pytest.approx(10 / (3 * 2)) and w[1] == pytest.approx(10 / (3 * 8))
    assert w[2] == pytest.approx(10 / 3)  # unseen class: counted once, not infinite


def test_report_against_the_majority_baseline():
    truth = {"a": "nevus", "b": "nevus", "c": "melanoma", "d": None}
    report = diagnosis_report({"a": "nevus", "b": "melanoma", "c": "melanoma", "d": "nevus"}, truth, "nevus")
    assert report["n"] == 3 and report["accuracy"] == pytest.approx(2 / 3)
    assert report["recall"] == {"melanoma": 1.0, "nevus": 0.5}
    assert report["balanced_accuracy"] == pytest.approx(0.75)
    assert report["majority_accuracy"] == pytest.approx(2 / 3)
    assert diagnosis_report({}, {"a": None}) == {}


def test_balanced_classifier_beats_the_majority_baseline():
    torch.manual_seed(0)
    images, labels = _fixture()
    weights = balanced_weights(CLASSES, labels)
    net = DiagnosisClassifier(CLASSES, width=4, input_mean=(0, 0, 0), input_std=(1, 1, 1), class_weights=weights)
    target = net.targets(labels, torch.device("cpu"))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(60):
        net.train()
        loss = net.loss(net(images), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_images, test_labels = _fixture((10, 10, 10), seed=1)
    net.eval()
    with torch.no_grad():
        pred = [CLASSES[int(k)] for k in net(test_images).argmax(1)]
    ids = [str(i) for i in range(len(pred))]
    report = diagnosis_report(dict(zip(ids, pred)), dict(zip(ids, test_labels)), "nevus")
    assert report["majority_accuracy"] == pytest.approx(1 / 3)
    assert report["balanced_accuracy"] > 0.8 > report["majority_accuracy"]
    assert min(report["recall"].values()) > 0.5  # no class collapsed


def test_pretrained_backbone_round_trip(tmp_path):
    net = DiagnosisClassifier(CLASSES, encoder="efficientnet-lite0", encoder_weights="imagenet", image_size=64,
                              class_weights=[1.0, 0.5, 2.0]).eval()
    net.save(tmp_path)
    back = DiagnosisClassifier.load(tmp_path).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(back(x), net(x))
    assert back.options["encoder_weights"] == "imagenet" and back.class_weight.tolist() == [1.0, 0.5, 2.0]
