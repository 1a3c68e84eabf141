"""Optimisers and learning-rate schedules from :class:`~cmgnet.train.config.OptimConfig`.

Two recipes ship as configs: the paper's (SGD, lr 0.01, momentum 0.9 where the paper prints
0.0001, constant rate) and a modern default (AdamW, linear warm-up, cosine decay). Schedules
come from ``transformers.get_scheduler`` and are stepped once per optimiser step; their state
is plain numbers, so checkpoints store it as JSON.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float, lr: float, encoder_lr_mult: float = 1.0) -> list[dict]:
    """Trainable parameters split into decayed weights and undecayed biases/norm scales, and
    into the image encoder (``encoder.*``, learning rate ``lr * encoder_lr_mult``) and the rest.

    Args:
        model: the network (frozen parameters, e.g. a frozen text encoder, are skipped).
        weight_decay: decay of the matrices and kernels.
        lr: base learning rate.
        encoder_lr_mult: learning-rate factor of the encoder.

    Returns:
        The non-empty optimiser parameter groups.
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            # 1-D tensors are biases and norm scales: decaying them only hurts (common practice).
            key = (name.startswith("encoder.") and encoder_lr_mult != 1.0, p.ndim > 1)
            groups.setdefault(key, []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr": lr * (encoder_lr_mult if enc else 1.0)}
        for (enc, decayed), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> Optimizer:
    """AdamW or SGD over the model's trainable parameters.

    Args:
        model: the network.
        cfg: optimiser settings.

    Returns:
        The optimiser.
    """
    groups = parameter_groups(model, cfg.weight_decay, cfg.lr, cfg.encoder_lr_mult)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise ValueError(f"unknown optimizer {cfg.name!r}; expected 'adamw' or 'sgd'")


def build_scheduler(optimizer: Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> LambdaLR:
    """Warm-up + decay schedule over the whole run, stepped per optimiser step.

    Args:
        optimizer: the optimiser.
        cfg: schedule name, warm-up epochs, polynomial power and final rate.
        steps_per_epoch: optimiser steps per epoch.
        epochs: total epochs.

    Returns:
        A ``LambdaLR`` (JSON-serialisable state).
    """
    from transformers import get_scheduler

    total = max(1, steps_per_epoch * epochs)
    warmup = min(total - 1, math.ceil(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs > 0 else 0
    extra: dict = {}
    if cfg.schedule == "polynomial":
        extra = {"power": cfg.poly_power, "lr_end": cfg.min_lr}
    elif cfg.schedule == "cosine_with_min_lr":
        extra = {"min_lr": cfg.min_lr}
    return get_scheduler(cfg.schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                         scheduler_specific_kwargs=extra or None)
