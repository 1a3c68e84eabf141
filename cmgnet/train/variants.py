"""One runner over named model variants: the ablation (paper table 3) and the comparison (tables 1-2).

A :class:`Variant` is ``(arch, model overrides)``: the registered model class and the fields
that differ from the experiment's ``model`` section. Every other field the variant's config
class shares with that section is kept (:func:`cmgnet.model.convert_config`), so the ablation
rows are CMG-Net with switches off, and the baselines get the same encoder widths and text
encoder wherever they have those fields.

:func:`run_variants` trains each variant with the same data (one shared
:class:`~cmgnet.train.data.DataModule`), protocol, augmentation, optimiser, schedule, seed and
budget, evaluates its best weights on one split in the requested text regimes, measures its
cost (parameters, GFLOPs and CPU latency at batch 1), and writes ``<kind>.json`` and
``<kind>.md`` in the paper's table shape. Per variant, ``models/<key>.json`` records the
config fingerprint and, once done, the results: a rerun skips finished variants (and resumes
an interrupted one from its checkpoints), and refuses a record made with another config.
MLflow: one parent run per study, the variants' training runs nested under it.

Image-only variants (no text branch) give the same masks in every text regime: they are
evaluated once and their row is repeated, marked, in every regime's table.

This module imports no torch at import time (``cmgnet ablate --help`` lists the variants fast).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmgnet.errors import one_line
from cmgnet.tables import render

if TYPE_CHECKING:
    from .config import ExperimentConfig, LoggingConfig

logger = logging.getLogger("cmgnet.train")

PAPER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("IoU", "iou"), ("Dice", "dice"), ("Precision", "precision"), ("Recall", "recall"), ("F1", "f1"),
    ("ACC", "accuracy"), ("Thr. Jaccard", "thresholded_jaccard"),
)
"""Table columns (paper tables 1-3 use IoU, Dice, Precision, Recall and F1 or ACC; the ISIC 2017
challenge ranks by thresholded Jaccard, a per-image metric only) -> metric keys."""

IMAGE_ONLY_MARK = "†"


@dataclass(frozen=True)
class Variant:
    """One row of a study.

    Args:
        key: short name (run names, ``--models`` / ``--variants``).
        label: the row label, as in the paper's tables.
        arch: registered model name.
        model: fields that differ from the experiment's ``model`` section.
        note: what the row is (shown under the table).
    """

    key: str
    label: str
    arch: str
    model: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class CostSpec:
    """How the cost columns are measured.

    Args:
        size: square input side of the GFLOPs count and the latency (paper: 256).
        latency_runs: timed forwards (the median is reported); 0 skips latency.
        warmup: untimed forwards before them.
    """

    size: int = 256
    latency_runs: int = 5
    warmup: int = 2


def uses_text(model_config: Any) -> bool:
    """Whether a model config has a text branch (``CMGNetConfig.text`` off, or no text encoder: image-only)."""
    return hasattr(model_config, "text_model") and bool(getattr(model_config, "text", True))


def variant_experiment(cfg: ExperimentConfig, variant: Variant, run_prefix: str) -> ExperimentConfig:
    """The experiment of one variant: its model config, run name ``<run_prefix>-<key>``, all else shared."""
    from cmgnet.model import convert_config

    try:
        model = convert_config(cfg.model, variant.arch, **dict(variant.model))
    except TypeError as err:
        raise ValueError(f"variant {variant.key!r} ({variant.arch}): {err}") from err
    logging_cfg = dataclasses.replace(cfg.logging, run_name=f"{run_prefix}-{variant.key}")
    return dataclasses.replace(cfg, arch=variant.arch, model=model, logging=logging_cfg,
                               name=f"{cfg.name}-{variant.key}")


def fingerprint(cfg: ExperimentConfig) -> str:
    """A hash of everything that decides a variant's result (the ``logging`` section excluded)."""
    from .config import to_dict

    tree = {k: v for k, v in to_dict(cfg).items() if k != "logging"}
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cost(arch: str, model_config: Any, spec: CostSpec) -> dict[str, Any]:
    """Parameters, GFLOPs and CPU latency of a freshly built model at ``spec.size`` px, batch 1.

    FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add:
    many papers' "GFLOPs" are multiply-adds, i.e. half) with attention on the reference
    matmul path so it is counted. Text models get cached text-encoder features (the neutral
    sentence), as in training and serving: the frozen encoder itself is not counted or timed.

    Returns:
        ``{"params_M", "frozen_params_M", "gflops", "latency_ms", "cost_size", "latency_cpu", ...}``.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cmgnet import kernels
    from cmgnet.model import create_model
    from cmgnet.text import NEUTRAL_SENTENCE

    model = create_model(arch, **dataclasses.asdict(model_config)).eval().cpu()
    x = torch.randn(1, getattr(model_config, "in_channels", 3), spec.size, spec.size)
    branch = getattr(model, "text_branch", None)
    args: tuple = (x,)
    if branch is not None:
        with torch.no_grad():
            features, mask = branch.encoder([NEUTRAL_SENTENCE])
        args = (x, features, mask)
    trainable = model.num_parameters(trainable_only=True)
    with torch.no_grad(), kernels.use_backend("reference"):
        counter = FlopCounterMode(display=False)
        with counter:
            model(*args)
    times: list[float] = []
    with torch.inference_mode():
        for i in range(spec.warmup + spec.latency_runs):
            start = time.perf_counter()
            model(*args)
            if i >= spec.warmup:
                times.append(time.perf_counter() - start)
    return {
        "params_M": trainable / 1e6,
        "frozen_params_M": (model.num_parameters() - trainable) / 1e6,
        "gflops": counter.get_total_flops() / 1e9,
        "latency_ms": 1000 * statistics.median(times) if times else math.nan,
        "cost_size": spec.size,
        "latency_cpu": f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }


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
        from .tracking import default_tracking_uri

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

            from .tracking import _probe_http, default_artifact_location

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


def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{scale * value:.{digits}f}"


def _with_ci(value: Any, interval: Sequence[float] | None, scale: float = 100.0) -> str:
    """``88.1 [86.9, 89.2]``: a per-image mean and its 95% interval (the mean alone without one)."""
    if not interval or value is None or (isinstance(value, float) and math.isnan(value)):
        return _fmt(value, scale)
    return f"{_fmt(value, scale)} [{_fmt(interval[0], scale)}, {_fmt(interval[1], scale)}]"


def row_metrics(row: Mapping[str, Any], regime: str) -> Mapping[str, Any] | None:
    """A row's evaluation in ``regime`` (an image-only row's single evaluation stands for every regime)."""
    results = row.get("results", {})
    if regime in results:
        return results[regime]
    if row.get("image_only") and results:
        return next(iter(results.values()))
    return None


def results_table(rows: Sequence[Mapping[str, Any]], convention: str, text_regime: str, split: str,
                  title: str = "Comparison", cost: bool = True) -> str:
    """The paper's table shape: ``Network | IoU | Dice | Precision | Recall | F1 | ACC`` in percent (+ cost).

    Per-image means are followed by their 95% bootstrap interval, ``88.1 [86.9, 89.2]``; the
    pooled table leaves out the per-image-only thresholded Jaccard.

    Args:
        rows: rows of :func:`run_variants` (``results[regime][convention]`` metrics,
            ``results[regime]["per_image_ci95"]`` intervals).
        convention: ``per_image_mean`` or ``pooled`` (named in the caption).
        text_regime: the regime shown.
        split: the split evaluated (named in the caption).
        title: caption prefix.
        cost: add parameters (M, trainable), GFLOPs and CPU latency (ms, batch 1) columns.

    Returns:
        A Markdown table with a caption line.
    """
    from cmgnet.metrics import PER_IMAGE_ONLY

    size = next((r["cost"]["cost_size"] for r in rows if r.get("cost")), 256)
    columns = [(c, k) for c, k in PAPER_COLUMNS if convention == "per_image_mean" or k not in PER_IMAGE_ONLY]
    head = ["Network", *(c for c, _ in columns)]
    if cost:
        head += ["Params (M)", f"GFLOPs@{size}", "CPU ms (b=1)"]
    body = []
    for row in rows:
        result = row_metrics(row, text_regime)
        values = (result or {}).get(convention) or {}
        intervals = ((result or {}).get("per_image_ci95") or {}) if convention == "per_image_mean" else {}
        label = row["label"] + (f" {IMAGE_ONLY_MARK}" if row.get("image_only") else "")
        cells = [label, *(_with_ci(values.get(k), intervals.get(k)) for _, k in columns)]
        if cost:
            c = row.get("cost") or {}
            cells += [_fmt(c.get("params_M"), digits=2), _fmt(c.get("gflops"), digits=2), _fmt(c.get("latency_ms"))]
        body.append(cells)
    caption = f"{title} ({split} split, text regime '{text_regime}', {convention.replace('_', '-')} metrics in %"
    caption += ", [95% CI])" if convention == "per_image_mean" else ")"
    return caption + "\n" + render(head, body, markdown=True)


def budget_text(cfg: ExperimentConfig, budget_minutes: float | None) -> str:
    """The budget every variant got, in words (stated in every report)."""
    t = cfg.train
    batch = f"batch {t.batch_size} x accumulation {t.grad_accum} per process"
    if budget_minutes:
        return (f"equal wall time: {budget_minutes:g} min of training per model (train.time_limit_minutes), "
                f"at most {t.epochs} epochs of {batch}; the LR schedule is laid out for {t.epochs} epochs, "
                f"so a model stopped by the clock has not finished it")
    cap = f"; wall-time cap {t.time_limit_minutes:g} min per model" if t.time_limit_minutes > 0 else ""
    steps = f", at most {t.max_steps} steps" if t.max_steps else ""
    return f"equal epochs: {t.epochs} epochs of {batch}{steps}{cap}"


def report_markdown(report: Mapping[str, Any], title: str, cost: bool = True) -> str:
    """The whole ``<kind>.md``: recipe, then one table per text regime and convention, then notes."""
    rows, split, boot = report["rows"], report["split"], report["bootstrap"]
    lines = [f"# {title}", "", f"- data: {report['data']}", f"- recipe: {report['recipe']}",
             f"- budget: {report['budget']}",
             f"- conventions: per-image = {report['conventions']['per_image_mean']}; "
             f"pooled = {report['conventions']['pooled']}",
             f"- 95% CI of per-image means: {boot['method']}, {boot['resamples']} resamples, seed {boot['seed']}; "
             "Thr. Jaccard = the ISIC 2017 challenge metric (per-image IoU, 0 below 0.65)"]
    if cost:
        c = next((r["cost"] for r in rows if r.get("cost")), None)
        if c:
            lines.append(f"- cost: trainable parameters (frozen text encoder excluded), FLOPs at {c['cost_size']} px "
                         f"(FlopCounterMode, 2 per multiply-add; cached text features), median CPU latency at "
                         f"batch 1 ({c['latency_cpu']})")
    lines.append("")
    for regime in report["text_regimes"]:
        for convention in ("per_image_mean", "pooled"):
            lines += [results_table(rows, convention, regime, split, title, cost), ""]
    lines.append("| Network | epochs | steps | train time (min) | run |")
    lines.append("|---|---|---|---|---|")
    for r in rows:
        lines.append(f"| {r['label']} | {_fmt(r.get('epochs'), digits=2)} | {r.get('steps', 'n/a')} | "
                     f"{_fmt(r.get('train_s', math.nan), 1 / 60, 1)} | `{r['run_dir']}` |")
    if any(r.get("image_only") for r in rows):
        lines += ["", f"{IMAGE_ONLY_MARK} image-only model: the text regime does not reach it; evaluated once "
                  f"(regime '{next(iter(next(r for r in rows if r.get('image_only'))['results']), '')}') and "
                  "shown in every regime."]
    notes = [f"- {r['label']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", "Models:", *notes]
    return "\n".join(lines) + "\n"


def _read_summary(run_dir: Path, split: str) -> dict[str, Any]:
    """``{regime: {"per_image_mean", "pooled", "n_images"}}`` from a run's ``eval/summary.json``."""
    path = run_dir / "eval" / "summary.json"
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())
    return {v["text_regime"]: {"per_image_mean": v["per_image_mean"], "pooled": v["pooled"],
                               "per_image_ci95": v.get("per_image_ci95", {}), "n_images": v["n_images"],
                               "file": str(path)}
            for v in summary.values() if v.get("split") == split}


def run_variants(
    cfg: ExperimentConfig,
    variants: Sequence[Variant],
    *,
    kind: str,
    title: str,
    split: str | None = None,
    text_regimes: Sequence[str] | None = None,
    budget_minutes: float | None = None,
    cost: CostSpec | None = CostSpec(),
    resume: bool = True,
) -> dict[str, Any]:
    """Train, evaluate and measure every variant under one recipe; write ``<kind>.{json,md}``.

    Args:
        cfg: the base experiment (its ``model`` section is what variants override).
        variants: the rows, in table order.
        kind: ``ablation``, ``compare``, ...: output folder ``<output_dir>/<run>-<kind>/``,
            file names and run names ``<run>-<kind>-<key>``.
        title: table caption.
        split: split of the table (default: the first of ``eval.splits``).
        text_regimes: regimes evaluated (default: ``eval.text_regimes``); image-only variants
            are evaluated in the first one that needs no classifier.
        budget_minutes: equal wall time per variant (``train.time_limit_minutes``); ``None``:
            equal epochs (``train.epochs``).
        cost: how to measure the cost columns (``None``: skip them).
        resume: skip variants whose record says done (``False``: refuse to reuse records).

    Returns:
        The report (``rows``, ``split``, ``text_regimes``, ``budget``, ``json``, ``markdown``).

    Raises:
        ValueError: duplicate keys, or a record written with another config for the same run.
    """
    from cmgnet.metrics import CONVENTIONS
    from cmgnet.outputs import lock_on_main
    from cmgnet.stats import BOOTSTRAP

    from .config import to_dict
    from .data import DataModule
    from .engine import Trainer, build_accelerator, describe_setup, resolve_precision
    from .tracking import git_info

    keys = [v.key for v in variants]
    if len(set(keys)) != len(keys):
        raise ValueError(f"variant keys must be unique, got {keys}")
    split = split or (cfg.eval.splits[0] if cfg.eval.splits else cfg.eval.val_split)
    regimes = list(text_regimes or cfg.eval.text_regimes or [cfg.data.text_regime_eval])
    if budget_minutes:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, time_limit_minutes=float(budget_minutes)))
    base = cfg.logging.run_name or cfg.name
    out = Path(cfg.logging.output_dir) / f"{base}-{kind}"
    records = out / "models"
    experiments = {v.key: variant_experiment(cfg, v, f"{base}-{kind}") for v in variants}  # fail before training

    accelerator = build_accelerator(cfg)  # one per process, shared by every variant
    main = accelerator.is_main_process
    data = DataModule(cfg.data, accelerator.process_index, accelerator.num_processes, cfg.train.seed)
    budget = budget_text(cfg, budget_minutes)
    # A second study with this run name fails here, at once (each variant's run directory is locked too).
    lock = lock_on_main(accelerator, out, f"{kind} folder", "wait for it to finish or set another logging.run_name")
    parent = ParentRun(cfg.logging, f"{base}-{kind}", out / "mlflow_parent.json", enabled=main)
    parent.start({"kind": kind, "variants": ",".join(keys), "split": split, "text_regimes": ",".join(regimes),
                  "budget": budget, "data.root": cfg.data.root, "data.protocol": cfg.data.protocol,
                  "data.image_size": cfg.data.image_size},
                 {**git_info(), "cmgnet.study": kind, "output": str(out.resolve())})
    rows: list[dict[str, Any]] = []
    status = "FAILED"
    try:
        for variant in variants:
            vcfg = experiments[variant.key]
            image_only = not uses_text(vcfg.model)
            v_regimes = regimes
            if image_only:  # one evaluation stands for every regime; no classifier needed for it
                v_regimes = [next((r for r in regimes if r != "predicted"), "none")]
                vcfg = dataclasses.replace(vcfg, train=dataclasses.replace(vcfg.train, diagnosis_classifier=False))
            vcfg = dataclasses.replace(vcfg, eval=dataclasses.replace(vcfg.eval, splits=[split],
                                                                      text_regimes=v_regimes))
            stamp = fingerprint(vcfg)
            record_path = records / f"{variant.key}.json"
            record = json.loads(record_path.read_text()) if record_path.exists() else None
            if record is not None and record.get("fingerprint") != stamp:
                raise ValueError(f"{record_path} was written for another config of variant {variant.key!r} "
                                 f"(fingerprint {record.get('fingerprint')} != {stamp}): delete it and "
                                 f"{record.get('run_dir')}, or choose another logging.run_name")
            if record is not None and record.get("status") == "done":
                if not resume:
                    raise ValueError(f"{record_path}: variant {variant.key!r} already done; resume is off")
                if main:
                    logger.info(f"[{kind}] {variant.key}: results exist ({record_path}), not retrained")
                row = record["row"]
                row["results"] = _read_summary(Path(row["run_dir"]), split) or row["results"]  # the files rule
                rows.append(row)
                continue
            row: dict[str, Any] = {"variant": variant.key, "label": variant.label, "arch": variant.arch,
                                   "note": variant.note, "image_only": image_only,
                                   "model_config": to_dict(vcfg.model) if dataclasses.is_dataclass(vcfg.model) else {}}
            row["cost"] = (record or {}).get("cost")
            if cost is not None and row["cost"] is None and main:
                row["cost"] = measure_cost(vcfg.arch, vcfg.model, cost)
            if main:
                records.mkdir(parents=True, exist_ok=True)
                record_path.write_text(json.dumps({"fingerprint": stamp, "status": "training", "cost": row["cost"],
                                                   "run_dir": str(Path(vcfg.logging.output_dir) /
                                                                  vcfg.logging.run_name)}, indent=2) + "\n")
            tags = {"cmgnet.study": kind, "cmgnet.variant": variant.key}
            if parent.run_id:
                tags["mlflow.parentRunId"] = parent.run_id
            if main:
                logger.info(f"[{kind}] training {variant.key} ({variant.label}, arch {variant.arch}); {budget}")
            trainer = Trainer(vcfg, data=data, accelerator=accelerator, run_tags=tags)
            result = trainer.fit()
            state = result.state
            row.update({"run_dir": str(result.run_dir), "mlflow_run_id": result.mlflow_run_id,
                        "steps": state.global_step, "train_s": state.elapsed_s,
                        "epochs": state.global_step / max(1, trainer.steps_per_epoch),
                        "best_epoch": state.best_epoch + 1, "results": _read_summary(result.run_dir, split)})
            if main:
                record_path.write_text(json.dumps({"fingerprint": stamp, "status": "done", "cost": row["cost"],
                                                   "run_dir": row["run_dir"], "row": row}, indent=2,
                                                  allow_nan=True) + "\n")
                parent.log_metrics({f"{variant.key}.{reg}.{conv}.{m}": res[conv][m]
                                    for reg, res in row["results"].items() for conv in ("per_image_mean", "pooled")
                                    for m in ("dice", "iou", "thresholded_jaccard", "precision", "recall",
                                              "accuracy")
                                    if m in res[conv]})
            rows.append(row)
        status = "FINISHED"
    finally:
        report = {"kind": kind, "split": split, "text_regimes": regimes, "budget": budget,
                  "data": f"{cfg.data.format} at {cfg.data.root} (protocol {cfg.data.protocol}, "
                          f"{cfg.data.image_size} px, augment {cfg.data.augment}, train text "
                          f"{cfg.data.text_regime_train}, model selection in {cfg.data.text_regime_eval})",
                  "recipe": f"{cfg.optim.name} lr {cfg.optim.lr:g}, weight decay {cfg.optim.weight_decay:g}, "
                            f"{cfg.optim.schedule} schedule, {cfg.optim.warmup_epochs:g} warm-up epochs, "
                            f"loss {cfg.loss.dice_weight:g} Dice + {cfg.loss.bce_weight:g} BCE, seed {cfg.train.seed}, "
                            f"{describe_setup(accelerator, resolve_precision(cfg).reason)}",
                  "conventions": CONVENTIONS, "bootstrap": BOOTSTRAP, "rows": rows}
        if len(regimes) == 1:
            report["text_regime"] = regimes[0]
        json_path, md_path = out / f"{kind}.json", out / f"{kind}.md"
        if main and rows:
            out.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
            md_path.write_text(report_markdown(report, title, cost is not None))
            parent.log_artifact(json_path)
            parent.log_artifact(md_path)
        parent.end(status)
        if lock is not None:
            lock.release()
    if main and rows:
        print("\n" + md_path.read_text() + f"\nwritten to {json_path} and {md_path}")
    accelerator.wait_for_everyone()
    return {**report, "json": json_path, "markdown": md_path}

