"""Training, evaluation, ablation and tracking for CMG-Net (Accelerate + MLflow).

Entry points: ``accelerate launch launch/train.py --config configs/<name>.yaml``,
``launch/evaluate.py``, ``launch/ablate.py`` (or ``cmgnet train|evaluate|ablate``).
"""

from typing import TYPE_CHECKING

from cmgnet._lazy import lazy_exports

if TYPE_CHECKING:
    from .config import ExperimentConfig, load_config, save_config
    from .engine import Trainer, TrainResult, TrainState
    from .evaluate import EvalResult, Evaluator

# Loaded on first use: `cmgnet train --help` parses before torch, Accelerate and MLflow import.
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(("ExperimentConfig", "load_config", "save_config"), ".config"),
    **dict.fromkeys(("Trainer", "TrainResult", "TrainState"), ".engine"),
    **dict.fromkeys(("EvalResult", "Evaluator"), ".evaluate"),
})

__all__ = [
    "EvalResult",
    "Evaluator",
    "ExperimentConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "load_config",
    "save_config",
]
