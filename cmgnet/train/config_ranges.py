"""Allowed ranges of every numeric config value, checked when a config is loaded.

One table, :data:`RANGES`, maps a dotted key to its bounds (named as pydantic's ``Field``
names them: ``ge``, ``gt``, ``le``, ``lt``, ``multiple_of``); a sequence value (``optim.betas``,
``model.fusion_scales``) is checked item by item. The ``model`` keys hold for every registered
model's config class that has the field. :func:`check_experiment` adds the rules that relate
two values (the image size and the model's stride, ``min_lr`` and ``lr``, ...). Non-finite
numbers (``nan``, ``inf``) are refused for every float by :func:`cmgnet.typed.build`.

A value outside its range is a :class:`~cmgnet.errors.UsageError` naming the key, e.g.
``train.epochs=-1: must be >= 1``, raised before any run folder exists.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from cmgnet.errors import UsageError, shown
from cmgnet.typed import to_plain

if TYPE_CHECKING:
    from .config import ExperimentConfig


class Range(NamedTuple):
    """Bounds of one numeric value; ``None``: unbounded on that side."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    multiple_of: int | None = None

    def problem(self, value: float) -> str | None:
        """What is wrong with ``value``, or ``None`` when it is in range."""
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        inside = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                  and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
                  and (not self.multiple_of or value % self.multiple_of == 0))
        return None if inside else f"must be {self.describe()}"

    def describe(self) -> str:
        """The range in words, e.g. ``in [0, 1)`` or ``>= 1``."""
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if low and high:
            text = f"in {low}, {high}"
        elif low:
            text = f"{'>=' if self.ge is not None else '>'} {low[1:]}"
        elif high:
            text = f"{'<=' if self.le is not None else '<'} {high[:-1]}"
        else:
            text = "a number"
        return f"{text}, a multiple of {self.multiple_of}" if self.multiple_of else text


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


POSITIVE = Range(gt=0)
AT_LEAST_1 = Range(ge=1)
NON_NEGATIVE = Range(ge=0)
PROBABILITY = Range(ge=0, le=1)
DROPOUT = Range(ge=0, lt=1)
SEED = Range(ge=0, le=2**32 - 1)  # NumPy's seeds are 32-bit

RANGES: dict[str, Range] = {
    # optim
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.momentum": DROPOUT,
    "optim.betas": DROPOUT,
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.poly_power": NON_NEGATIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.grad_clip": NON_NEGATIVE,
    "optim.encoder_lr_mult": NON_NEGATIVE,
    # loss
    "loss.dice_weight": NON_NEGATIVE,
    "loss.bce_weight": NON_NEGATIVE,
    # train
    "train.epochs": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1,
    "train.grad_accum": AT_LEAST_1,
    "train.seed": SEED,
    "train.val_every": AT_LEAST_1,
    "train.checkpoint_every_steps": NON_NEGATIVE,
    "train.keep_checkpoints": AT_LEAST_1,
    "train.log_every": AT_LEAST_1,
    "train.time_limit_minutes": NON_NEGATIVE,
    "train.max_steps": NON_NEGATIVE,
    "train.diagnosis_width": AT_LEAST_1,
    "train.diagnosis_image_size": NON_NEGATIVE,
    "train.diagnosis_lr": POSITIVE,
    "train.ema_decay": DROPOUT,
    "train.max_nonfinite_steps": NON_NEGATIVE,
    # eval
    "eval.threshold": Range(gt=0, lt=1),
    "eval.overlays": NON_NEGATIVE,
    "eval.batch_size": NON_NEGATIVE,
    # data
    "data.image_size": Range(ge=16, multiple_of=16),
    "data.scale_range": POSITIVE,
    "data.shift_range": Range(ge=0, lt=0.5),
    "data.num_workers": NON_NEGATIVE,
    "data.seed": SEED,
    "data.mean": PROBABILITY,
    "data.std": POSITIVE,
    "data.max_pixels": AT_LEAST_1,
    "data.split_fractions": PROBABILITY,
    "data.epoch_size": NON_NEGATIVE,
    "data.sources.split_fractions": PROBABILITY,
    "data.sources.weight": POSITIVE,
    # model (every registered model's config class)
    "model.in_channels": AT_LEAST_1,
    "model.base_width": AT_LEAST_1,
    "model.depth": AT_LEAST_1,
    "model.decoder_channels": AT_LEAST_1,
    "model.masa_heads": AT_LEAST_1,
    "model.text_max_length": AT_LEAST_1,
    "model.modality_dropout": PROBABILITY,
    "model.fusion_dim": AT_LEAST_1,
    "model.fusion_heads": AT_LEAST_1,
    "model.fusion_scales": AT_LEAST_1,
    "model.fusion_layers": AT_LEAST_1,
    "model.guide_scales": AT_LEAST_1,
    "model.self_attention_scales": AT_LEAST_1,
    "model.vit_scales": AT_LEAST_1,
    "model.vit_layers": AT_LEAST_1,
    "model.vit_dim": AT_LEAST_1,
    "model.vit_heads": AT_LEAST_1,
    "model.vit_mlp_ratio": POSITIVE,
    "model.vit_dropout": DROPOUT,
    "model.pos_grid": AT_LEAST_1,
    "model.feature_size": Range(ge=12, multiple_of=12),  # MONAI SwinUNETR needs multiples of 12
    "model.depths": AT_LEAST_1,
    "model.num_heads": AT_LEAST_1,
    "model.window_size": AT_LEAST_1,
    "model.patch_size": AT_LEAST_1,
    "model.mlp_ratio": POSITIVE,
    "model.drop_rate": DROPOUT,
    "model.attn_drop_rate": DROPOUT,
    "model.dropout_path_rate": DROPOUT,
    "model.dropout": DROPOUT,
    # compare (cmgnet.train.compare.CompareConfig)
    "compare.budget_minutes": NON_NEGATIVE,
    "compare.cost_size": Range(ge=16, multiple_of=16),
    "compare.latency_runs": NON_NEGATIVE,
}
"""Dotted key -> allowed range (see the module docstring)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_value(key: str, value: Any) -> None:
    """Refuse ``value`` of ``key`` when :data:`RANGES` bounds it and it is outside.

    Raises:
        UsageError: ``<key>=<value>: must be ...`` (the value shortened).
    """
    bounds = RANGES.get(re.sub(r"\[\d+\]", "", key))  # a list item's field: data.sources[1].weight
    if bounds is None:
        return
    items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    for item in items:
        if _is_number(item) and (problem := bounds.problem(item)):
            raise UsageError(f"{key}={shown(to_plain(value))}: {problem}")


def check_experiment(cfg: ExperimentConfig) -> None:
    """The rules relating two values of a built config (each value's own range is checked on load).

    Raises:
        UsageError: naming the key to change.
    """
    model, data, optim = cfg.model, cfg.data, cfg.optim
    stride = getattr(model, "stride", None)
    if stride and data.image_size % stride:
        raise UsageError(f"data.image_size={data.image_size}: must be a multiple of {stride}, the input stride "
                         f"of this {cfg.arch} model")
    if getattr(model, "in_channels", len(data.mean)) != len(data.mean):
        raise UsageError(f"model.in_channels={model.in_channels}: the data pipeline gives {len(data.mean)}-channel "
                         "images")
    if optim.min_lr > optim.lr:
        raise UsageError(f"optim.min_lr={optim.min_lr}: must be <= optim.lr ({optim.lr})")
    if cfg.loss.dice_weight + cfg.loss.bce_weight <= 0:
        raise UsageError("loss.dice_weight=0: with loss.bce_weight=0 there is no loss to train on")
    if (dim := getattr(model, "fusion_dim", None)) and dim % model.fusion_heads:
        raise UsageError(f"model.fusion_dim={dim}: must be a multiple of model.fusion_heads ({model.fusion_heads})")
    names = [source.name for source in data.source_configs()]
    if cfg.eval.select not in ("all", "sources", *names):
        raise UsageError(f"eval.select={shown(cfg.eval.select)}: must be all, sources or a data source name "
                         f"({', '.join(names)})")
