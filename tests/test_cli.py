"""CLI conventions: ``usage: cmgnet <cmd>``, exit codes, ``--version``, examples, no heavy imports for --help.

How fast ``--help`` answers is measured by ``benchmarks/cli_startup.py``, not timed here; what
is tested is the cause of slowness: which modules a ``--help`` imports.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import cmgnet
from cmgnet.cli import COMMANDS, main

SUBCOMMANDS = [*(c for c in COMMANDS if c != "data"), "data check"]
HEAVY = ("torch", "transformers", "mlflow", "accelerate", "deepspeed", "onnx", "onnxruntime", "monai")


def _help(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    return stop.value.code, capsys.readouterr().out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_names_the_subcommand_and_ends_with_examples(capsys, command):
    code, out = _help(capsys, *command.split())
    assert code == 0
    assert out.startswith(f"usage: cmgnet {command} ")
    examples = out.split("\nexamples:\n", 1)[1]
    assert f"cmgnet {command}" in examples or "launch/" in examples
    assert "(default: None)" not in out and "(default: False)" not in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cmgnet {cmgnet.__version__}"


def test_unknown_command_is_one_line_and_exit_2(capsys):
    assert main(["trian"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "unknown command 'trian'" in captured.err and "train" in captured.err


def test_top_level_and_data_help_exit_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cmgnet <command>") and all(f"  {c} " in out for c in COMMANDS)
    assert main(["data", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: cmgnet data <command>")
    assert main(["data", "chek"]) == 2
    assert "unknown command 'chek'" in capsys.readouterr().err
    assert main([]) == 2  # no command: the help, on stderr


def test_evaluate_takes_out_and_keeps_output_as_alias(capsys):
    _, out = _help(capsys, "evaluate")
    assert "--out DIR, --output DIR" in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_imports_no_heavy_module(command):
    """``--help`` must answer before torch & co. load (their import is what made it take seconds)."""
    code = (f"import sys\nfrom cmgnet.cli import main\ntry:\n    main({command.split() + ['--help']!r})\n"
            f"except SystemExit:\n    pass\nimport json\n"
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_shipped_config_by_name_and_a_clear_error_for_a_wrong_name():
    from cmgnet.shipped import config_path, list_accelerate_configs, list_configs
    from cmgnet.train.config import load_config

    assert {"demo", "cpu-real", "paper", "isic2017", "isic2018"} <= set(list_configs())
    assert {"cpu", "multi_gpu", "deepspeed_zero2"} <= set(list_accelerate_configs())
    assert load_config("demo").name == "demo" and load_config("isic2018").name == "isic2018"  # base: chains too
    with pytest.raises(FileNotFoundError, match=r"no shipped config of that name \(shipped: .*demo"):
        config_path("dmeo")


def test_attention_backend_is_a_config_field():
    from cmgnet import kernels
    from cmgnet.train.config import load_config
    from cmgnet.train.engine import apply_attention_backend

    before = kernels.get_backend()
    try:
        assert apply_attention_backend(load_config("demo", ["train.attention_backend=reference"])) == "reference"
        assert apply_attention_backend(load_config("demo")) == "reference"  # "": the process setting stays
    finally:
        kernels.set_backend(before)
    with pytest.raises(ValueError, match="attention_backend"):
        load_config("demo", ["train.attention_backend=fast"])
