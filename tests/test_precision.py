"""train.mixed_precision resolution: auto takes bf16 only where the hardware computes it natively."""

from __future__ import annotations

import logging

import pytest
import torch

from cmgnet.train import precision


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given ATen capability and bf16 flags."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(precision, "_warned", False)

    def make(capability: str, avx512_bf16: bool, amx: bool = False) -> None:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    return make


@pytest.mark.parametrize("capability, bf16, amx, expected", [
    ("AVX512", True, False, "bf16"),   # Zen 4, Cooper Lake
    ("AVX512", False, True, "bf16"),   # Sapphire Rapids (AMX)
    ("AVX512", False, False, "no"),    # Skylake-X: AVX-512 without BF16
    ("AVX2", False, False, "no"),      # most laptops, Zen 2/3
    ("AVX2", True, False, "no"),       # ATEN_CPU_CAPABILITY=avx2 on a BF16 CPU: ATen kernels emulate
    ("DEFAULT", False, False, "no"),
])
def test_auto_takes_bf16_only_where_native(cpu, capability, bf16, amx, expected):
    cpu(capability, bf16, amx)
    chosen = precision.resolve("auto", "cpu")
    assert chosen.mixed_precision == expected
    assert chosen.reason.startswith("auto: CPU capability " + capability)
    assert ("no native bf16" in chosen.reason) == (expected == "no")


def test_onednn_isa_cap_below_bf16_means_fp32(cpu, monkeypatch):
    cpu("AVX512", True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    chosen = precision.resolve("auto", "cpu")
    assert chosen.mixed_precision == "no" and "ONEDNN_MAX_CPU_ISA=AVX2" in chosen.reason


def test_explicit_bf16_without_native_support_runs_and_warns_once(cpu, caplog):
    cpu("AVX2", False)
    with caplog.at_level(logging.WARNING, logger="cmgnet.train.precision"):
        first = precision.resolve("bf16", "cpu")
        second = precision.resolve("bf16", "cpu")
    assert first.mixed_precision == second.mixed_precision == "bf16"
    warnings = [r for r in caplog.records if "emulated" in r.getMessage()]
    assert len(warnings) == 1
    assert "10-50x slower than fp32" in warnings[0].getMessage() and "CPU capability AVX2" in warnings[0].getMessage()


def test_explicit_bf16_with_native_support_is_silent(cpu, caplog):
    cpu("AVX512", True)
    with caplog.at_level(logging.WARNING, logger="cmgnet.train.precision"):
        assert precision.resolve("bf16", "cpu").mixed_precision == "bf16"
    assert not caplog.records


def test_explicit_choices_and_launcher_precedence(cpu, monkeypatch):
    cpu("AVX512", True)
    assert precision.resolve("no", "cpu") == precision.Precision("no", "train.mixed_precision=no")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    chosen = precision.resolve("auto", "cpu")
    assert chosen.mixed_precision == "fp16" and chosen.reason == "accelerate launch --mixed_precision=fp16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    with pytest.raises(ValueError, match="mixed_precision must be one of auto, no, bf16, fp16, got 'fp8'"):
        precision.resolve("fp8", "cpu")


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda(cpu, monkeypatch, supported, expected):
    cpu("AVX2", False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert precision.resolve("auto", "cuda").mixed_precision == expected


def test_the_trainer_logs_the_choice_and_its_reason(cpu, monkeypatch):
    from accelerate import Accelerator

    from cmgnet.train.config import load_config
    from cmgnet.train.engine import build_accelerator, describe_setup, resolve_precision

    cpu("AVX2", False)
    cfg = load_config("cpu-pretrained")
    assert cfg.train.mixed_precision == "auto"  # the CPU recipes' default
    chosen = resolve_precision(cfg)
    accelerator = build_accelerator(cfg)
    assert accelerator.mixed_precision == "no"
    assert describe_setup(accelerator, chosen.reason) == (
        "1 process on cpu, fp32 (auto: CPU capability AVX2, no AVX512-BF16/AMX, no native bf16)")
    assert describe_setup(Accelerator(cpu=True)) == "1 process on cpu, fp32"


def test_benchmark_rows_name_the_cpu_capability(tmp_path, cpu, monkeypatch):
    import json

    from cmgnet.benchmarking import write_json

    cpu("AVX2", False)
    write_json(tmp_path / "r.json", [{"step_ms": 1.0}])
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["results"] == [{"step_ms": 1.0, "cpu_capability": "AVX2, emulated bf16"}]
    assert written["hardware"]["cpu_capability"] == "AVX2, emulated bf16"


def test_cpu_isa_runs_a_benchmark_under_both_kernel_sets(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bench = tmp_path / "bench.py"
    bench.write_text("import json, sys, torch\n"
                     "out = sys.argv[sys.argv.index('--out') + 1]\n"
                     "json.dump({'hardware': {}, 'results': [{'seen': torch.backends.cpu.get_cpu_capability()}]}, "
                     "open(out, 'w'))\n")
    out = tmp_path / "merged.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "cpu_isa.py"), "--repeats", "1", "--out", str(out),
                    "--", str(bench)], check=True, timeout=120, capture_output=True)
    rows = json.loads(out.read_text())["results"]
    assert [r["kernels"] for r in rows] == ["native", "avx2"]
    assert rows[1]["seen"] == "AVX2"
