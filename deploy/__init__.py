"""Deployment: ONNX export, TensorRT / torch-tensorrt engines, one runtime, prediction CLI.

    from cmgnet.deploy import Segmenter, export_bundle

    export_bundle(model, "exported/")                       # model.onnx + inference.json + text cache
    segmenter = Segmenter.load("exported/")                 # TensorRT engine if built, else ONNX Runtime
    [prediction] = segmenter.predict(["lesion.jpg"], "Skin lesion.")
    prediction.mask, prediction.probability, prediction.statistics()

The settings every backend serves with are one :class:`cmgnet.inference.InferenceRecord`.

Command lines: ``cmgnet export`` (:mod:`cmgnet.deploy.export`) and ``cmgnet predict``
(:mod:`cmgnet.deploy.predict`). TensorRT and torch-tensorrt are imported only when used.
"""

from typing import TYPE_CHECKING

from cmgnet._lazy import lazy_exports

from .errors import BackendUnavailableError, DeployError, EngineMismatchError

if TYPE_CHECKING:
    from .export import export_bundle, export_onnx, verify_onnx
    from .runtime import Prediction, Segmenter

# torch and ONNX load on first use, so `cmgnet export --help` / `cmgnet predict --help` stay fast.
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(("export_bundle", "export_onnx", "verify_onnx"), ".export"),
    **dict.fromkeys(("Prediction", "Segmenter"), ".runtime"),
})

__all__ = [
    "BackendUnavailableError",
    "DeployError",
    "EngineMismatchError",
    "Prediction",
    "Segmenter",
    "export_bundle",
    "export_onnx",
    "verify_onnx",
]
