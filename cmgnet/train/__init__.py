"""Training, evaluation, ablation and tracking for CMG-Net (Accelerate + MLflow).

Entry points: ``accelerate launch launch/train.py --config configs/<name>.yaml``,
``launch/evaluate.py``, ``launch/ablate.py`` (or ``cmgnet train|evaluate|ablate``).
"""

from .config import ExperimentConfig, load_config, save_config
from .engine import Trainer, TrainResult, TrainState
from .evaluate import EvalResult, Evaluator

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
