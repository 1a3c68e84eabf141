"""Where plain PyTorch (one process or DDP) and DeepSpeed train differently: the one seam.

The :class:`~cmgnet.train.engine.Trainer` asks its :class:`Strategy` how to configure, save,
load and gather the network's state and what the engine allows (skipping a step, a weight
average, auxiliary models), and never branches on DeepSpeed itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from cmgnet.model.base import WEIGHTS_NAME

from . import checkpoint as ckpt

if TYPE_CHECKING:
    from .auxiliary import AuxiliaryTask
    from .config import ExperimentConfig


class Strategy:
    """Plain PyTorch: the weights in ``model/`` (``save_pretrained``), the optimiser beside them.

    Args:
        accelerator: the run's accelerator.
    """

    name = "torch"
    can_skip_steps = True  # a NaN step's gradients can be dropped before the optimiser applies them
    why_not = ""  # what the engine cannot do here, for messages

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def configure(self, cfg: ExperimentConfig) -> None:
        """Adjust the engine's own configuration before ``accelerator.prepare``."""

    def refuse(self, cfg: ExperimentConfig) -> None:
        """Raise for settings this strategy cannot train with."""

    def allows_auxiliary(self) -> bool:
        """Whether models beside the network (:mod:`cmgnet.train.auxiliary`) can train."""
        return True

    @contextlib.contextmanager
    def full_parameters(self, model: nn.Module, modifier_rank: int | None = None) -> Iterator[None]:
        """The whole parameters on every rank for the block (nothing to do without partitioning)."""
        yield

    def save(self, directory: Path, model: nn.Module, optimizer: Any, tasks: Sequence[AuxiliaryTask]) -> None:
        """Write the network, its optimiser and the auxiliary tasks into a checkpoint (every rank calls this)."""
        if self.accelerator.is_main_process:
            self.accelerator.unwrap_model(model).save_pretrained(directory / "model")
            ckpt.save_state(optimizer.state_dict(), directory, "optimizer")
            for task in tasks:
                task.save(directory)

    def load(self, directory: Path, model: nn.Module, optimizer: Any, tasks: Sequence[AuxiliaryTask]) -> None:
        """Read what :meth:`save` wrote."""
        self.accelerator.unwrap_model(model).load_weights(directory / "model" / WEIGHTS_NAME)
        optimizer.load_state_dict(ckpt.load_state(directory, "optimizer"))
        for task in tasks:
            task.load(directory)


class DeepSpeedStrategy(Strategy):
    """DeepSpeed (ZeRO): it owns, and may partition, the weights and the optimiser, steps inside
    ``backward`` and saves in its own format (``deepspeed/``)."""

    name = "deepspeed"
    can_skip_steps = False
    why_not = "under DeepSpeed, which cannot skip a step"

    @property
    def zero_stage(self) -> int:
        plugin = self.accelerator.state.deepspeed_plugin
        return plugin.zero_stage if plugin is not None else 0

    def configure(self, cfg: ExperimentConfig) -> None:
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # loaders are not prepare()-d
            ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size

    def refuse(self, cfg: ExperimentConfig) -> None:
        if cfg.train.ema_decay > 0:  # ZeRO owns (and may partition) the weights
            raise ValueError("train.ema_decay is not supported under DeepSpeed: set it to 0")

    def allows_auxiliary(self) -> bool:
        return False  # DeepSpeed drives a single model

    @contextlib.contextmanager
    def full_parameters(self, model: nn.Module, modifier_rank: int | None = None) -> Iterator[None]:
        """Under ZeRO-3, gather the partitioned parameters on every rank for the block."""
        if self.zero_stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=modifier_rank):
            yield

    def save(self, directory: Path, model: nn.Module, optimizer: Any, tasks: Sequence[AuxiliaryTask]) -> None:
        self.accelerator.save_state(str(directory / "deepspeed"))  # collective; DeepSpeed's own (torch.save) format

    def load(self, directory: Path, model: nn.Module, optimizer: Any, tasks: Sequence[AuxiliaryTask]) -> None:
        self.accelerator.load_state(str(directory / "deepspeed"))


def strategy_for(accelerator: Accelerator) -> Strategy:
    """The strategy of an accelerator's distributed setup."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedStrategy(accelerator)
    return Strategy(accelerator)
