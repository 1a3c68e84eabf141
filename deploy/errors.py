"""Exceptions of the deploy package; each message says what is wrong and how to fix it."""

from __future__ import annotations


class DeployError(RuntimeError):
    """A deployment artefact is missing, malformed or inconsistent with the model."""


class BackendUnavailableError(DeployError):
    """An inference backend (TensorRT, torch-tensorrt, a GPU, an ONNX Runtime provider) is absent."""


class EngineMismatchError(DeployError):
    """A serialized engine does not fit this machine (TensorRT version, GPU) or this model (text encoder)."""
