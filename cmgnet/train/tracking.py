"""MLflow tracking that never stops a run.

:class:`Tracker` wraps the MLflow fluent API for the main process: the default store is a
SQLite file beside the runs (``sqlite:///<output_dir>/mlflow.db``) with the artifact root
pinned to ``<output_dir>/mlartifacts``; any tracking URI works. Every call is guarded: the
first failure (server unreachable, disk full, bad URI) prints one warning naming the URI and
the error, and tracking is off for the rest of the run while training goes on. An HTTP(S)
server is probed once with a short timeout first, so an unreachable one costs seconds, not
MLflow's minutes of retries.

Open the UI on the default store with ``make ui`` (or ``.venv/bin/mlflow ui --backend-store-uri
sqlite:///runs/mlflow.db``).

Names. Per optimiser step: ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/epoch``
(1-based, as in the log). Per epoch: ``epoch/train_loss``, ``epoch/time_s``. Validation:
``val/<metric>`` (per-image mean, in ``data.text_regime_eval``) and ``val/best_dice``. Final
evaluation of the best weights: ``eval/<split>/<regime>/<metric>`` (per-image mean; metrics
include ``thresholded_jaccard``), its 95% bootstrap interval ``.../<metric>_ci95_low`` and
``_ci95_high``, ``eval/<split>/<regime>/pooled/<metric>``, and paired comparisons
``eval/<split>/<a>_minus_<b>/<metric>`` (with ``_ci95_low``/``_ci95_high``; e.g.
``metadata_minus_shuffled``). F1 is not logged: for binary masks it is Dice.
Parameters are the flattened config with values written as YAML/JSON scalars (``null``,
``true``, ``[16, 8]``), plus ``runtime.*``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cmgnet.errors import one_line

from .config import LoggingConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")

PROBE_TIMEOUT_S = 5.0
NOTE_TAG = "mlflow.note.content"  # what the MLflow UI shows as an experiment's or run's description
UNLOGGED_METRICS = frozenset({"f1"})  # equal to Dice for binary masks: one name per value
EXPERIMENT_DESCRIPTION = (
    "CMG-Net text-guided skin-lesion segmentation runs. Each run: the flattened experiment config as "
    "parameters, the training data as a dataset input, per-step `train/*`, per-epoch `epoch/*`, "
    "validation `val/*` and final `eval/<split>/<regime>/...` metrics; artifacts `config.yaml`, `best/` "
    "(updated whenever validation Dice improves), `eval/` (metrics JSON, per-image CSV, overlays) and the "
    "pyfunc `model`."
)


def param_value(value: Any) -> str:
    """A config value as MLflow shows it: YAML/JSON scalars (``null``, ``true``, ``[16, 8]``), strings as is.

    MLflow params are write-once strings of at most 6000 characters.
    """
    if isinstance(value, str):
        text = value
    elif hasattr(value, "value") and isinstance(value.value, str):  # enums such as Accelerate's DistributedType
        text = value.value
    else:
        text = json.dumps(value, default=str)
    return text[:6000]


def eval_metrics(split: str, text_regime: str, summary: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Final-evaluation metric names of one split and regime (see the module docstring).

    Args:
        split: evaluated split.
        text_regime: its text regime.
        summary: ``{"per_image_mean": {...}, "per_image_ci95": {...}, "pooled": {...}, "paired": {...}}``
            (an ``EvalResult.summary``; the interval and paired entries are optional).
    """
    prefix = f"eval/{split}/{text_regime}"
    out = {f"{prefix}/{k}": v for k, v in summary.get("per_image_mean", {}).items() if k not in UNLOGGED_METRICS}
    for k, (low, high) in summary.get("per_image_ci95", {}).items():
        if k not in UNLOGGED_METRICS:
            out.update({f"{prefix}/{k}_ci95_low": low, f"{prefix}/{k}_ci95_high": high})
    out.update({f"{prefix}/pooled/{k}": v for k, v in summary.get("pooled", {}).items() if k not in UNLOGGED_METRICS})
    for name, metrics in summary.get("paired", {}).items():
        for k, d in metrics.items():
            low, high = d["ci95"]
            out.update({f"eval/{split}/{name}/{k}": d["difference"], f"eval/{split}/{name}/{k}_ci95_low": low,
                        f"eval/{split}/{name}/{k}_ci95_high": high})
    return out


def split_digest(split_keys: Mapping[str, Sequence[str]]) -> str:
    """A short content hash of which sample is in which split (changes with the data or the split)."""
    text = json.dumps({split: sorted(map(str, keys)) for split, keys in sorted(split_keys.items())})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While active, SIGTERM (``kill``, a scheduler's pre-emption) raises :class:`KeyboardInterrupt`.

    So the ``finally`` blocks run and the MLflow run ends ``KILLED`` instead of staying
    ``RUNNING``. Only the main thread can install handlers; elsewhere nothing changes.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def default_tracking_uri(cfg: LoggingConfig) -> str:
    """The configured tracking URI, or the SQLite file under ``output_dir``."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    return f"sqlite:///{(Path(cfg.output_dir) / 'mlflow.db').resolve()}"


def default_artifact_location(cfg: LoggingConfig) -> str:
    """The configured artifact root, or ``<output_dir>/mlartifacts`` as a file URI."""
    if cfg.artifact_location:
        return cfg.artifact_location
    return (Path(cfg.output_dir) / "mlartifacts").resolve().as_uri()


def ui_command(tracking_uri: str) -> str:
    """The shell command that opens the MLflow UI on a store (runnable without an activated venv)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    beside = Path(sys.executable).with_name("mlflow")  # this environment's mlflow, if `mlflow` is not on PATH
    program = "mlflow" if shutil.which("mlflow") or not beside.exists() else str(beside)
    return f"{program} ui --backend-store-uri {tracking_uri}"


def git_info(cwd: str | Path | None = None) -> dict[str, str]:
    """Commit hash and dirty flag of the checkout the code runs from (``unknown`` outside git)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}


def _probe_http(uri: str) -> None:
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S)
    except requests.RequestException as err:
        raise ConnectionError(f"tracking server not reachable: {err.__class__.__name__}") from err


def _guarded(method: Callable[..., T]) -> Callable[..., T | None]:
    """Run a tracking call only while tracking is on; the first failure turns it off."""

    @functools.wraps(method)
    def wrapper(self: Tracker, *args: Any, **kwargs: Any) -> T | None:
        if not self.active:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any tracking failure must not stop training
            self.disable(f"{method.__name__}: {one_line(err, with_type=True)}")
            return None

    return wrapper


PYFUNC_REQUIREMENTS = ("cmgnet", "torch", "transformers", "safetensors", "numpy", "pandas", "pillow", "mlflow")


def pinned_requirements(names: tuple[str, ...] = PYFUNC_REQUIREMENTS) -> list[str]:
    """``name==version`` of each installed distribution (a name alone where it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def pyfunc_input_example(checkpoint_dir: str | Path) -> Any:
    """One grey PNG at the model's recorded input size, with the neutral sentence, as a DataFrame."""
    import io

    import pandas as pd
    from PIL import Image

    from cmgnet.inference import InferenceRecord
    from cmgnet.text import NEUTRAL_SENTENCE

    record = InferenceRecord.load(checkpoint_dir) or InferenceRecord()
    buffer = io.BytesIO()
    Image.new("RGB", tuple(reversed(record.image_size)), (128, 100, 90)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [buffer.getvalue()], "text": [NEUTRAL_SENTENCE]})


def log_to_run(directory: Path, run_id: str, tracking_uri: str | None = None, artifact_path: str = "deploy") -> bool:
    """Log a folder (an exported bundle) as artifacts of an existing MLflow run; never raises.

    Args:
        directory: the bundle.
        run_id: the checkpoint's training run.
        tracking_uri: its tracking store (default: ``MLFLOW_TRACKING_URI`` / MLflow's default).
        artifact_path: folder inside the run's artifacts.

    Returns:
        True when logged; False (with a warning on stderr) when MLflow is missing or fails.
    """
    try:
        import mlflow
    except ImportError:
        print("warning: mlflow is not installed (pip install 'cmgnet[train]'); bundle not logged to MLflow",
              file=sys.stderr)
        return False
    # An unreachable server should cost seconds, not MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    try:
        client = mlflow.MlflowClient(tracking_uri)
        client.log_artifacts(run_id, str(directory), artifact_path=artifact_path)
        client.set_tag(run_id, "cmgnet.deploy_bundle", artifact_path)
    except Exception as err:  # noqa: BLE001 - logging is optional: any MLflow failure is reported, not fatal
        uri = tracking_uri or mlflow.get_tracking_uri()
        print(f"warning: could not log the bundle to MLflow run {run_id} at {uri}: {one_line(err, with_type=True)}",
              file=sys.stderr)
        return False
    return True


class Tracker:
    """One MLflow run, driven from the main process; a no-op elsewhere or when disabled.

    Args:
        cfg: logging section (URI, experiment, artifact root, on/off).
        enabled: ``False`` on non-main processes.
    """

    def __init__(self, cfg: LoggingConfig, enabled: bool = True) -> None:
        self.cfg = cfg
        self.uri = default_tracking_uri(cfg)
        self.active = bool(enabled and cfg.mlflow)
        self.run_id: str | None = None
        self.reason: str | None = None

    def disable(self, reason: str) -> None:
        """Turn tracking off and say so once."""
        if self.active:
            self.active = False
            self.reason = reason
            print(f"[cmgnet] MLflow tracking at {self.uri} is unavailable ({reason}); "
                  "training continues without tracking.", file=sys.stderr, flush=True)

    @_guarded
    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
              run_id: str | None = None, description: str | None = None) -> str:
        """Open (or, with ``run_id``, reopen) the run and log params and tags.

        Args:
            run_name: the run's name (new runs only).
            params: flat parameters (values written by :func:`param_value`).
            tags: run tags.
            run_id: reopen this run (a resumed training) instead of creating one.
            description: the run's description in the MLflow UI.

        Returns:
            The MLflow run id (store it in checkpoints so a resumed run continues it).
        """
        if self.uri.startswith(("http://", "https://")):
            _probe_http(self.uri)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in training logs
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        experiment = mlflow.get_experiment_by_name(self.cfg.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else mlflow.create_experiment(self.cfg.experiment, artifact_location=default_artifact_location(self.cfg),
                                          tags={NOTE_TAG: EXPERIMENT_DESCRIPTION})
        )
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                               run_name=None if run_id else run_name, description=description)
        self.run_id = run.info.run_id
        if run_id is None:
            mlflow.log_params({k: param_value(v) for k, v in params.items()})
        mlflow.set_tags(dict(tags))
        return self.run_id

    @_guarded
    def log_dataset(self, name: str, root: str | Path, split_keys: Mapping[str, Sequence[str]],
                    profile: Mapping[str, Any], context: str = "training") -> None:
        """Log the data a run reads as an MLflow dataset input (the UI's "Datasets used").

        Args:
            name: dataset name (e.g. ``isic2018``).
            root: the dataset folder (its source).
            split_keys: split -> sample keys; their sizes go in the profile and their hash
                is the digest, so two runs share a digest exactly when they read the same split.
            profile: further summary fields (format, protocol, text regimes, ...).
            context: the input's role.
        """
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        full_profile = {**profile, **{f"{split}_size": len(keys) for split, keys in split_keys.items()}}

        class ProfiledDataset(MetaDataset):  # MetaDataset carries no profile; the UI shows this one
            @property
            def profile(self) -> dict[str, Any]:
                return full_profile

            def to_dict(self) -> dict[str, str]:
                return {**super().to_dict(), "profile": json.dumps(full_profile)}

        with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns about it
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(Path(root).resolve().as_uri())
        mlflow.log_input(ProfiledDataset(source, name=name, digest=split_digest(split_keys)), context=context)

    @_guarded
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log finite numeric metrics at ``step`` (NaN/inf values are skipped)."""
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if clean:
            mlflow.log_metrics(clean, step=step)

    @_guarded
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a whole directory."""
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    @_guarded
    def log_model(self, checkpoint_dir: str | Path, name: str = "model") -> str:
        """Log a ``save_pretrained`` directory as an MLflow pyfunc model (raw images in, masks out).

        The model applies the checkpoint's inference contract (``inference.json``): see
        :mod:`cmgnet.train.pyfunc_model`. An input example (one small image) and pinned
        requirements are logged with it.

        Returns:
            The model URI (``runs:/<run_id>/<name>``... as MLflow reports it).
        """
        import mlflow
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema

        signature = ModelSignature(
            inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "text", required=False)]),
            outputs=Schema([ColSpec("double", "lesion_fraction"), ColSpec("string", "sentence")]),
        )
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: no pickle
            artifacts={"checkpoint": str(checkpoint_dir)},
            signature=signature,
            input_example=pyfunc_input_example(checkpoint_dir),
            # Explicit and pinned: inferring them would load the model in a subprocess.
            pip_requirements=pinned_requirements(),
        )
        return info.model_uri

    @_guarded
    def end(self, status: str = "FINISHED") -> None:
        """Close the run (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        import mlflow

        mlflow.end_run(status=status)


class ParentRun:
    """The study's MLflow parent run (the variants' runs carry ``mlflow.parentRunId``).

    Uses an ``MlflowClient`` rather than the fluent API, so the parent is never the process'
    active run and each variant's :class:`~cmgnet.train.engine.Trainer` opens its own as
    usual. Like :class:`~cmgnet.train.tracking.Tracker` it never stops the study: the first
    failure prints one warning and turns it off.

    Args:
        cfg: the logging section (tracking URI, experiment, artifact root, on/off).
        name: the parent run's name.
        state_file: where the run id is kept, so a resumed study reuses its parent.
        enabled: ``False`` on non-main processes.
    """

    def __init__(self, cfg: LoggingConfig, name: str, state_file: Path, enabled: bool = True) -> None:
        self.cfg, self.name, self.state_file = cfg, name, state_file
        self.uri = default_tracking_uri(cfg)
        self.active = bool(enabled and cfg.mlflow)
        self.run_id: str | None = None
        self.client: Any = None

    def _fail(self, err: Exception) -> None:
        self.active = False
        print(f"[cmgnet] MLflow parent run at {self.uri} is unavailable ({one_line(err, with_type=True)}); "
              "the study continues without it.",
              file=sys.stderr, flush=True)

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str]) -> str | None:
        """Create the parent run (or reopen the one in ``state_file``); returns its id."""
        if not self.active:
            return None
        try:
            from mlflow.tracking import MlflowClient

            if self.uri.startswith(("http://", "https://")):
                _probe_http(self.uri)  # an unreachable server costs seconds, not MLflow's retries
            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.client = MlflowClient(self.uri)
            saved = json.loads(self.state_file.read_text()).get("run_id") if self.state_file.exists() else None
            if saved:
                try:
                    self.client.get_run(saved)
                    self.run_id = saved
                    self.client.update_run(saved, status="RUNNING")
                    return saved
                except Exception:  # noqa: BLE001 - deleted run or another store: start a new parent
                    pass
            experiment = self.client.get_experiment_by_name(self.cfg.experiment)
            experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(
                self.cfg.experiment, artifact_location=default_artifact_location(self.cfg))
            run = self.client.create_run(experiment_id, tags=dict(tags), run_name=self.name)
            self.run_id = run.info.run_id
            for key, value in params.items():
                self.client.log_param(self.run_id, key, str(value)[:6000])
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri}) + "\n")
            return self.run_id
        except Exception as err:  # noqa: BLE001 - tracking must not stop a study
            self._fail(err)
            return None

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Log finite metrics (at step 0)."""
        if not self.active or self.run_id is None:
            return
        try:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.client.log_metric(self.run_id, key, float(value), step=0)
        except Exception as err:  # noqa: BLE001
            self._fail(err)

    def log_artifact(self, path: Path) -> None:
        if not self.active or self.run_id is None:
            return
        try:
            self.client.log_artifact(self.run_id, str(path))
        except Exception as err:  # noqa: BLE001
            self._fail(err)

    def end(self, status: str = "FINISHED") -> None:
        if not self.active or self.run_id is None:
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as err:  # noqa: BLE001
            self._fail(err)
