"""An exponential moving average of the network's weights (Polyak averaging).

Small-batch training leaves the weights jittering around a minimum; their running average
usually validates higher and more steadily (Polyak & Juditsky, 1992; the ``ModelEma`` of timm
and of the EfficientNet recipe). The trainer validates and keeps as ``best/`` the averaged
weights, so what is selected and shipped is what was measured. The average covers every
tensor the model saves (trainable weights and BatchNorm statistics; not a frozen text
encoder). The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the
first steps' random-ish weights are forgotten quickly.

Example:
    >>> ema = WeightEMA(model, decay=0.998)
    >>> ema.update()              # after each optimiser step
    >>> with ema.applied():       # validate / save the averaged weights
    ...     evaluate(model)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from cmgnet.model import SegmentationModel


class WeightEMA:
    """A shadow copy of ``model.saved_state_dict()``, averaged after every optimiser step.

    Args:
        model: the (unwrapped) network; its tensors are updated in place by the optimiser,
            so the pairing made here holds for the whole run.
        decay: the averaging decay in ``(0, 1)``; ``1 / (1 - decay)`` steps is the horizon.
    """

    def __init__(self, model: SegmentationModel, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.model, self.decay, self.updates = model, decay, 0
        skip = model.external_state_prefixes()
        live = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith(skip)}  # views
        self.shadow = {k: v.clone() for k, v in live.items()}
        self._pairs = [(self.shadow[k], live[k]) for k in self.shadow]
        self._floats = [p for p in self._pairs if p[0].is_floating_point()]
        self._others = [p for p in self._pairs if not p[0].is_floating_point()]  # BatchNorm step counters

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average."""
        self.updates += 1
        weight = 1.0 - self.current_decay()
        if self._floats:
            shadow, live = zip(*self._floats)
            torch._foreach_lerp_(list(shadow), list(live), weight)
        for shadow, live in self._others:
            shadow.copy_(live)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Swap the averaged weights into the model for the duration, then restore the live ones."""
        backup = {k: live.clone() for k, (_, live) in zip(self.shadow, self._pairs)}
        self.model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            self.model.load_state_dict(backup, strict=False)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "weights": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["weights"]
        if set(weights) != set(self.shadow):
            raise ValueError("EMA state does not match the model's tensors")
        with torch.no_grad():
            for k, v in weights.items():
                self.shadow[k].copy_(v)
        self.updates = int(state["updates"])
