"""CMG-Net as an MLflow pyfunc model ("models from code": nothing is pickled).

:meth:`cmgnet.train.tracking.Tracker.log_model` logs this file together with a
``save_pretrained`` directory as the ``checkpoint`` artifact. The model serves exactly what
``cmgnet predict`` serves: raw images in, masks out, with the preprocessing (image size,
normalisation, centre crop), threshold and text regime of the checkpoint's ``inference.json``
(:mod:`cmgnet.inference`), through :class:`cmgnet.deploy.Segmenter`::

    model = mlflow.pyfunc.load_model("runs:/<run_id>/model")
    out = model.predict(pd.DataFrame({"image": [open("lesion.jpg", "rb").read()], "text": ["Skin lesion."]}))
    out["mask"][0]          # H x W uint8 (1 = lesion) at the image's own size

Input: a DataFrame (or a dict of columns) with ``image``, each an encoded image file (bytes:
JPEG, PNG, BMP) or an ``H x W x 3`` uint8 array, and optionally ``text``, one sentence per
image (empty or missing: the neutral sentence). Output: a DataFrame with ``mask`` (``H x W``
uint8, 0/1), ``lesion_fraction`` and the ``sentence`` used.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np


def decode(value) -> np.ndarray:  # noqa: ANN001 - bytes, base64 text or an array
    """One ``image`` cell as ``H x W x 3`` uint8 RGB."""
    import base64

    from cmgnet.data.errors import DataError
    from cmgnet.data.imageio import decode_image

    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
        return value[..., :3]
    if isinstance(value, str):  # JSON serving sends binary columns base64-encoded
        value = base64.b64decode(value)
    try:
        data = np.frombuffer(bytes(value), dtype=np.uint8)
    except TypeError as err:
        raise DataError(f"image cell: not image bytes ({err.__class__.__name__})") from None
    # The files' rule (cmgnet predict's): EXIF orientation applied, every pixel mode converted or refused.
    return decode_image(data, Path(f"image of {data.size} bytes"))


class CMGNetPyfunc(mlflow.pyfunc.PythonModel):
    """Wraps a saved CMG-Net (or any registered segmentation model) for ``mlflow.pyfunc``."""

    # Inputs are checked against the logged column signature; MLflow's type-hint validation does not apply.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:  # noqa: ANN001 - no hints, see above
        """Open the logged ``checkpoint`` artifact with its inference contract (safetensors + JSON)."""
        from cmgnet.deploy.runtime import Segmenter

        # PyTorch, the logged checkpoint as it is: a model server writes no ONNX export cache (same predictor,
        # same record and preprocessing as `cmgnet predict`).
        self.segmenter = Segmenter.load(context.artifacts["checkpoint"], backend="torch", device="cpu")

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - no hints, see above
        """Masks for the ``image`` column (see the module docstring)."""
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        images = [decode(v) for v in frame["image"]]
        texts = [t if isinstance(t, str) and t.strip() else None for t in frame["text"]] if "text" in frame \
            else [None] * len(images)
        predictions = self.segmenter.predict(images, texts)
        return pd.DataFrame({
            "mask": [p.mask.astype(np.uint8) for p in predictions],
            "lesion_fraction": [float(p.mask.mean()) for p in predictions],
            "sentence": [p.sentence for p in predictions],
        })


mlflow.models.set_model(CMGNetPyfunc())
