"""Auxiliary tasks: models trained beside the network on its batches, each with its own optimiser,
checkpoint files and validation score.

The :class:`~cmgnet.train.engine.Trainer` drives a list of them through one small interface
(:class:`AuxiliaryTask`) and knows nothing of what they learn. The one the project ships,
:class:`DiagnosisTask`, trains the diagnosis classifier behind the ``predicted`` text regime.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from cmgnet.outputs import replace_dir, writing

from . import checkpoint as ckpt
from .diagnosis import IGNORE, DiagnosisClassifier, balanced_weights, classes_of, diagnosis_report

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .config import ExperimentConfig
    from .data import LoaderSource
    from .engine import TrainState
    from .evaluate import Evaluator

CLASSIFIER_DIR = "diagnosis"
BEST_CLASSIFIER_DIR = "best-diagnosis"


class AuxiliaryTask(Protocol):
    """What the trainer calls; every method runs on every process."""

    name: str
    module: nn.Module

    def start_from(self, folder: Path, log: Callable[[str], None]) -> None:
        """Fine-tuning: start from the state saved with the weights in ``folder``, where it fits."""

    def prepare(self, accelerator: Accelerator, channels_last: bool) -> None:
        """Build the optimiser and hand both to Accelerate."""

    def backward(self, image: Tensor, batch: dict[str, Any]) -> Tensor:
        """Forward and backward on the network's batch; returns the (detached) loss."""

    def step(self, apply: bool) -> None:
        """Apply (or, for a skipped step, drop) the accumulated gradients."""

    def tensors(self) -> dict[str, Tensor]:
        """Weights, by name, for the trainer's finite check before anything is saved."""

    def save(self, directory: Path) -> None:
        """Into a resumable checkpoint (main process)."""

    def load(self, directory: Path) -> None:
        """From a resumable checkpoint."""

    def validate(self, epoch: int, refuse_nonfinite: Callable[[str], None]) -> dict[str, float]:
        """``val_*`` metrics; keeps the task's own best."""

    def save_best(self, folder: Path) -> None:
        """Beside the network's best weights (main process)."""

    def load_best(self, folder: Path) -> None:
        """From the network's best weights."""


class DiagnosisTask:
    """The diagnosis classifier (:class:`~cmgnet.train.diagnosis.DiagnosisClassifier`) as an auxiliary task.

    It learns from every training image with a known diagnosis, of every data source, and is
    kept on its own validation balanced accuracy (``<run>/best-diagnosis/``, copied into
    ``best/diagnosis/``): its state at the network's best epoch can be several points worse
    (measured on the ISIC split).

    Args:
        cfg: the experiment (``train.diagnosis_*``, ``data.mean``/``std``, ``eval.val_split``).
        classifier: the (unprepared) classifier.
        diagnoses: sample id -> diagnosis of the training split.
        data: the run's loaders (validation diagnoses).
        state: the run's :class:`~cmgnet.train.engine.TrainState` (keeps the best score across resumes).
        run_dir: the run directory.
    """

    name = "diagnosis"

    def __init__(self, cfg: ExperimentConfig, classifier: DiagnosisClassifier, diagnoses: dict[str, str | None],
                 data: LoaderSource, state: TrainState, run_dir: Path) -> None:
        self.cfg, self.module, self.diagnoses, self.data = cfg, classifier, diagnoses, data
        self.state, self.run_dir = state, run_dir
        self.evaluator: Evaluator | None = None

    @classmethod
    def build(cls, cfg: ExperimentConfig, data: LoaderSource, state: TrainState, run_dir: Path,
              log: Callable[[str], None], allowed: bool = True) -> DiagnosisTask | None:
        """The task when a run evaluates ``predicted``, its training split has two diagnoses or more and
        the training strategy allows a second model (``allowed``)."""
        wanted = "predicted" in cfg.eval.text_regimes or cfg.data.text_regime_eval == "predicted"
        if not (cfg.train.diagnosis_classifier and wanted):
            return None
        if not allowed:
            log("note: the diagnosis classifier (text regime 'predicted') is not trained under DeepSpeed, "
                "which drives a single model")
            return None
        diagnoses = data.diagnoses("train")
        classes = classes_of(diagnoses)
        if len(classes) < 2:
            log(f"note: training split has diagnoses {classes}; no classifier, no 'predicted' regime")
            return None
        train = cfg.train
        weights = balanced_weights(classes, list(diagnoses.values())) if train.diagnosis_balanced else ()
        pretrained = "imagenet" if train.diagnosis_encoder != "scratch" else "none"
        classifier = DiagnosisClassifier(classes, train.diagnosis_width, train.diagnosis_encoder, pretrained,
                                         train.diagnosis_image_size, cfg.data.mean, cfg.data.std, weights)
        return cls(cfg, classifier, diagnoses, data, state, run_dir)

    def start_from(self, folder: Path, log: Callable[[str], None]) -> None:
        """Fine-tuning: start from the classifier saved with ``folder``'s weights when it has the same classes."""
        if not (folder / CLASSIFIER_DIR).is_dir():
            return
        saved = DiagnosisClassifier.load(folder / CLASSIFIER_DIR)
        if list(saved.classes) != list(self.module.classes):
            log(f"note: the diagnosis classifier in {folder} knows {saved.classes}, this run's training split "
                f"{self.module.classes}: it starts afresh")
            return
        self.module.load_state_dict(saved.state_dict())

    def prepare(self, accelerator: Accelerator, channels_last: bool) -> None:
        self.accelerator = accelerator
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(self.module.parameters(), lr=self.cfg.train.diagnosis_lr, weight_decay=1e-4)
        self.module, self.optimizer = accelerator.prepare(self.module, optimizer)

    @property
    def unwrapped(self) -> DiagnosisClassifier:
        return self.accelerator.unwrap_model(self.module)

    def backward(self, image: Tensor, batch: dict[str, Any]) -> Tensor:
        self.module.train()
        target = self.unwrapped.targets([self.diagnoses.get(str(i)) for i in batch["image_id"]], image.device)
        logits = self.module(image).float()
        # All-unknown batches still run backward (zero loss) so DDP ranks stay in step.
        loss = self.unwrapped.loss(logits, target) if (target != IGNORE).any() else logits.sum() * 0.0
        self.accelerator.backward(loss)
        return loss.detach()

    def step(self, apply: bool) -> None:
        if apply:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def tensors(self) -> dict[str, Tensor]:
        return {f"{CLASSIFIER_DIR}.{k}": v for k, v in self.unwrapped.state_dict().items()}

    def save(self, directory: Path) -> None:
        self.unwrapped.save(directory / CLASSIFIER_DIR)
        ckpt.save_state(self.optimizer.state_dict(), directory, "classifier_optimizer")

    def load(self, directory: Path) -> None:
        if (directory / CLASSIFIER_DIR).exists():
            self.unwrapped.load_state_dict(DiagnosisClassifier.load(directory / CLASSIFIER_DIR).state_dict())
            self.optimizer.load_state_dict(ckpt.load_state(directory, "classifier_optimizer"))

    def validate(self, epoch: int, refuse_nonfinite: Callable[[str], None]) -> dict[str, float]:
        """Score on the validation split; keep the best by balanced accuracy.

        Returns:
            ``val_diagnosis_accuracy`` and ``val_diagnosis_balanced_accuracy`` (``{}`` when no
            validation sample has a known diagnosis).
        """
        split = self.cfg.eval.val_split
        report = diagnosis_report(self.evaluator.predicted_diagnoses(split), self.data.diagnoses(split))
        if not report:
            return {}
        score = report["balanced_accuracy"]
        if math.isfinite(score) and score > self.state.best_diagnosis_metric:
            refuse_nonfinite(f"{BEST_CLASSIFIER_DIR}/")
            self.state.best_diagnosis_metric, self.state.best_diagnosis_epoch = score, epoch
            if self.accelerator.is_main_process:
                for target in (self.run_dir / BEST_CLASSIFIER_DIR, self.run_dir / ckpt.BEST_DIR / CLASSIFIER_DIR):
                    if target.parent.is_dir():
                        tmp = target.with_name(f".{target.name}.tmp")
                        shutil.rmtree(tmp, ignore_errors=True)
                        with writing(tmp, "the diagnosis classifier"):
                            self.unwrapped.save(tmp)
                        replace_dir(tmp, target)
            self.accelerator.wait_for_everyone()
        return {"val_diagnosis_accuracy": report["accuracy"], "val_diagnosis_balanced_accuracy": score}

    def save_best(self, folder: Path) -> None:
        kept = self.run_dir / BEST_CLASSIFIER_DIR
        if kept.is_dir():  # the classifier's own best, not its state at this epoch
            shutil.copytree(kept, folder / CLASSIFIER_DIR)
        else:
            self.unwrapped.save(folder / CLASSIFIER_DIR)

    def load_best(self, folder: Path) -> None:
        if (folder / CLASSIFIER_DIR).exists():
            self.unwrapped.load_state_dict(DiagnosisClassifier.load(folder / CLASSIFIER_DIR).state_dict())
