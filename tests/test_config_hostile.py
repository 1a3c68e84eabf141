"""Issue 23, hostile or mistaken configs (and two leftovers): refused at load, one line naming the file or key.

Entry points run in-process (``main(argv)``), stderr captured. Config mistakes are usage
errors (argparse's exit code 2); nothing is written before they are found.
"""

from __future__ import annotations

import dataclasses
import time
import tracemalloc
import typing
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import make_folder, save

from cmgnet.cli import main as cli_main
from cmgnet.data.check import main as check_main
from cmgnet.train.config import ExperimentConfig, load_config, save_config
from cmgnet.train.config_ranges import RANGES
from cmgnet.train.testing import synthetic_dataset, tiny_experiment

SIZE = 32


@pytest.fixture(autouse=True)
def _private_cache(private_cache):
    """Every test here gets its own cache (conftest.private_cache)."""


def run(argv: list[str]) -> int:
    """``cmgnet <argv>`` in-process; argparse's usage errors (SystemExit) give their code."""
    try:
        return cli_main(argv)
    except SystemExit as stop:
        return int(stop.code)


def error_line(capsys, *names: str) -> str:
    """The one ``error:`` line on stderr (argparse prefixes the command), naming every given text."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def billion_laughs(path: Path) -> Path:
    """~400 bytes: nine anchors of nine aliases each, 10^9 strings once expanded, in a valid key."""
    lines = ["data:", "  metadata:", "    - &a [" + ", ".join(['"lol"'] * 9) + "]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"    - &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def config(tmp_path) -> Path:
    """A valid tiny experiment whose runs would go to ``tmp_path/runs``."""
    cfg = tiny_experiment(tmp_path / "no-data", tmp_path / "runs", image_size=SIZE)
    return save_config(cfg, tmp_path / "cfg.yaml")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny saved model with its experiment.yaml (what ``cmgnet evaluate`` reads)."""
    from cmgnet.model import CMGNet
    from cmgnet.train.testing import TINY_MODEL

    root = tmp_path_factory.mktemp("hostile")
    model = CMGNet(load_config(None, [f"model.{k}={v}" for k, v in TINY_MODEL.items()]).model)
    folder = model.save_pretrained(root / "checkpoint")
    save_config(tiny_experiment(root / "no-data", root / "runs", image_size=SIZE), folder / "experiment.yaml")
    return folder


def entry_argv(entry: str, config: Path, checkpoint: Path | None, *overrides: str) -> list[str]:
    if entry == "evaluate":
        return ["evaluate", "--checkpoint", str(checkpoint), *overrides]
    if entry == "evaluate --print-config":
        return ["evaluate", "--checkpoint", str(checkpoint), "--print-config", *overrides]
    return [entry, "--config", str(config), *overrides]


ENTRIES = ["train", "compare", "ablate", "evaluate", "evaluate --print-config"]

# ----------------------------------------------------------------------------- YAML aliases


@pytest.mark.parametrize("entry", ["train", "compare", "ablate", "evaluate"])
def test_a_billion_laughs_config_is_refused_fast_in_bounded_memory(tmp_path, capsys, monkeypatch, checkpoint, entry):
    monkeypatch.chdir(tmp_path)  # the file names no output_dir: runs/ would be made here
    bomb = billion_laughs(tmp_path / "bomb.yaml")
    assert bomb.stat().st_size < 1024
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--config", str(bomb)] if entry == "evaluate" \
        else [entry, "--config", str(bomb)]
    tracemalloc.start()
    start = time.perf_counter()
    try:
        code = run(argv)
        seconds, (_, peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 2
    line = error_line(capsys, bomb, "aliases")
    assert seconds < 2 and peak < 50e6, (seconds, peak)  # unbounded: minutes and gigabytes
    assert len(line) < 300 and "lol" not in line
    assert not (tmp_path / "runs").exists() and not list(checkpoint.glob("eval-*"))


@pytest.mark.parametrize("text, problem", [
    ("a: &a [*a]\n", "contains itself"),
    ("x: &x 1\ny: [" + ", ".join(["*x"] * 101) + "]\n", "more than 100 YAML aliases"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
])
def test_other_alias_abuse_is_refused(tmp_path, text, problem):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem) as caught:
        load_config(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_aliases_within_the_bound_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("eval:\n  splits: &s [val, test]\ndata:\n  metadata: *s\n")
    cfg = load_config(path)
    assert cfg.eval.splits == cfg.data.metadata == ["val", "test"]


def test_an_override_with_bad_yaml_names_the_key(config, capsys):
    assert run(["train", "--config", str(config), "data.metadata=[1,"]) == 2
    line = error_line(capsys, "override data.metadata", "line 1")
    assert "<unicode string>" not in line


# ----------------------------------------------------------------------------- numeric ranges


@pytest.mark.parametrize("override", ["train.epochs=-1", "optim.lr=nan", "train.batch_size=0"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_an_out_of_range_value_is_a_usage_error_before_any_run_folder(tmp_path, capsys, config, checkpoint, entry,
                                                                      override):
    assert run(entry_argv(entry, config, checkpoint, override)) == 2
    key = override.split("=")[0]
    line = error_line(capsys, f"{override}: must be")
    assert line.count(key) == 1
    assert not (tmp_path / "runs").exists() and not list(checkpoint.glob("eval-*"))


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", "optim.lr=0.0: must be > 0"),
    ("optim.lr=.inf", "optim.lr=inf: must be a finite number"),
    ("optim.lr=-1e-3", "optim.lr=-0.001: must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be >= 0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas=[0.9, 1.0]: must be in [0, 1)"),
    ("optim.betas=[0.9, .nan]", "optim.betas[1]=nan: must be a finite number"),
    ("optim.min_lr=1", "optim.min_lr=1.0: must be <= optim.lr"),
    ("loss.dice_weight=-1", "loss.dice_weight=-1.0: must be >= 0"),
    ("train.grad_accum=0", "train.grad_accum=0: must be >= 1"),
    ("train.seed=-3", "train.seed=-3: must be in [0, 4294967295]"),
    ("train.ema_decay=1", "train.ema_decay=1.0: must be in [0, 1)"),
    ("train.max_steps=-1", "train.max_steps=-1: must be >= 0"),
    ("train.time_limit_minutes=-5", "train.time_limit_minutes=-5.0: must be >= 0"),
    ("eval.threshold=1.5", "eval.threshold=1.5: must be in (0, 1)"),
    ("eval.threshold=0", "eval.threshold=0.0: must be in (0, 1)"),
    ("model.modality_dropout=1.2", "model.modality_dropout=1.2: must be in [0, 1]"),
    ("model.base_width=0", "model.base_width=0: must be >= 1"),
    ("model.fusion_dim=15", "model.fusion_dim=15: must be a multiple of model.fusion_heads"),
    ("model.in_channels=1", "model.in_channels=1: the data pipeline gives 3-channel images"),
    ("data.image_size=0", "data.image_size=0: must be >= 16, a multiple of 16"),
    ("data.image_size=40", "data.image_size=40: must be >= 16, a multiple of 16"),
    ("data.std=[0.2, 0, 0.2]", "data.std=[0.2, 0.0, 0.2]: must be > 0"),
    ("data.mean=[0.5, 0.5, 2]", "data.mean=[0.5, 0.5, 2.0]: must be in [0, 1]"),
    ("data.shift_range=0.5", "data.shift_range=0.5: must be in [0, 0.5)"),
    ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
])
def test_each_range_names_its_key(tmp_path, override, message):
    with pytest.raises(ValueError) as caught:
        tiny_experiment(tmp_path, tmp_path / "runs", override, image_size=SIZE)
    assert str(caught.value).startswith(message), str(caught.value)


def test_the_image_size_must_fit_the_models_stride(tmp_path):
    with pytest.raises(ValueError, match=r"data.image_size=48: must be a multiple of 32, the input stride"):
        tiny_experiment(tmp_path, tmp_path / "runs", "model.depth=5", image_size=48)
    assert tiny_experiment(tmp_path, tmp_path / "runs", "model.depth=5", image_size=64).model.stride == 32


def test_compare_section_ranges(tmp_path, capsys, config):
    assert run(["compare", "--config", str(config), "compare.latency_runs=-1"]) == 2
    error_line(capsys, "compare.latency_runs=-1: must be >= 0")


def _numeric(hint) -> bool:
    args = [a for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis]
    if typing.get_origin(hint) in (tuple, list, typing.Union) or type(hint).__name__ == "UnionType":
        return any(_numeric(a) for a in args)
    return hint in (int, float)


def test_every_numeric_config_field_has_a_range():
    from cmgnet.model import list_models, model_class
    from cmgnet.data.sources import SourceConfig
    from cmgnet.train.compare import CompareConfig

    classes = [(name, hint) for name, hint in typing.get_type_hints(ExperimentConfig).items()
               if dataclasses.is_dataclass(hint)]
    classes += [("model", model_class(name).config_class) for name in list_models()]
    classes += [("compare", CompareConfig), ("data.sources", SourceConfig)]
    missing = []
    for prefix, cls in classes:
        for name, hint in typing.get_type_hints(cls).items():
            if _numeric(hint) and f"{prefix}.{name}" not in RANGES:
                missing.append(f"{prefix}.{name} ({cls.__name__})")
    assert not missing, missing
    assert {"data.image_size", "optim.lr", "train.epochs", "model.base_width"} <= set(RANGES)


# ----------------------------------------------------------------------------- long values


@pytest.mark.parametrize("override", [
    "data.format=" + "y" * 5000,
    "logging.progress_bar=" + "z" * 5000,
    "data.metadata=[" + ", ".join(["[1, 2, 3]"] * 3000) + "]",
    "y" * 5000 + "=1",
])
def test_a_long_value_is_shortened_in_the_message(capsys, config, override):
    assert run(["train", "--config", str(config), override]) == 2
    line = error_line(capsys)
    assert len(line) < 400, len(line)
    assert "..." in line or "data.metadata[0]:" in line, line  # the value shortened, or the one bad item named


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_with_another_network_names_the_keys(tmp_path, capsys):
    data = synthetic_dataset(tmp_path / "data", n_train=4, n_val=2, n_test=2, size=SIZE)
    cfg = tiny_experiment(data, tmp_path / "runs", "train.epochs=1", "eval.hd95=false", "eval.overlays=0",
                          "train.diagnosis_classifier=false", image_size=SIZE)
    config = save_config(cfg, tmp_path / "cfg.yaml")
    assert run(["train", "--config", str(config)]) == 0
    step = tmp_path / "runs" / "tiny" / "checkpoints" / "step-00000001"
    weights = (step / "model" / "model.safetensors").read_bytes()
    assert (step / "experiment.yaml").is_file()
    capsys.readouterr()
    for overrides, change in ((["model.base_width=16"], "model.base_width 8 -> 16"),
                              (["model.fusion_heads=4"], "model.fusion_heads 2 -> 4")):  # same shapes: would load
        assert run(["train", "--config", str(config), "train.epochs=2", *overrides]) == 1
        line = error_line(capsys, step, "the run's config differs from the checkpoint's", change)
        assert "state_dict" not in line and "train.epochs" not in line
    assert (step / "model" / "model.safetensors").read_bytes() == weights  # nothing lost
    assert not (tmp_path / "runs" / "tiny" / "checkpoints" / "step-00000002").exists()
    assert run(["train", "--config", str(config), "train.epochs=2", "model.modality_dropout=0.1"]) == 0  # may change


# ----------------------------------------------------------------------------- leftovers: orphan masks


@pytest.mark.parametrize("level", ["header", "full"])
def test_an_orphan_mask_fails_training_as_data_check_reports_it(tmp_path, capsys, level):
    folder = make_folder(tmp_path / "folder", n=6, size=SIZE)
    orphan = save(np.zeros((SIZE, SIZE), np.uint8), folder / "masks" / "ghost.png")  # its image was deleted
    assert check_main([str(folder), "--level", level]) == 1
    assert f"{orphan}: mask without an image" in capsys.readouterr().out
    cfg = tiny_experiment(folder, tmp_path / "runs", "data.format=folder", f"data.validate={level}",
                          "eval.splits=[test]", image_size=SIZE)
    config = save_config(cfg, tmp_path / "cfg.yaml")
    assert run(["train", "--config", str(config)]) == 1
    assert "mask without an image" in error_line(capsys, orphan)
    assert not list((tmp_path / "runs").glob("*/checkpoints/step-*"))
    orphan.unlink()  # agreeing both ways: without it both pass
    assert check_main([str(folder), "--level", level]) == 0


def test_a_bad_value_in_a_file_names_the_file_and_the_key(tmp_path, config):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {config.name}\ntrain:\n  epochs: many\n")
    with pytest.raises(TypeError) as caught:
        load_config(bad)
    assert str(caught.value).startswith(f"{bad}: train.epochs: input should be a valid integer")
    assert load_config(bad, ["train.epochs=3"]).train.epochs == 3  # the override replaces it: nothing to report
    with pytest.raises(ValueError, match=r"^train.batch_size=0: must be >= 1"):  # an override's own fault: no file
        load_config(bad, ["train.epochs=3", "train.batch_size=0"])
