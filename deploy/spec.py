"""The deployment bundle: its file names, and the backends that serve it.

``cmgnet export`` writes one folder per model::

    <bundle>/
      inference.json            the model's InferenceRecord (cmgnet.inference), with the bundle's fields:
                                network name, opset, text cache and weights files, the network config
      model.onnx                image + text features + text mask -> logits (ONNX Runtime, TensorRT's parser)
      model.int8.onnx           optional: conv layers quantised to int8 for CPU serving
      model.engine(.json)       optional: TensorRT engine + the metadata checked when it is loaded
      model_trt.ep(.json)       optional: torch-tensorrt ExportedProgram + metadata
      text_cache/               text encoder features of the standard sentences (TextFeatureCache)
      text_encoder.safetensors  only when the text encoder was fine-tuned (not the published weights)

Bundles exported before the one record hold ``deploy.json`` instead of ``inference.json``;
they still load (:meth:`cmgnet.inference.InferenceRecord.read`).

The network never runs the text encoder: the ONNX graph and the engines take the encoder's
last hidden states (``B x L x D_t``, padded to ``text_max_length`` tokens) and their mask.
The runtime computes those with :class:`cmgnet.text.TextEncoder` once per distinct sentence,
served from ``text_cache/`` for the neutral sentence and the diagnosis templates.
"""

from __future__ import annotations

from cmgnet.inference import (  # noqa: F401 - the network's input/output names, re-exported for the backends
    IMAGE_INPUT,
    INFERENCE_NAME,
    LEGACY_BUNDLE_NAME,
    OUTPUT_NAME,
    TEXT_INPUTS,
)
from cmgnet.integrity import file_sha256  # noqa: F401 - re-exported for the engines and programs

RECORD_NAME = INFERENCE_NAME
"""The bundle's record file (the checkpoint's name: one record, one file name)."""
ONNX_NAME = "model.onnx"
INT8_ONNX_NAME = "model.int8.onnx"
ENGINE_NAME = "model.engine"
TORCH_TRT_NAME = "model_trt.ep"
TEXT_CACHE_DIR = "text_cache"
TEXT_WEIGHTS_NAME = "text_encoder.safetensors"

DEFAULT_OPSET = 18  # the lowest opset PyTorch's torch.export-based exporter emits; TensorRT >= 10 parses it
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt", "torch-tensorrt")
SEGMENTER_TEXT_REGIMES = ("none", "metadata", "oracle")  # "predicted" needs a classifier, not part of serving
