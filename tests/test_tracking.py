"""MLflow tracking: a run logged to a temporary SQLite store reads back; an unreachable server is harmless."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cmgnet.train import Trainer
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
    assert "test/test/oracle/per_image_mean/dice" in run.data.metrics
    # Artifacts live under the pinned location beside the store.
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").resolve().as_uri())
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "best", "eval"} <= names
    eval_files = {a.path for a in client.list_artifacts(run.info.run_id, "eval/test-oracle")}
    assert {"eval/test-oracle/metrics.json", "eval/test-oracle/per_image.csv", "eval/test-oracle/overlays"} <= eval_files
    assert "best/model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "best")}

    # The logged MLflow model loads (no pickle) and segments.
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    probs = model.predict({"image": np.zeros((2, 3, 32, 32), dtype=np.float32)}, params={"text": ["Skin lesion."]})
    assert probs.shape == (2, 1, 32, 32) and ((0 <= probs) & (probs <= 1)).all()


def test_unreachable_tracking_server_does_not_stop_training(data_root, tmp_path, capsys):
    # Port 9 (discard) on localhost: connection refused at once.
    cfg = tiny_experiment(data_root, tmp_path, "train.epochs=1", "logging.mlflow=true",
                          "logging.tracking_uri=http://127.0.0.1:9")
    result = Trainer(cfg).fit()
    assert result.best_dir is not None and result.tracking_uri is None and result.results
    err = capsys.readouterr().err
    assert err.count("MLflow tracking at http://127.0.0.1:9 is unavailable") == 1
    assert "training continues without tracking" in err
