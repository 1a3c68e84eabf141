"""Static int8 quantisation of the exported ONNX for CPU serving with ONNX Runtime.

The convolutions carry almost all of CMG-Net's arithmetic, and in fp32 ONNX Runtime already
runs them near the CPU's peak, so int8 is what makes CPU serving substantially faster than
PyTorch eager. Only ``Conv`` and ``ConvTranspose`` are quantised (weights per output channel,
activations per tensor, QDQ format, calibrated on real images); attention, LayerNorm and the
gate stay in fp32. Accuracy is a property of the trained weights, so
:func:`mask_agreement` measures it against the fp32 model on the calibration images and the
exporter reports it; re-check it on held-out data before serving.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BackendUnavailableError
from .runners import onnxruntime_session

QUANTIZED_OPS = ("Conv", "ConvTranspose")

Feeds = dict[str, np.ndarray]


def quantize_onnx(src: str | Path, dst: str | Path, calibration: Sequence[Feeds]) -> Path:
    """Write an int8 (QDQ) copy of ``src`` with its convolutions quantised.

    Args:
        src: the fp32 ``model.onnx``.
        dst: the output file (``model.int8.onnx``).
        calibration: network inputs (``{input name: array}``, batch 1 each) whose activation
            ranges set the quantisation scales; a few dozen real images are enough.

    Returns:
        ``dst``.

    Raises:
        BackendUnavailableError: ONNX Runtime's quantisation tools are not installed.
        ValueError: no calibration data.
    """
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as err:
        raise BackendUnavailableError("int8 quantisation needs ONNX Runtime: pip install 'cmgnet[deploy]'") from err
    if not calibration:
        raise ValueError("int8 calibration needs at least one input")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(calibration)

        def get_next(self) -> Feeds | None:
            return next(self._feeds, None)

    dst = Path(dst)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX shape inference + graph cleanup; ONNX Runtime's symbolic pass cannot follow the
        # text-mask Expand, and the ONNX pass already gives the convolutions their shapes.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )
    return dst


@dataclass(frozen=True)
class Agreement:
    """How far the int8 model is from the fp32 one.

    Attributes:
        images: number of images compared.
        mean_dice: mean Dice between the two models' masks (1.0 = identical).
        min_dice: worst image.
        max_probability_diff: largest per-pixel probability difference.
    """

    images: int
    mean_dice: float
    min_dice: float
    max_probability_diff: float


def mask_agreement(
    reference: str | Path, candidate: str | Path, feeds: Iterable[Feeds], threshold: float = 0.5
) -> Agreement:
    """Compare two ONNX models' masks on the same inputs (both with ONNX Runtime on the CPU)."""
    sessions = [onnxruntime_session(path) for path in (reference, candidate)]
    dices, max_diff = [], 0.0
    for feed in feeds:
        ref, cand = (1 / (1 + np.exp(-s.run(None, feed)[0].astype(np.float64))) for s in sessions)
        max_diff = max(max_diff, float(np.abs(ref - cand).max()))
        for r, c in zip(ref > threshold, cand > threshold):
            total = r.sum() + c.sum()
            dices.append(1.0 if total == 0 else float(2 * (r & c).sum() / total))
    return Agreement(len(dices), float(np.mean(dices)), float(np.min(dices)), max_diff)
