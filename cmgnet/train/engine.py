"""The training engine: one :class:`Trainer` for CPU, one GPU, DDP, DeepSpeed and many nodes.

Accelerate does the distribution (DDP, DeepSpeed ZeRO, mixed precision, gradient
accumulation); the engine adds what a segmentation run needs around it:

* per-epoch loaders with exact resume (epoch, micro-batches consumed, RNG of every rank);
* atomic checkpoints (:mod:`cmgnet.train.checkpoint`) and the best-by-validation-Dice
  weights as a ``save_pretrained`` directory (``<run>/best/``);
* sample-exact evaluation in any text regime (:mod:`cmgnet.train.evaluate`), including
  ``predicted`` through the diagnosis classifier trained alongside
  (:mod:`cmgnet.train.diagnosis`);
* MLflow tracking that degrades to a warning (:mod:`cmgnet.train.tracking`);
* progress bars and logs on the main process only.

The loop is split into hooks in the nnU-Net manner; subclass and override any of
:meth:`Trainer.on_train_start`, :meth:`~Trainer.on_epoch_start`, :meth:`~Trainer.training_step`,
:meth:`~Trainer.on_step_end`, :meth:`~Trainer.on_epoch_end`, :meth:`~Trainer.validate`,
:meth:`~Trainer.on_train_end`.

Example:
    >>> cfg = load_config("configs/demo.yaml", ["train.epochs=1"])
    >>> result = Trainer(cfg).fit()
    >>> result.best_dir
    PosixPath('runs/demo-.../best')
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, GradientAccumulationPlugin, broadcast_object_list, set_seed
from torch import Tensor

from cmgnet.errors import CheckpointError, NonFiniteError
from cmgnet.inference import record_from_experiment
from cmgnet.integrity import nonfinite_tensors
from cmgnet.model import SegmentationModel, create_model
from cmgnet.model.base import WEIGHTS_NAME
from cmgnet.outputs import lock_on_main, replace_dir, writing

from . import checkpoint as ckpt
from . import precision
from .config import ExperimentConfig, config_differences, flatten, save_config, to_dict
from .data import DataModule, LoaderSource
from .auxiliary import AuxiliaryTask, DiagnosisTask
from .checkpoint import BEST_DIR
from .strategy import strategy_for
from .ema import WeightEMA
from .evaluate import EvalResult, Evaluator, format_table, selection_score
from .losses import build_loss
from .optim import build_optimizer, build_scheduler
from .tracking import UNLOGGED_METRICS, Tracker, eval_metrics, git_info, sigterm_as_interrupt, ui_command

logger = logging.getLogger("cmgnet.train")

EMA_STATE = "ema"
RESUMABLE_MODEL_KEYS = ("text_cache_dir", "modality_dropout", "freeze_encoder_bn", "encoder_weights")
"""``model`` keys a resume may change: a cache path, training-time regularisers, the initialisation."""
NONFINITE_WHAT = ("loss", "gradient norm", "diagnosis classifier's loss")


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint as ``trainer_state.json``.

    Attributes:
        epoch: the current epoch (0-based).
        batch_in_epoch: micro-batches of ``epoch`` already trained on (the data position).
        global_step: optimiser steps taken.
        best_metric: best validation Dice so far (per-image mean).
        best_epoch: epoch of ``best_metric`` (``-1``: none yet).
        best_diagnosis_metric: best validation balanced accuracy of the diagnosis classifier,
            which is kept on its own score (``<run>/best-diagnosis/``, copied into ``best/``).
        best_diagnosis_epoch: epoch of ``best_diagnosis_metric`` (``-1``: none yet).
        mlflow_run_id: the MLflow run to continue on resume.
        elapsed_s: training wall time of earlier sessions of this run.
        world_size: processes the checkpoint was written with.
        history: one dict per finished epoch (loss, validation metrics, time).
        nonfinite_steps: optimiser steps skipped in a row for a NaN/inf loss (see
            ``train.max_nonfinite_steps``).
    """

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    best_diagnosis_metric: float = -math.inf
    best_diagnosis_epoch: int = -1
    mlflow_run_id: str | None = None
    elapsed_s: float = 0.0
    world_size: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    nonfinite_steps: int = 0


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        run_dir: the run directory.
        best_dir: the best weights (``save_pretrained`` layout), or ``None`` without validation.
        state: the final :class:`TrainState`.
        results: final evaluations of the best weights (one per split and text regime).
        tracking_uri: the MLflow store (``None`` when tracking was off or failed).
        mlflow_run_id: the MLflow run id, if tracked.
    """

    run_dir: Path
    best_dir: Path | None
    state: TrainState
    results: list[EvalResult]
    tracking_uri: str | None
    mlflow_run_id: str | None


def describe_setup(accelerator: Accelerator, why: str = "") -> str:
    """The process setup in words, e.g. ``"1 process on cpu, fp32"``, ``"8 processes on cuda (DeepSpeed ZeRO-2), bf16"``.

    ``why`` (the precision's reason, :mod:`cmgnet.train.precision`) follows the precision in brackets.
    """
    n = accelerator.num_processes
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        how = f"DeepSpeed ZeRO-{plugin.zero_stage}" if plugin is not None else "DeepSpeed"
    elif kind in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.MULTI_XPU):
        how = "DDP, gloo" if kind == DistributedType.MULTI_CPU else "DDP"
    elif kind == DistributedType.FSDP:
        how = "FSDP"
    else:
        how = "" if kind == DistributedType.NO else kind.value
    dtype = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
    return (f"{n} process{'es' if n != 1 else ''} on {accelerator.device.type}{f' ({how})' if how else ''}, {dtype}"
            + (f" ({why})" if why else ""))


def apply_attention_backend(cfg: ExperimentConfig) -> str:
    """Switch ``cmgnet.kernels`` to ``train.attention_backend`` (if set); return the backend in effect."""
    from cmgnet import kernels

    if cfg.train.attention_backend:
        kernels.set_backend(cfg.train.attention_backend)
    return kernels.get_backend()


def resolve_precision(cfg: ExperimentConfig) -> precision.Precision:
    """``train.mixed_precision`` resolved for the device this process trains on."""
    return precision.resolve(cfg.train.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")


def build_accelerator(cfg: ExperimentConfig) -> Accelerator:
    """An :class:`~accelerate.Accelerator` for the config (the launcher's settings still apply).

    Gradient accumulation is counted by Accelerate but not tied to the loaders (which are not
    ``prepare``-d: they shard themselves, sample-exactly for evaluation).
    """
    # Several processes without CUDA (torchrun or `accelerate launch --multi_gpu` on a CPU box):
    # Accelerate only sets up gloo DDP when told the run is on CPU.
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=cpu_ddp,
        mixed_precision=resolve_precision(cfg).mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.grad_accum, sync_with_dataloader=False, adjust_scheduler=False
        ),
        step_scheduler_with_optimizer=False,
    )


class Trainer:
    """Train, validate, checkpoint, evaluate and track one experiment.

    Args:
        cfg: the experiment.
        data: a :class:`~cmgnet.train.data.LoaderSource` (default: a
            :class:`~cmgnet.train.data.DataModule` over ``cfg.data``).
        accelerator: reuse an accelerator (e.g. across ablation variants); built from ``cfg``
            otherwise.
        run_tags: extra MLflow tags of the run (e.g. ``mlflow.parentRunId`` to nest it under a
            comparison's parent run).
    """

    def __init__(self, cfg: ExperimentConfig, data: LoaderSource | None = None,
                 accelerator: Accelerator | None = None, run_tags: dict[str, str] | None = None) -> None:
        if cfg.data.text_regime_train == "predicted":
            raise ValueError("data.text_regime_train='predicted' is an evaluation regime: train with oracle, "
                             "metadata or none and evaluate with predicted")
        self.cfg = cfg
        self.accelerator = accelerator or build_accelerator(cfg)
        self.precision = resolve_precision(cfg)
        self.strategy = strategy_for(self.accelerator)
        self.data = data
        self.state = TrainState(world_size=self.accelerator.num_processes)
        self.tracker = Tracker(cfg.logging, enabled=self.accelerator.is_main_process)
        self._stop = False
        self._pending_rng: dict[str, Any] | None = None
        self._window: list[float] = []
        self._nonfinite: Tensor | None = None  # NaN/inf seen since the last optimiser step, per NONFINITE_WHAT
        self.run_tags = dict(run_tags or {})

    # ------------------------------------------------------------------ setup
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, message: str) -> None:
        """A concise log line, main process only."""
        if self.is_main:
            logger.info(message)

    def setup(self) -> None:
        """Seed, build model/optimiser/scheduler/loaders, resolve the run directory, resume."""
        cfg, acc = self.cfg, self.accelerator
        self.run_dir = self._resolve_run_dir()
        # First, before any checkpoint is read or pruned: a second run into this directory fails at once.
        self._run_lock = lock_on_main(acc, self.run_dir, "run directory",
                                      "wait for it to finish or set another logging.run_name")
        # Identical initial weights everywhere, then per-rank streams (modality dropout etc.).
        set_seed(cfg.train.seed, deterministic=cfg.train.deterministic)
        self.attention_backend = apply_attention_backend(cfg)
        model = create_model(cfg.arch, **dataclasses.asdict(cfg.model))
        if cfg.train.init_weights:  # fine-tuning: the same network, trained elsewhere first
            self._refuse_another_network(Path(cfg.train.init_weights), "weights'")
            model.load_weights(Path(cfg.train.init_weights) / WEIGHTS_NAME)
        # The inference contract, saved with every checkpoint and best/ (cmgnet.inference).
        model.inference = record_from_experiment(model, cfg)
        if acc.num_processes > 1 and cfg.train.sync_batchnorm and acc.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.data is None:
            self.data = DataModule(cfg.data, acc.process_index, acc.num_processes, cfg.train.seed)
        if hasattr(self.data, "validate"):
            # Every file of every split this run reads, before the first step: a bad file must not end a long run.
            self.data.validate(["train", cfg.eval.val_split, *cfg.eval.splits])
        diagnosis = DiagnosisTask.build(cfg, self.data, self.state, self.run_dir, self.log,
                                        allowed=self.strategy.allows_auxiliary())
        self.auxiliary: list[AuxiliaryTask] = [diagnosis] if diagnosis is not None else []
        for task in self.auxiliary if cfg.train.init_weights else ():
            task.start_from(Path(cfg.train.init_weights), self.log)
        set_seed(cfg.train.seed, device_specific=True, deterministic=cfg.train.deterministic)

        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(cfg.loss)
        train_loader = self.data.train_loader(cfg.train.batch_size, 0)
        self.steps_per_epoch = len(train_loader) // cfg.train.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(train_loader)} batches per epoch on this rank is fewer than grad_accum="
                             f"{cfg.train.grad_accum}: lower the batch size or accumulation")
        optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.steps_per_epoch, cfg.train.epochs)
        self.strategy.configure(cfg)
        # The scheduler stays unprepared: it is stepped once per real optimiser step, by us.
        self.model, self.optimizer = acc.prepare(model, optimizer)
        for task in self.auxiliary:
            task.prepare(acc, cfg.train.channels_last)
        self.evaluator = Evaluator(cfg, self.model, self.data, acc, diagnosis.module if diagnosis else None)
        for task in self.auxiliary:
            task.evaluator = self.evaluator
        self.ema = None
        self.strategy.refuse(cfg)
        if cfg.train.ema_decay > 0:
            self.ema = WeightEMA(self._unwrapped(), cfg.train.ema_decay)

        self.checkpoints = ckpt.CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_checkpoints,
                                                  self.is_main, acc.wait_for_everyone)
        resume_from = self._resume_path()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        acc.wait_for_everyone()

    def release_run_dir(self) -> None:
        """Let another process write the run directory (called when :meth:`fit` ends, however it ends)."""
        lock, self._run_lock = getattr(self, "_run_lock", None), None
        if lock is not None:
            lock.release()

    def _resolve_run_dir(self) -> Path:
        cfg = self.cfg
        if cfg.train.resume not in ("", "auto"):
            return ckpt.resolve_checkpoint(cfg.train.resume).parent.parent
        name = [cfg.logging.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(name)  # one timestamp for every rank
        return Path(cfg.logging.output_dir) / name[0]

    def _resume_path(self) -> Path | None:
        resume = self.cfg.train.resume
        if resume == "":
            return None
        if resume != "auto":
            path = ckpt.resolve_checkpoint(resume)
            if problem := ckpt.verify_checkpoint(path):
                raise CheckpointError(f"cannot resume: {problem}")
            return path
        # Newest first; a damaged one (truncated weights, garbage state) is reported and the previous one used.
        candidates = self.checkpoints.complete()
        for path in reversed(candidates):
            problem = ckpt.verify_checkpoint(path)
            if problem is None:
                return path
            self.log(f"warning: skipping checkpoint {path}: {problem}")
        if candidates:
            raise CheckpointError(f"no usable checkpoint among {len(candidates)}: all are damaged (see the warnings); "
                                  "delete them to start over, or set train.resume= to start fresh elsewhere",
                                  self.checkpoints.root)
        return None

    # ------------------------------------------------------------------ checkpoints
    def _unwrapped(self) -> SegmentationModel:
        return self.accelerator.unwrap_model(self.model)

    def _write_checkpoint(self, directory: Path) -> None:
        acc = self.accelerator
        self.strategy.save(directory, self.model, self.optimizer, self.auxiliary)
        if self.is_main:
            ckpt.save_state(self.scheduler.state_dict(), directory, "scheduler")
            if acc.scaler is not None:
                ckpt.save_state(acc.scaler.state_dict(), directory, "scaler")
            (directory / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(self.state), indent=1))
            save_config(self.cfg, directory / "experiment.yaml")  # what a resume is compared with
            if self.ema is not None:
                ckpt.save_state(self.ema.state_dict(), directory, EMA_STATE)
        ckpt.save_state(ckpt.rng_state(), directory, f"rng-{acc.process_index}")

    def save_checkpoint(self) -> Path:
        """Write a resumable checkpoint atomically (all processes must call this).

        Raises:
            NonFiniteError: a weight is NaN or inf (nothing is written).
        """
        self._refuse_nonfinite_weights("the checkpoint")
        self.state.elapsed_s = self._elapsed()
        path = self.checkpoints.save(f"step-{self.state.global_step:08d}", self._write_checkpoint)
        self.log(f"checkpoint {path}")
        return path

    def _refuse_another_network(self, path: Path, whose: str = "checkpoint's") -> None:
        """Refuse a checkpoint (or ``init_weights``) of another network (``arch`` or a ``model`` key changed), naming the keys.

        Without this a changed width ends in PyTorch's ``Error(s) in loading state_dict``, and a
        changed head count (same shapes) would resume silently as another model. Keys that leave
        the network's weights and function alone may change (:data:`RESUMABLE_MODEL_KEYS`).
        """
        import yaml

        from cmgnet.model.base import CONFIG_NAME
        from cmgnet.yamlio import load_yaml

        saved = None
        network = next((p for p in (path / "model" / CONFIG_NAME, path / CONFIG_NAME) if p.is_file()), None)
        if network is not None:  # save_pretrained's record of the network
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                record = json.loads(network.read_text())
                saved = {"arch": record["model"], "model": record["config"]}
        elif (experiment := path / "experiment.yaml").is_file():  # DeepSpeed checkpoints have no model/
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
                tree = load_yaml(experiment.read_text())
                saved = {"arch": tree["arch"], "model": tree["model"]}
        if not isinstance(saved, dict) or not isinstance(saved["model"], dict):
            return  # nothing to compare with: loading itself names what does not fit
        current = {"arch": self.cfg.arch, "model": to_dict(self.cfg.model)}
        # A key one side lacks is a field added or removed since (built with its default then).
        compared = (saved["model"].keys() & current["model"].keys()) - set(RESUMABLE_MODEL_KEYS)
        for side in (saved, current):
            side["model"] = {k: v for k, v in side["model"].items() if k in compared}
        if changes := config_differences(saved, current):
            shown = ", ".join(changes[:6]) + (f" and {len(changes) - 6} more" if len(changes) > 6 else "")
            advice = ("resume with the original config or start a new run_name" if whose == "checkpoint's" else
                      "start from weights of the same network (train.init_weights)")
            raise CheckpointError(f"the run's config differs from the {whose}: {shown} ({advice})", path)

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimiser, scheduler, scaler, state; RNG is restored at the data position.

        Raises:
            CheckpointError: the checkpoint holds another network (the differing keys named) or
                a file that does not load.
        """
        self._refuse_another_network(path)
        acc = self.accelerator
        self.strategy.load(path, self.model, self.optimizer, self.auxiliary)
        if self.ema is not None:
            if (path / f"{EMA_STATE}.json").exists():
                self.ema.load_state_dict(ckpt.load_state(path, EMA_STATE))
            else:
                self.ema = WeightEMA(self._unwrapped(), self.cfg.train.ema_decay)
                self.log(f"warning: {path} holds no weight average; averaging starts from its weights")
        self.scheduler.load_state_dict(ckpt.load_state(path, "scheduler"))
        if acc.scaler is not None and (path / "scaler.json").exists():
            acc.scaler.load_state_dict(ckpt.load_state(path, "scaler"))
        state = json.loads((path / "trainer_state.json").read_text())
        self.state = TrainState(**state)
        if self.state.world_size != acc.num_processes:
            self.log(f"warning: checkpoint written by {self.state.world_size} processes, resuming on "
                     f"{acc.num_processes}: the data order from here on differs from an uninterrupted run")
            self.state.world_size = acc.num_processes
        rng_file = path / f"rng-{acc.process_index}.json"
        self._pending_rng = ckpt.load_state(path, rng_file.stem) if rng_file.exists() else None
        self.log(f"resumed from {path} (epoch {self.state.epoch}, batch {self.state.batch_in_epoch}, "
                 f"step {self.state.global_step})")

    def save_best(self, metrics: dict[str, Any]) -> Path:
        """Keep the current weights as ``<run>/best/`` (``save_pretrained`` layout + metrics.json)."""
        best = self.run_dir / BEST_DIR
        # A full disk names the file; the previous best/ stays (written aside, then swapped in).
        with self.strategy.full_parameters(self.model), writing(self.run_dir / f".{BEST_DIR}.tmp", "the best weights"):
            if self.is_main:
                tmp = self.run_dir / f".{BEST_DIR}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                self._unwrapped().save_pretrained(tmp)
                for task in self.auxiliary:
                    task.save_best(tmp)
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
                save_config(self.cfg, tmp / "experiment.yaml")
                replace_dir(tmp, best)
        self.accelerator.wait_for_everyone()
        return best

    def load_best(self) -> None:
        """Load ``<run>/best/`` into the model (and classifier) on every process."""
        best = self.run_dir / BEST_DIR
        with self.strategy.full_parameters(self.model, modifier_rank=0):
            self._unwrapped().load_weights(best / WEIGHTS_NAME)
        for task in self.auxiliary:
            task.load_best(best)

    # ------------------------------------------------------------------ the loop
    def _elapsed(self) -> float:
        """Training wall time of this run, earlier (resumed-from) sessions included."""
        return self._elapsed_before + time.perf_counter() - self._t0

    def fit(self) -> TrainResult:
        """Run the whole experiment: train, validate, checkpoint, final evaluation, tracking.

        Returns:
            A :class:`TrainResult`.
        """
        self._t0, self._elapsed_before = time.perf_counter(), 0.0
        try:
            self.setup()
        except BaseException:
            self.release_run_dir()
            raise
        self._t0, self._elapsed_before = time.perf_counter(), self.state.elapsed_s
        status = "FAILED"  # any exception; Ctrl-C and SIGTERM: KILLED (never left RUNNING)
        try:
            with sigterm_as_interrupt():
                self.on_train_start()
                while self.state.epoch < self.cfg.train.epochs and not self._stop:
                    self.on_epoch_start(self.state.epoch)
                    self.train_epoch(self.state.epoch)
                    if self.state.batch_in_epoch >= self.steps_per_epoch * self.cfg.train.grad_accum:
                        self.on_epoch_end(self.state.epoch)
                results = self.on_train_end()
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.tracker.end(status)
            self.release_run_dir()
        best = self.run_dir / BEST_DIR
        return TrainResult(self.run_dir, best if best.exists() else None, self.state, results,
                           self.tracker.uri if self.tracker.reason is None and self.cfg.logging.mlflow else None,
                           self.tracker.run_id)

    def on_train_start(self) -> None:
        """Open the MLflow run (continued on resume) and print what is about to happen."""
        cfg, acc = self.cfg, self.accelerator
        unwrapped = self._unwrapped()
        params = flatten(to_dict(cfg))
        params.update({"model.trainable_parameters": unwrapped.num_parameters(trainable_only=True),
                       "runtime.num_processes": acc.num_processes,
                       "runtime.distributed_type": acc.distributed_type.value,
                       "runtime.mixed_precision": acc.mixed_precision,
                       "runtime.precision_reason": self.precision.reason,
                       "runtime.setup": describe_setup(acc),
                       "runtime.attention_backend": self.attention_backend,
                       "runtime.global_batch": cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes})
        tags = {**git_info(), "run_dir": str(self.run_dir.resolve()), **self.run_tags}
        new_run = self.state.mlflow_run_id is None
        run_id = self.tracker.start(self.run_dir.name, params, tags, run_id=self.state.mlflow_run_id,
                                    description=self.describe_run())
        self.state.mlflow_run_id = run_id or self.state.mlflow_run_id
        self.tracker.log_artifact(self.run_dir / "config.yaml")
        if new_run:
            self._log_dataset()
        self.log(f"run {self.run_dir}  |  {cfg.arch} {unwrapped.num_parameters(trainable_only=True) / 1e6:.2f}M "
                 f"trainable params  |  {describe_setup(acc, self.precision.reason)}  |  {self.steps_per_epoch} steps/epoch x "
                 f"{cfg.train.epochs} epochs, global batch "
                 f"{params['runtime.global_batch']}  |  text: train {cfg.data.text_regime_train}, "
                 f"eval {cfg.data.text_regime_eval}")

    def describe_run(self) -> str:
        """The run's description in the MLflow UI: model, data, protocol, text regimes, schedule."""
        cfg = self.cfg
        sources = " + ".join(f"{s.format} data at `{s.root}` ({s.protocol} splits)" for s in cfg.data.source_configs())
        return (f"{cfg.arch} on {sources}, {cfg.data.image_size} px; text: train `{cfg.data.text_regime_train}`, "
                f"best weights picked in `{cfg.data.text_regime_eval}`; {cfg.train.epochs} epochs, "
                f"{cfg.optim.name} lr {cfg.optim.lr:g}; {describe_setup(self.accelerator)}. Run directory "
                f"`{self.run_dir}`; full config in `config.yaml` and the parameters.")

    def _log_dataset(self) -> None:
        """Each data source as an MLflow dataset input: root, protocol, split sizes and a digest."""
        if not self.tracker.active:
            return
        cfg = self.cfg
        sources = cfg.data.source_configs()
        owners: dict[str, dict[str, str]] = {}
        for split in dict.fromkeys(["train", cfg.eval.val_split, *cfg.eval.splits]):
            try:
                owners[split] = (self.data.source_of(split) if hasattr(self.data, "source_of")
                                 else dict.fromkeys(self.data.diagnoses(split), sources[0].name))
            except (KeyError, ValueError):  # a split this dataset does not have (evaluation skips it too)
                continue
        for source in sources:
            split_keys = {split: keys for split, owner in owners.items()
                          if (keys := [k for k, name in owner.items() if name == source.name])}
            self.tracker.log_dataset(
                source.name, source.root, split_keys,
                {"format": source.format, "protocol": source.protocol, "image_size": cfg.data.image_size,
                 "text_regime_train": cfg.data.text_regime_train, "text_regime_eval": cfg.data.text_regime_eval})

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each (possibly resumed) epoch."""

    def train_epoch(self, epoch: int) -> None:
        """Train one epoch from the saved data position."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        loader = self.data.train_loader(cfg.train.batch_size, epoch)
        n_micro = self.steps_per_epoch * cfg.train.grad_accum
        start = self.state.batch_in_epoch
        batches = iter(loader)
        # Exact data position: the loaders' order and augmentation depend on (seed, epoch,
        # sample) only, so re-reading and dropping the consumed batches replays them exactly.
        for _ in range(start):
            next(batches)
        if self._pending_rng is not None:
            ckpt.set_rng_state(self._pending_rng)
            self._pending_rng = None
        self._epoch_losses: list[float] = []
        self._epoch_t0 = time.perf_counter()
        bar = tqdm(total=n_micro, initial=start, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                   dynamic_ncols=True, disable=not (self.is_main and cfg.logging.progress_bar))
        for index in range(start, n_micro):
            loss = self.training_step(next(batches))
            self.state.batch_in_epoch = index + 1
            self._window.append(loss)
            bar.update(1)
            if self.accelerator.sync_gradients:
                self.state.global_step += 1
                step_loss = sum(self._window) / len(self._window)
                self._window = []
                if math.isfinite(step_loss):  # a skipped step must not turn the epoch's mean into nan
                    self._epoch_losses.append(step_loss)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                self.on_step_end(step_loss)
                if self._stop:
                    break
        bar.close()

    def training_step(self, batch: dict[str, Any]) -> float:
        """Forward, loss, backward and (every ``grad_accum`` micro-steps) an optimiser step.

        Returns:
            The micro-batch loss on this process.
        """
        acc, cfg = self.accelerator, self.cfg
        image = batch["image"].to(acc.device, non_blocking=True)
        if cfg.train.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        mask = batch["mask"].to(acc.device, non_blocking=True)
        models = (self.model, *(task.module for task in self.auxiliary))
        self.model.train()
        with acc.accumulate(*models):
            logits = self.model(image, text=list(batch["text"]))
            loss = self.loss_fn(logits.float(), mask)
            self._flag_nonfinite(loss, 0)
            if not self.strategy.can_skip_steps:  # it steps inside backward: a NaN must stop it before
                self._skip_nonfinite_step()
            acc.backward(loss)
            if acc.sync_gradients and cfg.optim.grad_clip > 0:
                self._grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                if self._grad_norm is not None and acc.scaler is None:  # fp16 loss scaling skips inf gradients itself
                    self._flag_nonfinite(self._grad_norm, 1)
            for task in self.auxiliary:
                self._flag_nonfinite(task.backward(image, batch), 2)
            if acc.sync_gradients and self._skip_nonfinite_step():
                # Nothing of this window is applied: weights, moments, schedule and average stay as they were.
                self.optimizer.zero_grad(set_to_none=True)
                for task in self.auxiliary:
                    task.step(apply=False)
                if acc.scaler is not None and cfg.optim.grad_clip > 0:
                    acc.scaler.update()  # clipping unscaled the gradients: GradScaler needs its update (backs off)
            else:
                self.optimizer.step()
                if acc.sync_gradients and not acc.optimizer_step_was_skipped:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None and acc.sync_gradients:
                    self.ema.update()
                for task in self.auxiliary:
                    task.step(apply=True)
        return float(loss.detach())

    def _flag_nonfinite(self, value: Tensor, slot: int) -> None:
        """Note a NaN/inf loss or gradient norm (on the device, no sync) for the next step's decision."""
        if self._nonfinite is None:
            self._nonfinite = torch.zeros(len(NONFINITE_WHAT), device=self.accelerator.device)
        value = torch.as_tensor(value).detach().to(self._nonfinite.device)
        self._nonfinite[slot] += (~torch.isfinite(value)).any().float()

    def _skip_nonfinite_step(self) -> bool:
        """Whether any rank saw a NaN/inf since the last optimiser step (the same answer on every rank).

        Counts such steps in a row (``state.nonfinite_steps``); a strategy that cannot skip a
        step (DeepSpeed steps inside ``backward``) stops at the first.

        Raises:
            NonFiniteError: more than ``train.max_nonfinite_steps`` in a row; names the step and epoch.
        """
        flags = self._nonfinite if self._nonfinite is not None else torch.zeros(len(NONFINITE_WHAT),
                                                                              device=self.accelerator.device)
        self._nonfinite = None
        flags = self.accelerator.reduce(flags, reduction="sum").tolist()  # DDP: all ranks skip together
        if not any(flags):
            self.state.nonfinite_steps = 0
            return False
        self.state.nonfinite_steps += 1
        if flags[0]:  # a NaN loss makes the gradient norm NaN too: name the cause only
            flags[1] = 0
        names = [name for name, flag in zip(NONFINITE_WHAT, flags) if flag]
        what = f"the {' and the '.join(names)} {'were' if len(names) > 1 else 'was'} NaN or inf"
        where = f"step {self.state.global_step + 1} (epoch {self.state.epoch + 1})"
        limit = self.cfg.train.max_nonfinite_steps if self.strategy.can_skip_steps else 0
        if self.state.nonfinite_steps <= limit:
            self.log(f"warning: {where}: {what}; step skipped ({self.state.nonfinite_steps} in a row, "
                     f"train.max_nonfinite_steps={limit})")
            return True
        why = (self.strategy.why_not if not self.strategy.can_skip_steps else
               f"on {self.state.nonfinite_steps} optimiser step(s) in a row (train.max_nonfinite_steps={limit})")
        raise NonFiniteError(f"training stopped at {where}: {what} {why}; none was applied and nothing non-finite "
                             f"was saved, {self._kept()}; {self._nonfinite_advice()}", self.run_dir)

    def _nonfinite_advice(self) -> str:
        return "lower optim.lr" + (" or set optim.grad_clip" if self.cfg.optim.grad_clip <= 0 else "")

    def _kept(self) -> str:
        """What a stopped run leaves: its last checkpoint and best weights, for messages."""
        latest = self.checkpoints.latest()
        kept = [f"checkpoints/{latest.name}"] if latest is not None else []
        kept += [f"{BEST_DIR}/"] if (self.run_dir / BEST_DIR).is_dir() else []
        return f"{' and '.join(kept)} {'are' if len(kept) > 1 else 'is'} kept" if kept else "no checkpoint was written"

    def _refuse_nonfinite_weights(self, saving: str) -> None:
        """Raise instead of saving NaN/inf weights (network, classifier, average); every rank calls this.

        Raises:
            NonFiniteError: a weight is NaN or inf on any rank; names the step and epoch.
        """
        tensors: dict[str, Tensor] = dict(self._unwrapped().saved_state_dict())
        for task in self.auxiliary:
            tensors |= task.tensors()
        if self.ema is not None:
            tensors |= {f"{EMA_STATE}.{k}": v for k, v in self.ema.shadow.items()}
        bad = nonfinite_tensors(tensors)
        count = self.accelerator.reduce(torch.tensor([float(len(bad))], device=self.accelerator.device), "sum")
        if float(count.sum()) == 0:
            return
        name = repr(bad[0]) if bad else "on another process"
        raise NonFiniteError(f"training stopped at step {self.state.global_step} (epoch {self.state.epoch + 1}): "
                             f"weight {name} is NaN or inf, so {saving} was not saved; {self._kept()}; "
                             f"{self._nonfinite_advice()}", self.run_dir)

    def on_step_end(self, loss: float) -> None:
        """After each optimiser step: step metrics, step checkpoints, stop conditions."""
        cfg, state = self.cfg.train, self.state
        if state.global_step % max(1, cfg.log_every) == 0:
            metrics = {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0], "train/epoch": state.epoch + 1}
            if getattr(self, "_grad_norm", None) is not None:
                metrics["train/grad_norm"] = float(self._grad_norm)
            self.tracker.log_metrics(metrics, step=state.global_step)
        if cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0:
            self.save_checkpoint()
        if cfg.max_steps and state.global_step >= cfg.max_steps:
            self._stop = True
        if cfg.time_limit_minutes > 0:
            # Every rank must agree to stop at the same step: any rank over time triggers all.
            if self._elapsed() > 60 * cfg.time_limit_minutes:
                self.accelerator.set_trigger()
            if self.accelerator.check_trigger():
                self.log(f"time limit of {cfg.time_limit_minutes} min reached at step {state.global_step}")
                self._stop = True
        if self._stop:
            self.save_checkpoint()
            self.validate(state.epoch)  # the latest weights may beat the last epoch's

    def on_epoch_end(self, epoch: int) -> None:
        """Validate when due, keep the best weights, checkpoint, log the epoch."""
        cfg = self.cfg.train
        record: dict[str, Any] = {"epoch": epoch + 1, "step": self.state.global_step,
                                  "train_loss": sum(self._epoch_losses) / max(1, len(self._epoch_losses)),
                                  "epoch_time_s": time.perf_counter() - self._epoch_t0}
        last = epoch + 1 == self.cfg.train.epochs
        if (epoch + 1) % max(1, cfg.val_every) == 0 or last:
            record.update(self.validate(epoch))
        self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0
        self.state.history.append(record)
        # val/* were logged by validate(); step and epoch are the x axes, not values.
        self.tracker.log_metrics({"epoch/train_loss": record["train_loss"], "epoch/time_s": record["epoch_time_s"]},
                                 step=self.state.global_step)
        self.save_checkpoint()
        val = ""
        if "val_dice" in record:
            select = self.cfg.eval.select
            which = "" if select == "all" else f" ({select}; all {record['val_dice']:.4f})"
            val = (f"  val dice {record.get('val_selected_dice', record['val_dice']):.4f}{which} "
                   f"(best {self.state.best_metric:.4f} @ epoch {self.state.best_epoch + 1})")
        self.log(f"epoch {epoch + 1}/{self.cfg.train.epochs}  loss {record['train_loss']:.4f}{val}  "
                 f"lr {self.scheduler.get_last_lr()[0]:.2e}  {record['epoch_time_s']:.1f}s")

    def validate(self, epoch: int) -> dict[str, float]:
        """Score the validation split; keep the best weights by per-image mean Dice.

        With several data sources, ``eval.select`` says which Dice picks them. With
        ``train.ema_decay`` the averaged weights are scored and kept.

        Returns:
            ``val_<metric>`` values (per-image mean) for the epoch record.
        """
        regime = self.cfg.data.text_regime_eval
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            result = self.evaluate(self.cfg.eval.val_split, regime, with_hd95=False)
            metrics = {f"val_{k}": v for k, v in result.summary["per_image_mean"].items() if k != "hd95_undefined"}
            for name, part in result.per_source.items():
                metrics.update({f"val_{name}/{k}": v for k, v in part.summary["per_image_mean"].items()
                                if k != "hd95_undefined"})
            dice = selection_score(result, self.cfg.eval.select)
            if self.cfg.eval.select != "all":
                metrics["val_selected_dice"] = dice
            if math.isfinite(dice) and dice > self.state.best_metric:
                self._refuse_nonfinite_weights(f"{BEST_DIR}/")
                self.state.best_metric, self.state.best_epoch = dice, epoch
                best = self.save_best({"epoch": epoch + 1, "step": self.state.global_step, "split": result.split,
                                       "text_regime": regime, "convention": "per_image_mean",
                                       "weights": "ema" if self.ema is not None else "raw", **result.summary})
                self.tracker.log_metrics({"val/best_dice": dice}, step=self.state.global_step)
                # Logged whenever it changes, so a run stopped midway still has its best weights in MLflow.
                self.tracker.log_artifact(best, BEST_DIR)
        for task in self.auxiliary:
            metrics.update(task.validate(epoch, self._refuse_nonfinite_weights))
        self.tracker.log_metrics({f"val/{k[4:]}": v for k, v in metrics.items() if k[4:] not in UNLOGGED_METRICS},
                                 step=self.state.global_step)
        return metrics

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str, text_regime: str, *, with_hd95: bool, overlay_dir: Path | None = None) -> EvalResult:
        """Sample-exact metrics of the current weights on one split under one text regime."""
        return self.evaluator.evaluate(split, text_regime, with_hd95=with_hd95, overlay_dir=overlay_dir)

    def on_train_end(self) -> list[EvalResult]:
        """Evaluate the best weights on ``eval.splits`` x ``eval.text_regimes``; log everything."""
        best = self.run_dir / BEST_DIR
        if not best.exists():
            self.log("no validation was run: no best weights to evaluate")
            return []
        self.load_best()
        out_root = self.run_dir / "eval"
        results = self.evaluator.run(self.cfg.eval.splits, self.cfg.eval.text_regimes, out_root, log=self.log,
                                     checkpoint=str(best))
        for result in results:
            self.tracker.log_metrics(eval_metrics(result.split, result.text_regime, result.summary),
                                     step=self.state.global_step)
        if self.is_main:
            if results:
                self.log("final evaluation of the best weights:\n" + format_table(results) + "\n"
                         + format_table(results, "pooled"))
                self.tracker.log_artifact(out_root, "eval")
            self.tracker.log_artifact(best, "best")
            if self.cfg.logging.log_model:
                uri = self.tracker.log_model(best)
                if uri:
                    self.log(f"MLflow model: {uri}")
            if self.tracker.active:
                self.log(f"MLflow: {ui_command(self.tracker.uri)}  (run {self.tracker.run_id})")
        return results
