"""MLflow tracking: names, values, statuses and inputs of a run read back from a temporary SQLite store.

Also: an unreachable server is harmless, and a killed or crashed run does not stay RUNNING.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from cmgnet.train import Trainer
from cmgnet.train.tracking import EXPERIMENT_DESCRIPTION, param_value, pyfunc_input_example
from cmgnet.train.testing import synthetic_dataset, tiny_experiment

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return synthetic_dataset(tmp_path_factory.getbasetemp() / "synthetic")


def test_run_logs_params_metrics_artifacts_and_model(data_root, tmp_path):
    cfg = tiny_experiment(data_root, tmp_path, "train.epochs=2", "logging.mlflow=true",
                          "eval.text_regimes=[none, oracle]")
    result = Trainer(cfg).fit()
    assert result.tracking_uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"

    client = mlflow.tracking.MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["model.base_width"] == "8"
    assert run.data.tags["git_commit"]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 8  # one per optimiser step
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch/train_loss")] == [4, 8]
    # Epochs count from 1, as in the log.
    assert sorted({m.value for m in client.get_metric_history(run.info.run_id, "train/epoch")}) == [1.0, 2.0]

    names = set(run.data.metrics)
    assert {"eval/test/oracle/dice", "eval/test/oracle/pooled/dice", "eval/test/none/hd95", "val/dice",
            "val/best_dice", "epoch/time_s"} <= names
    # No repeated path segments, one name per value: validation only under val/, no F1 (= Dice).
    assert all(len(set(n.split("/"))) == len(n.split("/")) for n in names), names
    assert not [n for n in names if n.startswith("epoch/val_") or n == "epoch/step" or n.endswith("/f1")]
    assert not [n for n in names if n.startswith("test/")]

    # Parameters are YAML/JSON scalars, never Python reprs.
    params = run.data.params
    assert params["data.metadata"] == "null" and params["train.deterministic"] == "false"
    assert params["runtime.distributed_type"] == "NO" and params["runtime.setup"] == "1 process on cpu, fp32"
    assert params["runtime.precision_reason"] == "train.mixed_precision=no"
    assert json.loads(params["eval.text_regimes"]) == ["none", "oracle"]
    assert not [k for k, v in params.items() if v in ("None", "True", "False") or "DistributedType" in v]

    # Descriptions, and the training data as a dataset input with split sizes and a digest.
    assert run.data.tags["mlflow.note.content"].startswith("cmgnet on isic2017 data")
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.note.content"] == EXPERIMENT_DESCRIPTION
    [dataset_input] = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    profile = json.loads(dataset.profile)
    assert dataset.name == "isic2017" and len(dataset.digest) == 16
    assert (profile["train_size"], profile["val_size"], profile["test_size"]) == (16, 6, 5)
    assert profile["protocol"] == "official" and json.loads(dataset.source)["uri"] == data_root.resolve().as_uri()
    assert [t.value for t in dataset_input.tags if t.key == "mlflow.data.context"] == ["training"]
    # Artifacts live under the pinned location beside the store.
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").resolve().as_uri())
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "best", "eval"} <= names
    eval_files = {a.path for a in client.list_artifacts(run.info.run_id, "eval/test-oracle")}
    assert {"eval/test-oracle/metrics.json", "eval/test-oracle/per_image.csv", "eval/test-oracle/overlays"} <= eval_files
    assert "best/model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "best")}

    # The logged MLflow model loads (no pickle) and segments.
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    out = model.predict(pyfunc_input_example(result.best_dir))  # one encoded image and a sentence
    assert list(out.columns) == ["mask", "lesion_fraction", "sentence"] and 0 <= out["lesion_fraction"][0] <= 1


def test_unreachable_tracking_server_does_not_stop_training(data_root, tmp_path, capsys):
    # Port 9 (discard) on localhost: connection refused at once.
    cfg = tiny_experiment(data_root, tmp_path, "train.epochs=1", "logging.mlflow=true",
                          "logging.tracking_uri=http://127.0.0.1:9")
    result = Trainer(cfg).fit()
    assert result.best_dir is not None and result.tracking_uri is None and result.results
    err = capsys.readouterr().err
    assert err.count("MLflow tracking at http://127.0.0.1:9 is unavailable") == 1
    assert "training continues without tracking" in err


def test_param_values_are_yaml_scalars():
    from accelerate.utils import DistributedType

    assert [param_value(v) for v in (None, True, 3, 1e-3, [16, 8], "oracle", DistributedType.NO)] == \
        ["null", "true", "3", "0.001", "[16, 8]", "oracle", "NO"]


def _only_run(tmp_path: Path):
    client = mlflow.tracking.MlflowClient(f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}")
    [experiment] = [e for e in client.search_experiments() if e.name == "cmgnet"]
    [run] = client.search_runs([experiment.experiment_id])
    return client, run


def test_a_killed_run_ends_killed_with_its_best_weights_logged(data_root, tmp_path, monkeypatch):
    cfg = tiny_experiment(data_root, tmp_path, "train.epochs=3", "logging.mlflow=true")
    epoch_end = Trainer.on_epoch_end

    def end_then_sigterm(self, epoch):
        epoch_end(self, epoch)  # validates: best/ is written and logged
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill <pid>` or a scheduler's pre-emption would

    monkeypatch.setattr(Trainer, "on_epoch_end", end_then_sigterm)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg).fit()
    client, run = _only_run(tmp_path)
    assert run.info.status == "KILLED"
    assert "best/model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "best")}
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after fit()


def test_a_crashed_run_ends_failed(data_root, tmp_path, monkeypatch):
    cfg = tiny_experiment(data_root, tmp_path, "train.epochs=2", "logging.mlflow=true")

    def crash(self, batch):
        raise RuntimeError("simulated crash in the training step")

    monkeypatch.setattr(Trainer, "training_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cfg).fit()
    assert _only_run(tmp_path)[1].info.status == "FAILED"
