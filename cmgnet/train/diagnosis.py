"""Diagnosis classifier behind the ``predicted`` text regime (DESIGN section 2.2).

The ``oracle`` regime feeds the pathology label to the model; at inference time that label
does not exist. The ``predicted`` regime instead templates a diagnosis predicted from the
image by this small CNN, trained by the engine beside the segmentation network on the same
augmented batches (its own optimiser and cross-entropy loss; samples without a diagnosis are
ignored). It is saved next to the best segmentation weights (``best/diagnosis/``) as JSON +
safetensors.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_NAME = "classifier.json"
WEIGHTS_NAME = "classifier.safetensors"
IGNORE = -100


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class DiagnosisClassifier(nn.Module):
    """Image -> diagnosis logits: five stride-2 conv stages, global average pool, linear head.

    Args:
        classes: diagnosis names (the :data:`cmgnet.text.pseudo_text.DIAGNOSES` seen in training).
        width: channels of the first stage (doubling up to ``8 * width``).
    """

    def __init__(self, classes: Sequence[str], width: int = 16) -> None:
        super().__init__()
        if len(classes) < 2:
            raise ValueError(f"a diagnosis classifier needs at least 2 classes, got {list(classes)}")
        self.classes = list(classes)
        self.width = width
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.features = nn.Sequential(*(_stage(cin, cout) for cin, cout in zip([3, *widths[:-1]], widths)))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(widths[-1], len(self.classes)))

    def forward(self, image: Tensor) -> Tensor:
        """``B x 3 x H x W`` -> ``B x num_classes`` logits."""
        return self.head(self.features(image).mean((2, 3), keepdim=True))

    def targets(self, diagnoses: Sequence[str | None], device: torch.device) -> Tensor:
        """Class indices of diagnoses (``IGNORE`` for unknown or unseen ones)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return torch.tensor([index.get(d, IGNORE) if d else IGNORE for d in diagnoses], device=device)

    def save(self, directory: str | Path) -> Path:
        """Write ``classifier.json`` + ``classifier.safetensors``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"classes": self.classes, "width": self.width}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_NAME))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> DiagnosisClassifier:
        """Rebuild a classifier written by :meth:`save` (JSON + safetensors: no unpickling)."""
        directory = Path(directory)
        cfg = json.loads((directory / CONFIG_NAME).read_text())
        model = cls(cfg["classes"], cfg["width"])
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model


def classes_of(diagnoses: dict[str, str | None]) -> list[str]:
    """Diagnoses present in a split (sorted), ``unknown`` excluded."""
    return sorted({d for d in diagnoses.values() if d and d != "unknown"})


def vote(predictions: dict[str, str]) -> dict[str, str]:
    """Sample-key predictions -> one per image id (majority over ``@vNN`` variants)."""
    votes: dict[str, Counter] = {}
    for key, diagnosis in predictions.items():
        votes.setdefault(key.split("@v")[0], Counter())[diagnosis] += 1
    return {image_id: counter.most_common(1)[0][0] for image_id, counter in votes.items()}
