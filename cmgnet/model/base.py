"""Base class and registry shared by CMG-Net and its baselines.

Weights are stored as safetensors and the architecture as JSON, so loading a checkpoint
never unpickles anything (``from_pretrained`` is safe on untrusted files).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from safetensors.torch import save_file
from torch import Tensor, nn

from cmgnet.errors import CheckpointError, one_line, shown
from cmgnet.inference import INFERENCE_NAME, InferenceRecord
from cmgnet.integrity import SHA256_KEY, check_finite, file_sha256, load_safetensors, recorded_sha256
from cmgnet.typed import build

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

_REGISTRY: dict[str, type[SegmentationModel]] = {}


def register_model(name: str):
    """Class decorator: make a model constructible by name (``create_model(name, ...)``)."""

    def wrap(cls: type[SegmentationModel]) -> type[SegmentationModel]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = cls
        cls.model_name = name
        return cls

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_class(name: str) -> type[SegmentationModel]:
    """The registered class of ``name``."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {shown(name)}; available: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, **config: Any) -> SegmentationModel:
    """Build a registered model from keyword config values."""
    cls = model_class(name)
    return cls(cls.config_class(**config))


def convert_config(config: Any, name: str, **overrides: Any) -> Any:
    """``config`` as the config class of model ``name``, keeping the fields both have.

    This is how an ablation turns a CMG-Net config into the U-Net baseline on the same
    encoder and widths.
    """
    cls = model_class(name).config_class
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    shared = {k: v for k, v in dataclasses.asdict(config).items() if k in names}
    return cls(**(shared | overrides))


def freeze_batchnorm(module: nn.Module) -> None:
    """Keep every BatchNorm in ``module`` at its (pretrained) statistics and affine values."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


class SegmentationModel(nn.Module):
    """A binary segmentation network with a dataclass config and safe (de)serialisation.

    Subclasses set ``config_class`` and implement ``forward(image, ...) -> B x 1 x H x W`` logits.
    Parameters listed by :meth:`external_state_prefixes` (e.g. a frozen pre-trained text
    encoder, rebuilt from its model id) are not written to the weights file.
    """

    model_name: ClassVar[str] = ""
    config_class: ClassVar[type]

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        # The inference contract (preprocessing, threshold, text regime) saved beside the weights;
        # set by training, read back by from_pretrained. None: not known (a model never trained here).
        self.inference: InferenceRecord | None = None

    def external_state_prefixes(self) -> tuple[str, ...]:
        return ()

    def check_input(self, image: Tensor) -> None:
        """Raise ``ValueError`` unless the image sides are multiples of the network's stride."""
        stride = self.config.stride
        if image.shape[-2] % stride or image.shape[-1] % stride:
            raise ValueError(f"image sides {tuple(image.shape[-2:])} must be multiples of {stride}")

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        if mode and getattr(self.config, "freeze_encoder_bn", False):
            freeze_batchnorm(self.encoder)  # BatchNorm stays frozen through .train()
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def saved_state_dict(self) -> dict:
        skip = self.external_state_prefixes()
        return {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith(skip)}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``.

        ``config.json`` records the weights file's SHA-256 (``weights_sha256``), which loading
        verifies (:mod:`cmgnet.integrity`).

        Raises:
            CheckpointError: a weight is NaN or inf (nothing is written).
        """
        directory = Path(directory)
        state = self.saved_state_dict()
        check_finite(state, directory / WEIGHTS_NAME, "weights (not saved)")
        directory.mkdir(parents=True, exist_ok=True)
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"model": self.model_name})
        config = {"model": self.model_name, "config": dataclasses.asdict(self.config),
                  SHA256_KEY: file_sha256(directory / WEIGHTS_NAME)}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if self.inference is not None:
            self.inference.save(directory)
        else:  # a stale record must not describe other weights
            (directory / INFERENCE_NAME).unlink(missing_ok=True)
        return directory

    def load_weights(self, path: str | Path) -> None:
        """Load a safetensors weights file; every non-external parameter must be present.

        The SHA-256 recorded in the ``config.json`` beside it, if any, must match, and every
        value must be finite.
        """
        record = Path(path).with_name(CONFIG_NAME)
        state = load_safetensors(path, "model weights", recorded_sha256(record), record)
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches: weights of another configuration
            raise CheckpointError(f"weights do not fit the model in {CONFIG_NAME} ({_first(err)})", path) from err
        skip = self.external_state_prefixes()  # str.startswith(()) is False
        missing = [k for k in missing if not k.startswith(skip)]
        if missing or unexpected:
            raise CheckpointError(f"weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})",
                                  path)

    @staticmethod
    def from_pretrained(directory: str | Path, **overrides: Any) -> SegmentationModel:
        """Rebuild a model saved by :meth:`save_pretrained` (any registered class), with its inference record.

        Args:
            directory: a saved model's folder, or the name of a shipped model
                (:func:`cmgnet.shipped.list_pretrained`, e.g. ``"isic-cmgnet-lite0"``).
            **overrides: config values to change (e.g. ``text_cache_dir``).

        Raises:
            CheckpointError: a missing or malformed ``config.json`` (unknown model, unknown or
                mistyped keys), unreadable weights or inference record; the message names the file.
        """
        from cmgnet.shipped import resolve_pretrained

        directory = resolve_pretrained(directory)  # a shipped model's name, or a folder
        name, config = read_model_config(directory)
        config_path = directory / CONFIG_NAME
        # The saved weights replace any pretrained encoder's: do not read the ImageNet file.
        values = config | ({"encoder_weights": "none"} if "encoder_weights" in config else {}) | overrides
        try:
            model = create_model(name, **values)
        except (TypeError, ValueError, KeyError) as err:  # mistyped values surface while building
            raise CheckpointError(f"bad config of model {name!r}: {_first(err)}", config_path) from err
        if "encoder_weights" in config and "encoder_weights" not in overrides:
            model.config.encoder_weights = config["encoder_weights"]  # as trained, for the record
        model.load_weights(directory / WEIGHTS_NAME)
        model.inference = InferenceRecord.load(directory)
        return model


def read_model_config(directory: str | Path) -> tuple[str, dict[str, Any]]:
    """The registered model name and its checked config from a saved model's ``config.json``.

    Raises:
        CheckpointError: a missing or malformed file, an unknown model, unknown or mistyped keys.
    """
    config_path = Path(directory) / CONFIG_NAME
    try:
        saved = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"not a saved cmgnet model ({_first(err)})", config_path) from err
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), str) \
            or not isinstance(saved.get("config"), dict):
        raise CheckpointError('expected a JSON object {"model": <name>, "config": {...}}, got '
                              f"{type(saved).__name__}", config_path)
    name, config = saved["model"], saved["config"]
    if name not in _REGISTRY:
        raise CheckpointError(f"unknown model {name!r}; available: {', '.join(list_models())}", config_path)
    try:  # the same typing as the experiment config's model section
        typed = build(_REGISTRY[name].config_class, config)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"bad config of model {name!r}: {one_line(err)}", config_path) from err
    return name, {key: getattr(typed, key) for key in config}


def _first(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {lines[0]}" if lines else err.__class__.__name__
