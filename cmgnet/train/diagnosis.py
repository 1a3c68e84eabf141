"""Diagnosis classifier behind the ``predicted`` text regime (docs/design.md section 2.2).

The ``oracle`` regime feeds the pathology label to the model; at inference time that label
does not exist. The ``predicted`` regime instead templates a diagnosis predicted from the
image by this classifier, trained by the engine beside the segmentation network on the same
augmented batches (its own optimiser; samples without a diagnosis are ignored). Its backbone
is a small CNN from scratch or an ImageNet-pretrained encoder of :mod:`cmgnet.model.encoders`;
the cross-entropy is class-balanced (inverse class frequency), because a plain one collapses to
the majority class (nevus) on ISIC. It is saved next to the best segmentation weights
(``best/diagnosis/``) as JSON + safetensors.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from cmgnet.inference import IMAGENET_MEAN, IMAGENET_STD
from cmgnet.integrity import load_safetensors
from cmgnet.integrity import SHA256_KEY, check_finite, file_sha256, recorded_sha256

CONFIG_NAME = "classifier.json"
WEIGHTS_NAME = "classifier.safetensors"
IGNORE = -100


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class DiagnosisClassifier(nn.Module):
    """Image -> diagnosis logits: a backbone, global average pool, linear head.

    Args:
        classes: diagnosis names (the :data:`cmgnet.text.pseudo_text.DIAGNOSES` seen in training).
        width: first-stage channels of the from-scratch backbone (doubling up to ``8 * width``).
        encoder: ``"scratch"`` (five stride-2 conv stages) or an encoder name
            (``efficientnet-lite0``, ...; its deepest map is pooled).
        encoder_weights: ``"imagenet"`` or ``"none"`` for a named encoder.
        image_size: side the (normalised) input is resized to first; 0 keeps the input size.
        input_mean, input_std: normalisation of the images it is given; a named encoder
            re-normalises them to its own statistics.
        class_weights: cross-entropy weight per class (empty: unweighted); see :func:`balanced_weights`.
    """

    def __init__(self, classes: Sequence[str], width: int = 16, encoder: str = "scratch",
                 encoder_weights: str = "none", image_size: int = 0,
                 input_mean: Sequence[float] = IMAGENET_MEAN, input_std: Sequence[float] = IMAGENET_STD,
                 class_weights: Sequence[float] = ()) -> None:
        super().__init__()
        if len(classes) < 2:
            raise ValueError(f"a diagnosis classifier needs at least 2 classes, got {list(classes)}")
        if class_weights and len(class_weights) != len(classes):
            raise ValueError(f"class_weights has {len(class_weights)} values for {len(classes)} classes")
        self.classes = list(classes)
        self.options = {"width": width, "encoder": encoder, "encoder_weights": encoder_weights,
                        "image_size": image_size, "input_mean": [float(v) for v in input_mean],
                        "input_std": [float(v) for v in input_std], "class_weights": [float(w) for w in class_weights]}
        if encoder == "scratch":
            widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
            self.features = nn.Sequential(*(_stage(cin, cout) for cin, cout in zip([3, *widths[:-1]], widths)))
            channels, mean, std = widths[-1], input_mean, input_std
        else:
            from cmgnet.model.encoders import create_encoder

            self.features = create_encoder(encoder, 3, encoder_weights)
            channels, mean, std = self.features.out_channels[-1], self.features.mean, self.features.std
        # x_enc = (x_in * s_in + m_in - m_enc) / s_enc, folded into one affine map.
        scale = torch.tensor(input_std) / torch.tensor(std)
        shift = (torch.tensor(input_mean) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("in_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", shift.view(1, 3, 1, 1), persistent=False)
        weights = torch.tensor(class_weights or [1.0] * len(self.classes))
        self.register_buffer("class_weight", weights, persistent=False)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(channels, len(self.classes)))

    def forward(self, image: Tensor) -> Tensor:
        """``B x 3 x H x W`` -> ``B x num_classes`` logits."""
        x = image * self.in_scale + self.in_shift
        size = self.options["image_size"]
        if size and tuple(x.shape[-2:]) != (size, size):
            x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        feats = self.features(x)
        if isinstance(feats, list):
            feats = feats[-1]
        return self.head(feats.mean((2, 3), keepdim=True))

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Class-weighted cross-entropy; samples with target ``IGNORE`` do not count."""
        return nn.functional.cross_entropy(logits, target, weight=self.class_weight.to(logits.dtype),
                                           ignore_index=IGNORE)

    def targets(self, diagnoses: Sequence[str | None], device: torch.device) -> Tensor:
        """Class indices of diagnoses (``IGNORE`` for unknown or unseen ones)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return torch.tensor([index.get(d, IGNORE) if d else IGNORE for d in diagnoses], device=device)

    def save(self, directory: str | Path) -> Path:
        """Write ``classifier.safetensors`` + ``classifier.json`` (recording the weights' SHA-256).

        Raises:
            CheckpointError: a weight is NaN or inf (nothing is written).
        """
        directory = Path(directory)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        check_finite(state, directory / WEIGHTS_NAME, "classifier weights (not saved)")
        directory.mkdir(parents=True, exist_ok=True)
        save_file(state, str(directory / WEIGHTS_NAME))
        config = {"classes": self.classes, **self.options, SHA256_KEY: file_sha256(directory / WEIGHTS_NAME)}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> DiagnosisClassifier:
        """Rebuild a classifier written by :meth:`save` (JSON + safetensors: no unpickling).

        Raises:
            CheckpointError: the weights differ from their recorded SHA-256 or hold NaN/inf.
        """
        directory = Path(directory)
        cfg = json.loads((directory / CONFIG_NAME).read_text())
        options = {k: v for k, v in cfg.items() if k not in ("classes", SHA256_KEY)}
        if options.get("encoder", "scratch") != "scratch":
            options["encoder_weights"] = "none"  # the saved weights replace the ImageNet ones
        model = cls(cfg["classes"], **options)
        record = directory / CONFIG_NAME
        model.load_state_dict(load_safetensors(directory / WEIGHTS_NAME, "classifier weights",
                                               recorded_sha256(record), record))
        model.options["encoder_weights"] = cfg.get("encoder_weights", "none")
        return model


def balanced_weights(classes: Sequence[str], diagnoses: Sequence[str | None]) -> list[float]:
    """Inverse-frequency class weights (mean 1 over the samples), for a balanced cross-entropy."""
    counts = Counter(d for d in diagnoses if d in classes)
    total = sum(counts.values())
    return [total / (len(classes) * max(counts[c], 1)) for c in classes]


def diagnosis_report(predicted: dict[str, str], truth: dict[str, str | None], majority: str | None = None) -> dict:
    """Accuracy, balanced accuracy and per-class recall of predictions against known diagnoses.

    Args:
        predicted: sample id -> predicted diagnosis.
        truth: sample id -> true diagnosis (``None``/``unknown`` are left out).
        majority: the training split's most frequent class: its accuracy is reported as the
            baseline a constant prediction reaches.

    Returns:
        ``{"n", "accuracy", "balanced_accuracy", "recall": {class: value}, "majority_class",
        "majority_accuracy"}`` (``{}`` when no sample has a known diagnosis).
    """
    known = [(predicted[k], d) for k, d in truth.items() if d and d != "unknown" and k in predicted]
    if not known:
        return {}
    recall = {}
    for c in sorted({d for _, d in known}):
        hits = [p == d for p, d in known if d == c]
        recall[c] = sum(hits) / len(hits)
    report = {"n": len(known), "accuracy": sum(p == d for p, d in known) / len(known),
              "balanced_accuracy": sum(recall.values()) / len(recall), "recall": recall}
    if majority is not None:
        report |= {"majority_class": majority, "majority_accuracy": sum(d == majority for _, d in known) / len(known)}
    return report


def classes_of(diagnoses: dict[str, str | None]) -> list[str]:
    """Diagnoses present in a split (sorted), ``unknown`` excluded."""
    return sorted({d for d in diagnoses.values() if d and d != "unknown"})


def vote(predictions: dict[str, str]) -> dict[str, str]:
    """Sample-key predictions -> one per image id (majority over ``@vNN`` variants)."""
    votes: dict[str, Counter] = {}
    for key, diagnosis in predictions.items():
        votes.setdefault(key.split("@v")[0], Counter())[diagnosis] += 1
    return {image_id: counter.most_common(1)[0][0] for image_id, counter in votes.items()}
