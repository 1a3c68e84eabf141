"""Multi-process runs on CPU: 2-process DDP equals 1 process, 2-rank evaluation counts each image once,
DeepSpeed ZeRO-2 through Accelerate.

This file is also the worker of the DDP test: ``torchrun --nproc_per_node 2 tests/test_train_distributed.py OUT DATA``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ("Asymmetric lesion with irregular borders and multiple colors.", "Skin lesion.")
N_TRAIN, BATCH = 16, 4


class InMemoryData:
    """A :class:`~cmgnet.train.data.LoaderSource` whose shards make DDP and accumulation comparable.

    Training chunk ``c`` of an epoch is the same 4 samples in any world size; rank ``r`` of ``W``
    reads chunks ``r, r + W, ...``, so 2 ranks x 1 micro-batch see exactly what 1 process sees
    in 2 accumulated micro-batches (BatchNorm statistics included).
    """

    def __init__(self, rank: int, world_size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(N_TRAIN, 3, 32, 32, generator=g)
        self.masks = (torch.nn.functional.avg_pool2d(torch.randn(N_TRAIN, 1, 32, 32, generator=g), 5, 1, 2) > 0).float()
        self.rank, self.world_size = rank, world_size

    def train_loader(self, batch_size: int, epoch: int):
        data = self

        class Loader:
            def __len__(self) -> int:
                return N_TRAIN // batch_size // data.world_size

            def set_epoch(self, epoch_: int) -> None:
                pass

            def __iter__(self):
                order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(epoch))
                chunks = order.split(batch_size)[data.rank :: data.world_size]
                for idx in chunks:
                    yield {"image": data.images[idx], "mask": data.masks[idx], "image_id": [f"s{i}" for i in idx.tolist()],
                           "text": [SENTENCES[i % 2] for i in idx.tolist()]}

        return Loader()

    def eval_loader(self, split, batch_size, text_regime, predicted_diagnoses=None):
        shard = torch.arange(N_TRAIN).tensor_split(self.world_size)[self.rank]
        return [{"image": self.images[idx], "mask": self.masks[idx], "image_id": [f"s{i}" for i in idx.tolist()],
                 "text": [SENTENCES[0]] * len(idx)} for idx in shard.split(batch_size)]

    def diagnoses(self, split):
        return {}


def _config(out: Path, data_root: Path, grad_accum: int):
    from cmgnet.train.testing import tiny_experiment

    # SGD: updates are linear in the gradients, so float reduction-order noise stays at that
    # level (Adam's normalisation would amplify it for near-zero gradients).
    return tiny_experiment(data_root, out, "train.epochs=2", f"train.batch_size={BATCH}", f"train.grad_accum={grad_accum}",
                           "optim.name=sgd", "optim.lr=0.05", "model.modality_dropout=0.0", "eval.splits=[]",
                           "train.deterministic=true")


def _train_params(out: Path, data_root: Path, grad_accum: int) -> dict[str, torch.Tensor]:
    from cmgnet.train import Trainer
    from cmgnet.train.engine import build_accelerator

    cfg = _config(out, data_root, grad_accum)
    accelerator = build_accelerator(cfg)
    trainer = Trainer(cfg, data=InMemoryData(accelerator.process_index, accelerator.num_processes), accelerator=accelerator)
    trainer.fit()
    trainer.load_checkpoint(trainer.checkpoints.latest())  # fit() ends on the best weights; compare the last
    return {n: p.detach().clone() for n, p in trainer._unwrapped().named_parameters()}


def _eval_rows(data_root: Path) -> list[dict]:
    """Per-image rows of a fixed tiny model on the 5-image synthetic test split (odd on 2 ranks)."""
    from cmgnet.model import create_model
    from cmgnet.train.data import DataModule
    from cmgnet.train.engine import build_accelerator
    from cmgnet.train.evaluate import Evaluator
    from cmgnet.train.testing import tiny_experiment

    cfg = tiny_experiment(data_root, data_root.parent / "unused", "eval.batch_size=2")
    accelerator = build_accelerator(cfg)
    torch.manual_seed(0)
    model = accelerator.prepare_model(create_model("cmgnet", **cfg.model.__dict__), evaluation_mode=True)
    data = DataModule(cfg.data, accelerator.process_index, accelerator.num_processes)
    return Evaluator(cfg, model, data, accelerator).evaluate("test", "none", with_hd95=True).rows


def worker(out: Path, data_root: Path) -> None:
    """Run inside ``torchrun --nproc_per_node 2``: DDP training, then sharded evaluation."""
    params = _train_params(out, data_root, grad_accum=1)
    rows = _eval_rows(data_root)
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({k: v.contiguous() for k, v in params.items()}, str(out / "ddp_params.safetensors"))
        (out / "ddp_eval_rows.json").write_text(json.dumps(rows))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from cmgnet.train.testing import synthetic_dataset

    return synthetic_dataset(tmp_path_factory.getbasetemp() / "synthetic")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["OMP_NUM_THREADS"] = "1"  # two processes on a 2-core machine
    return env


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_and_eval_counts_each_image_once(data_root, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           __file__, str(out), str(data_root)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Same global batch: 1 process x 2 accumulated micro-batches of 4 == 2 processes x 4.
    single = _train_params(tmp_path / "single", data_root, grad_accum=2)
    ddp = load_file(str(out / "ddp_params.safetensors"))
    assert single.keys() == ddp.keys()
    worst = max((single[k] - ddp[k]).abs().max().item() for k in single)
    assert worst < 1e-5, f"DDP and single-process weights differ by up to {worst}"

    # 5 test images over 2 ranks (3 + 2): each counted once, same metrics as one process.
    ddp_rows = json.loads((out / "ddp_eval_rows.json").read_text())
    single_rows = _eval_rows(data_root)
    assert sorted(r["image_id"] for r in ddp_rows) == sorted(r["image_id"] for r in single_rows)
    assert len(ddp_rows) == len({r["image_id"] for r in ddp_rows}) == 5
    by_id = {r["image_id"]: r for r in single_rows}
    for row in ddp_rows:
        assert row["dice"] == pytest.approx(by_id[row["image_id"]]["dice"], abs=1e-6)


@pytest.mark.slow
def test_deepspeed_zero2_cpu_smoke_through_accelerate(data_root, tmp_path):
    pytest.importorskip("deepspeed")
    from cmgnet.model import SegmentationModel
    from cmgnet.train import save_config
    from cmgnet.train.testing import tiny_experiment

    config = save_config(tiny_experiment(data_root, tmp_path, "train.epochs=1"), tmp_path / "tiny.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "launch" / "accelerate" / "deepspeed_cpu.yaml"), str(REPO / "launch" / "train.py"),
           "--config", str(config)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 process on cpu (DeepSpeed ZeRO-2)" in proc.stdout
    run = tmp_path / "tiny"
    assert list(run.glob("checkpoints/step-*/deepspeed"))
    SegmentationModel.from_pretrained(run / "best")


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
