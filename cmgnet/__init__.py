"""CMG-Net: text-guided skin-lesion segmentation (model, data, training, deployment)."""

__version__ = "0.1.0"
