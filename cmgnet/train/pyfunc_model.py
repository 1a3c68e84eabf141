"""CMG-Net as an MLflow pyfunc model ("models from code": nothing is pickled).

:meth:`cmgnet.train.tracking.Tracker.log_model` logs this file together with a
``save_pretrained`` directory as the ``checkpoint`` artifact. Load and run it with::

    model = mlflow.pyfunc.load_model("runs:/<run_id>/model")
    probs = model.predict({"image": images}, params={"text": ["Skin lesion."]})

Input ``image``: float32 ``N x 3 x H x W``, normalised as in training (see the run's
``config.yaml``: ``data.mean``/``data.std``), sides multiples of 16. Param ``text``: one
sentence per image, or one sentence for all (default: the neutral sentence). Output: lesion
probabilities ``N x 1 x H x W`` (threshold at 0.5 for the mask).
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch

from cmgnet.model import SegmentationModel
from cmgnet.text import NEUTRAL_SENTENCE


class CMGNetPyfunc(mlflow.pyfunc.PythonModel):
    """Wraps a saved CMG-Net (or any registered segmentation model) for ``mlflow.pyfunc``."""

    # The input schema is the tensor signature logged with the model; MLflow's type-hint
    # validation (inputs as lists) does not apply, so skip it (and its warning).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:  # noqa: ANN001 - no hints, see above
        """Rebuild the network from the logged ``checkpoint`` artifact (safetensors + JSON)."""
        self.model = SegmentationModel.from_pretrained(context.artifacts["checkpoint"]).eval()

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - no hints, see above
        """Lesion probabilities ``N x 1 x H x W`` for ``{"image": N x 3 x H x W}`` (see the module docstring)."""
        image = model_input["image"] if isinstance(model_input, dict) else model_input
        image = torch.as_tensor(np.asarray(image, dtype=np.float32))
        text = list((params or {}).get("text") or [NEUTRAL_SENTENCE])
        if len(text) == 1:
            text = text * image.shape[0]
        with torch.inference_mode():
            return torch.sigmoid(self.model(image, text=text)).numpy()


mlflow.models.set_model(CMGNetPyfunc())
