"""The experiment config tree: dataclasses loaded from YAML with ``key=value`` overrides.

One :class:`ExperimentConfig` holds everything a run needs, in nested sections:

* ``model``: :class:`cmgnet.model.CMGNetConfig` fields (``arch`` picks the registered class);
* ``data``: :class:`cmgnet.data.config.DataConfig` fields (format, root, text regimes, ...);
* ``optim``, ``loss``, ``train``, ``eval``, ``logging``: defined here.

YAML files may start from another file with ``base: other.yaml`` (relative to the file);
overrides use dotted keys and YAML values::

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "model.masa=false", "train.epochs=2"])

Unknown keys and wrongly typed values are errors naming the key, so a typo never trains the
wrong model silently. The parts:

* reading: PyYAML with YAML 1.2 booleans (``mixed_precision: no`` stays the string ``"no"``)
  and bounded aliases (:mod:`cmgnet.yamlio`), ``base:`` chains and file-relative split CSVs;
* merging and overrides: a dict merge and ``key=value`` parsed as YAML (:func:`read_tree`);
* typing: pydantic v2 validates every value against its dataclass field
  (:func:`cmgnet.typed.build`), and :mod:`cmgnet.train.config_ranges` checks each number's range.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cmgnet.data.config import DataConfig
from cmgnet.errors import CmgnetError, one_line, shorten, shown
from cmgnet.inference import PostprocessMode
from cmgnet.model import CMGNetConfig, model_class
from cmgnet.model.encoders import encoder_normalization
from cmgnet.outputs import writing
from cmgnet.typed import build, to_plain
from cmgnet.yamlio import BoundedLoader, load_yaml, yaml_problem

from .config_ranges import check_experiment, check_value


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    Args:
        name: ``"adamw"`` or ``"sgd"``.
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        momentum: SGD momentum. The paper prints 0.0001, almost surely a typo for 0.9.
        nesterov: SGD Nesterov momentum.
        betas: AdamW betas.
        schedule: a ``transformers.get_scheduler`` name: ``cosine``, ``polynomial``,
            ``linear``, ``constant``, ``constant_with_warmup``, ...
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
        poly_power: exponent of the ``polynomial`` schedule (nnU-Net uses 0.9).
        min_lr: final learning rate of the ``polynomial`` schedule.
        grad_clip: max global gradient norm; 0 disables clipping.
        encoder_lr_mult: learning-rate factor of the image encoder's parameters (below 1
            keeps a pretrained encoder close to its ImageNet weights).
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    poly_power: float = 0.9
    min_lr: float = 0.0
    grad_clip: float = 1.0
    encoder_lr_mult: float = 1.0


@dataclass
class LossConfig:
    """``dice_weight * Dice + bce_weight * BCE`` (paper: 0.5 and 0.5).

    Args:
        dice_weight: weight of the soft Dice loss.
        bce_weight: weight of binary cross-entropy on the logits.
        batch_dice: pool Dice over the batch instead of averaging per-image Dice.
    """

    dice_weight: float = 0.5
    bce_weight: float = 0.5
    batch_dice: bool = False


@dataclass
class TrainConfig:
    """The training loop.

    Args:
        epochs: passes over the training split.
        batch_size: images per process and micro-step; the global batch is
            ``batch_size * grad_accum * num_processes``.
        grad_accum: micro-steps per optimiser step.
        mixed_precision: ``"auto"``, ``"no"``, ``"bf16"`` or ``"fp16"`` (loss scaling); an
            ``accelerate launch --mixed_precision`` flag takes precedence. ``auto`` (the CPU
            recipes') takes bf16 where the hardware computes it natively (AVX512-BF16/AMX CPUs,
            Ampere+ GPUs; 1.5x faster for the pretrained recipe on AMD Zen 4), fp32 on other
            CPUs (emulated bf16 is 10-50x slower) and fp16 on older GPUs
            (:mod:`cmgnet.train.precision`).
        channels_last: keep the networks' weights and activations NHWC, the layout oneDNN
            and cuDNN convolutions prefer (faster on CPU, and with tensor cores).
        seed: seeds Python, NumPy and torch (model init is identical on every rank; per-rank
            randomness is offset by the rank).
        deterministic: ``torch.use_deterministic_algorithms`` (slower; exact reruns on CPU).
        val_every: validate every this many epochs (and after the last).
        checkpoint_every_steps: also checkpoint every this many optimiser steps (0: epoch ends only).
        keep_checkpoints: resumable checkpoints kept (the best weights are kept separately).
        log_every: optimiser steps between step-level metric logs.
        time_limit_minutes: stop after this wall time with a checkpoint (0: no limit).
        max_steps: stop after this many optimiser steps (0: no limit; for smoke runs).
        resume: ``"auto"`` (latest checkpoint of this run, if any), a checkpoint or run
            directory, or ``""`` (start fresh).
        init_weights: fine-tune: a ``save_pretrained`` folder (a run's ``best/``) whose network
            weights, and diagnosis classifier where both runs have one with the same classes,
            start this run; optimiser, schedule and step count start fresh (``""``: none).
        sync_batchnorm: use ``SyncBatchNorm`` across processes (PyTorch supports it on GPUs
            only; CPU processes keep per-process batch statistics).
        diagnosis_classifier: train the small diagnosis classifier beside the network when
            the ``predicted`` text regime is evaluated (see ``cmgnet.train.diagnosis``).
        diagnosis_width: first-stage width of that classifier's from-scratch backbone.
        diagnosis_encoder: its backbone: ``scratch`` or an encoder name (``efficientnet-lite0``,
            ImageNet-pretrained).
        diagnosis_image_size: side its input is resized to (0: the training size).
        diagnosis_balanced: class-balanced (inverse-frequency) cross-entropy.
        diagnosis_lr: its AdamW learning rate.
        attention_backend: implementation of every attention op (``cmgnet.kernels``): ``auto``,
            ``sdpa``, ``reference`` or ``triton``; ``""`` keeps the process setting
            (``CMGNET_ATTENTION``, else ``auto``). The backend in effect is logged as the
            ``runtime.attention_backend`` parameter.
        ema_decay: keep an exponential moving average of the network's weights with this
            decay (0: off; e.g. 0.998, a horizon of 500 steps) and validate, keep and evaluate
            the averaged weights instead of the raw ones (:mod:`cmgnet.train.ema`).
        max_nonfinite_steps: optimiser steps in a row whose loss (or, without fp16 loss
            scaling, gradient norm) is NaN or inf that are skipped (never applied) before
            training stops with an error naming the step; 0 stops at the first. Nothing
            non-finite is ever saved. Under DeepSpeed, which steps inside backward, the first
            one stops training.
    """

    epochs: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    mixed_precision: str = "no"
    channels_last: bool = False
    seed: int = 0
    deterministic: bool = False
    val_every: int = 1
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    time_limit_minutes: float = 0.0
    max_steps: int = 0
    resume: str = "auto"
    init_weights: str = ""
    sync_batchnorm: bool = True
    diagnosis_classifier: bool = True
    diagnosis_width: int = 16
    diagnosis_encoder: str = "scratch"
    diagnosis_image_size: int = 0
    diagnosis_balanced: bool = True
    diagnosis_lr: float = 1e-3
    attention_backend: str = ""
    ema_decay: float = 0.0
    max_nonfinite_steps: int = 3

    def __post_init__(self) -> None:
        from cmgnet.kernels import BACKENDS

        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay: {self.ema_decay} must be in [0, 1) (0 turns the average off)")

        if self.attention_backend not in ("", *BACKENDS):
            raise ValueError(f"train.attention_backend: {shown(self.attention_backend)} is not one of {BACKENDS} "
                             "(or '' for the CMGNET_ATTENTION environment variable)")


@dataclass
class EvalConfig:
    """Validation during training and the final evaluation of the best weights.

    Args:
        val_split: split used to pick the best checkpoint.
        splits: splits evaluated with the best weights when training ends.
        text_regimes: text regimes of the final evaluation (validation uses
            ``data.text_regime_eval``).
        threshold: probability above which a pixel is lesion.
        hd95: compute HD95 in the final evaluation (validation skips it for speed).
        overlays: overlay PNGs (prediction vs ground truth) written per evaluation.
        batch_size: evaluation batch per process (0: ``train.batch_size``).
        tta: flip test-time augmentation in the final evaluation (4 forwards per image;
            validation during training never uses it).
        postprocess: mask post-processing of every evaluation (validation included) and of serving
            (:mod:`cmgnet.model.postprocess`): ``none``, ``largest`` (largest connected
            component), ``fill`` (fill holes) or ``largest+fill``.
        select: with several data sources, the validation Dice that picks the best weights:
            ``all`` (per-image mean over every validation image), ``sources`` (the mean of the
            sources' per-image means) or one source's name.
    """

    val_split: str = "val"
    splits: list[str] = field(default_factory=lambda: ["test"])
    text_regimes: list[str] = field(default_factory=lambda: ["none", "metadata", "oracle"])
    threshold: float = 0.5
    hd95: bool = True
    overlays: int = 8
    batch_size: int = 0
    tta: bool = False
    postprocess: PostprocessMode = "none"
    select: str = "all"


@dataclass
class LoggingConfig:
    """Run directory, progress output and MLflow.

    Args:
        output_dir: parent of every run directory and of the default MLflow store.
        run_name: run directory name (``""``: ``<name>-<timestamp>``).
        mlflow: track the run in MLflow.
        tracking_uri: MLflow tracking URI (``""``: ``sqlite:///<output_dir>/mlflow.db``).
        artifact_location: experiment artifact root (``""``: ``<output_dir>/mlartifacts``);
            only used when the experiment is created.
        experiment: MLflow experiment name.
        log_model: log the best weights as an MLflow (pyfunc) model at the end.
        progress_bar: tqdm bars on the main process.
    """

    output_dir: str = "runs"
    run_name: str = ""
    mlflow: bool = True
    tracking_uri: str = ""
    artifact_location: str = ""
    experiment: str = "cmgnet"
    log_model: bool = True
    progress_bar: bool = True


@dataclass
class ExperimentConfig:
    """Everything one run needs (see the module docstring).

    Args:
        name: experiment name (run-name prefix, MLflow run name).
        arch: registered model name (``cmgnet``, ``unet``, ...; see ``cmgnet.model.list_models``).
        model: the fields of that model's config class (``CMGNetConfig`` for ``cmgnet``,
            ``UNetConfig`` for ``unet``): the section is typed by ``arch``.
        data: :class:`~cmgnet.data.config.DataConfig` fields.
        optim, loss, train, eval, logging: the sections above.
    """

    name: str = "cmgnet"
    arch: str = "cmgnet"
    model: Any = field(default_factory=CMGNetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain YAML/JSON values (tuples become lists)."""
    return to_plain(cfg)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (the MLflow params form)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def config_differences(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """``key old -> new`` for every dotted key whose value differs between two config trees.

    Args:
        before, after: trees as :func:`to_dict` gives them (lists, not tuples).

    Returns:
        One entry per differing key, in ``after``'s order, values shortened; ``(absent)`` for a
        key one tree lacks.
    """
    old, new = flatten(before), flatten(after)
    missing = "(absent)"
    return [f"{key} {shown(old[key]) if key in old else missing} -> {shown(new[key]) if key in new else missing}"
            for key in dict.fromkeys([*new, *old]) if old.get(key, missing) != new.get(key, missing)]


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


class _Loader(BoundedLoader):
    """YAML 1.2 booleans: only ``true``/``false``, so ``mixed_precision: no`` stays the string ``"no"``.

    Aliases are bounded (:mod:`cmgnet.yamlio`): a "billion laughs" file is refused, not expanded.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _load_yaml(text: str) -> Any:
    return load_yaml(text, _Loader)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ValueError(f"{path}: circular 'base:' chain {' -> '.join(map(str, seen))}")
    try:
        raw = _load_yaml(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        detail = yaml_problem(err) if isinstance(err, yaml.YAMLError) else one_line(err)
        raise ValueError(f"{path}: cannot read config: {detail}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config file must be a mapping, got {type(raw).__name__}")
    _relative_to_file(raw, path.parent)
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _deep_merge(_read_yaml(path.parent / base, (*seen, path)), raw)


FILE_RELATIVE_KEYS: tuple[tuple[str, str], ...] = (("data", "split_csv"),)
"""Paths a config file may give relative to itself (they ship beside it, e.g. ``splits/*.csv``)."""


def _relative_to_file(raw: dict[str, Any], folder: Path) -> None:
    """Resolve ``FILE_RELATIVE_KEYS`` against the YAML's folder where the file is there.

    Other relative paths (``data.root``, ``logging.output_dir``) stay relative to the working
    directory; so does one of these when it is not found beside the YAML.
    """
    for section, key in FILE_RELATIVE_KEYS:
        node = raw.get(section)
        nodes = [node] if isinstance(node, dict) else []
        if isinstance(node, dict) and isinstance(node.get("sources"), list):  # each data source's own
            nodes += [s for s in node["sources"] if isinstance(s, dict)]
        for node in nodes:
            value = node.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute() and (folder / value).is_file():
                node[key] = str(folder / value)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "model.masa=false"]`` -> nested dict with YAML-typed values."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {shown(item)} is not of the form key=value")
        node = tree
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {shown(item)} conflicts with another override of {shown(p)}")
        try:
            node[leaf] = _load_yaml(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"override {shorten(key.strip())}: {yaml_problem(err)}") from err
    return tree


def read_tree(path: str | Path | None = None, overrides: Sequence[str] = (),
              base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The merged, untyped config tree: ``base`` under the YAML file (and its ``base:`` chain) under the overrides.

    Args:
        path: YAML file, the name of a shipped config (``demo``, ``paper``, ...: see
            :mod:`cmgnet.shipped`), or ``None`` for the defaults.
        overrides: ``key=value`` strings (values parsed as YAML: ``false``, ``1e-3``, ``[16, 8]``).
        base: a config tree under the file's (e.g. a saved model's ``arch`` and ``model``).
    """
    from cmgnet.shipped import config_path

    raw = _read_yaml(config_path(path)) if path else {}
    return _deep_merge(_deep_merge(dict(base or {}), raw), parse_overrides(overrides))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config (following ``base:``), apply dotted overrides, validate (arguments as :func:`read_tree`).

    Returns:
        The validated :class:`ExperimentConfig`.

    Raises:
        KeyError, TypeError, ValueError: as :func:`experiment_from_tree`; a problem with a
            value the file gave (not an override) names the file first.
    """
    tree = read_tree(path, overrides, base)
    try:
        return experiment_from_tree(tree)
    except (KeyError, TypeError, ValueError) as err:
        if path is None:
            raise
        from cmgnet.shipped import config_path

        where = config_path(path)
        text = one_line(err)
        if not _set_by_file(text, _read_yaml(where), overrides):
            raise
        if isinstance(err, CmgnetError):
            raise type(err)(text, where) from err
        raise type(err)(f"{where}: {text}") from err


def _set_by_file(message: str, file_tree: Mapping[str, Any], overrides: Sequence[str]) -> bool:
    """Whether the dotted key a message starts with was given by the file and not by an override."""
    match = re.match(r"(?:unknown key\(s\) )?([A-Za-z_][\w.\[\]]*)", message)
    if match is None:
        return False
    key = re.sub(r"\[\d+\]", "", match.group(1))

    def related(a: str, b: str) -> bool:  # the same key, or one inside the other
        return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")

    overridden = [item.partition("=")[0].strip() for item in overrides]
    return any(related(key, k) for k in flatten(file_tree)) and not any(related(key, k) for k in overridden)


def experiment_from_tree(tree: Mapping[str, Any]) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from a nested mapping.

    The ``model`` section is typed by ``arch`` through the model registry, and images are
    normalised with the encoder's own statistics unless ``data.mean`` / ``data.std`` are given.
    Every numeric value is checked against its range (:mod:`cmgnet.train.config_ranges`).

    Raises:
        KeyError, TypeError, ValueError: an unknown key, a mistyped value;
            :class:`~cmgnet.errors.UsageError` (a ``ValueError``): a value out of its range.
    """
    tree = dict(tree)
    arch = tree.get("arch", ExperimentConfig.arch)
    try:
        config_class = model_class(arch).config_class
    except (KeyError, TypeError) as err:
        raise KeyError(f"arch: {err.args[0] if err.args else shown(arch)}") from None
    model = tree.get("model", {})
    if not dataclasses.is_dataclass(model):
        if not isinstance(model, Mapping):
            raise TypeError(f"model: expected a mapping of {config_class.__name__} fields, got {shown(model)}")
        model = build(config_class, model, "model", check=check_value)
    tree["model"] = model
    data = tree.get("data", {})
    if isinstance(data, Mapping) and "mean" not in data and "std" not in data and hasattr(model, "encoder"):
        mean, std = encoder_normalization(model.encoder)
        tree["data"] = {**data, "mean": list(mean), "std": list(std)}
    cfg = build(ExperimentConfig, tree, check=check_value)
    check_experiment(cfg)
    return cfg


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (loadable by :func:`load_config`)."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
