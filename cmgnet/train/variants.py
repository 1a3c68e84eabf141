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

It imports no torch at import time (``cmgnet ablate --help`` lists the variants fast). The cost columns are
measured by :mod:`cmgnet.train.cost`, the tables written by :mod:`cmgnet.train.reports`, the parent run kept
by :class:`cmgnet.train.tracking.ParentRun`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cost import CostSpec, measure_cost
from .reports import report_markdown

if TYPE_CHECKING:
    from .config import ExperimentConfig

logger = logging.getLogger("cmgnet.train")


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
    from .tracking import ParentRun, git_info

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
                  "budget": budget, "data.root": ",".join(s.root for s in cfg.data.source_configs()),
                  "data.protocol": ",".join(s.protocol for s in cfg.data.source_configs()),
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
                  "data": f"{cfg.data.describe()}; {cfg.data.image_size} px, augment {cfg.data.augment}, train text "
                          f"{cfg.data.text_regime_train}, model selection in {cfg.data.text_regime_eval}",
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

