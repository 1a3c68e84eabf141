"""Evaluation: predictions -> per-image metrics -> summary, table, JSON, CSV and overlays.

Sample-exact across processes: every rank scores its own disjoint shard (the evaluation
loaders shard without padding duplicates) and the per-image rows are gathered, so each image
is counted exactly once (:func:`cmgnet.metrics.summarize` refuses duplicates). Every output
names the aggregation convention, the text regime and the split.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image
from torch import nn

from cmgnet.data.config import DataConfig
from cmgnet.data.csvfiles import read_csv, spreadsheet_safe
from cmgnet.data.errors import DataError
from cmgnet.metrics import (
    CONVENTIONS,
    COUNT_KEYS,
    EMPTY_CONVENTION,
    METRICS,
    PER_IMAGE_ONLY,
    per_image_rows,
    summarize,
)

from cmgnet.model.postprocess import clean_masks
from cmgnet.model.tta import flip_tta
from cmgnet.errors import CmgnetError
from cmgnet.outputs import writing
from cmgnet.stats import BOOTSTRAP, format_paired, paired_differences
from cmgnet.tables import render

from .config import ExperimentConfig
from .data import LoaderSource
from .diagnosis import diagnosis_report, vote

TABLE_METRICS: tuple[str, ...] = ("dice", "iou", "thresholded_jaccard", "precision", "recall", "f1", "accuracy",
                                   "hd95")
TABLE_HEADS: dict[str, str] = {"hd95": "hd95(px)", "thresholded_jaccard": "t-jaccard"}
PAIRED_REGIMES: tuple[tuple[str, str], ...] = (("metadata", "shuffled"),)
"""``(a, b)`` text regimes compared image by image whenever a split is evaluated in both: the
``b`` result's summary gets ``paired["<a>_minus_<b>"]`` (metadata minus shuffled: does the model
use its own image's metadata?)."""


@dataclass
class EvalResult:
    """Metrics of one (split, text regime) evaluation.

    Attributes:
        split: the split evaluated.
        text_regime: the sentence regime the model was given.
        summary: :func:`cmgnet.metrics.summarize` output.
        rows: one dict per image (id, counts, metrics).
        info: extra facts written to the JSON (checkpoint, dataset, threshold, ...).
        per_source: with several data sources, the same evaluation of each source's images
            (split ``<split>.<source>``).
    """

    split: str
    text_regime: str
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    per_source: dict[str, EvalResult] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.split}/{self.text_regime}"

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "text_regime": self.text_regime, **self.info, **self.summary}


def describe_sources(data: DataConfig) -> dict[str, Any]:
    """The ``dataset``, ``format`` and ``protocol`` of an evaluation; lists with several sources."""
    sources = data.source_configs()
    if len(sources) == 1:
        return {"dataset": sources[0].root, "format": sources[0].format, "protocol": sources[0].protocol}
    return {key: [getattr(s, attr) for s in sources]
            for key, attr in (("dataset", "root"), ("format", "format"), ("protocol", "protocol"))}


def selection_score(result: EvalResult, select: str = "all") -> float:
    """The validation Dice that picks the best weights.

    Args:
        result: the validation.
        select: ``all`` (per-image mean over every image), ``sources`` (the mean of the data
            sources' per-image means: each source counts alike, whatever its size) or a
            source's name (that source alone).

    Raises:
        ValueError: ``select`` names no source of a several-source result.
    """
    if select == "all" or not result.per_source:  # one source: every choice is its Dice
        return result.summary["per_image_mean"]["dice"]
    if select == "sources":
        return sum(p.summary["per_image_mean"]["dice"] for p in result.per_source.values()) / len(result.per_source)
    if select not in result.per_source:
        raise ValueError(f"eval.select={select!r} names no data source of split {result.split!r} "
                         f"(sources: {', '.join(result.per_source)}); use all, sources or a source name")
    return result.per_source[select].summary["per_image_mean"]["dice"]


def overlay(image: np.ndarray, pred: np.ndarray, target: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Colour an RGB image by agreement: TP yellow, FP red (over-segmentation), FN green (missed).

    Args:
        image: ``H x W x 3`` uint8.
        pred: ``H x W`` bool prediction.
        target: ``H x W`` bool ground truth.
        alpha: colour opacity.

    Returns:
        ``(H + 14) x 2W x 3`` uint8: the input image beside the coloured one, above a colour legend.
    """
    out = image.astype(np.float32).copy()
    for (p, t), (colour, _) in OVERLAY_COLOURS.items():
        where = (pred == p) & (target == t)
        out[where] = (1 - alpha) * out[where] + alpha * np.array(colour, dtype=np.float32)
    picture = np.concatenate([image, out.clip(0, 255).astype(np.uint8)], axis=1)
    return np.concatenate([picture, _legend(picture.shape[1])], axis=0)


OVERLAY_COLOURS = {(True, True): ((255, 220, 0), "lesion"), (True, False): ((230, 30, 30), "false +"),
                   (False, True): ((30, 200, 60), "missed")}
"""(prediction, ground truth) -> (RGB, legend word) of the evaluation overlays."""


def _legend(width: int, height: int = 14) -> np.ndarray:
    """A strip with a coloured square and its word per overlay colour (PIL's built-in font)."""
    from PIL import ImageDraw

    strip = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    x = 2
    for colour, word in OVERLAY_COLOURS.values():
        draw.rectangle([x, 3, x + 8, 11], fill=colour)
        draw.text((x + 11, 1), word, fill=(255, 255, 255))
        x += 11 + int(draw.textlength(word)) + 8
    return np.asarray(strip)


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``3 x H x W`` normalised float tensor -> ``H x W x 3`` uint8."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * s + m).clamp(0, 1) * 255
    return rgb.round().byte().permute(1, 2, 0).numpy()


def _batches_per_rank(accelerator: Accelerator, n: int) -> int:
    counts = gather_object([n]) if accelerator.num_processes > 1 else [n]
    return max(counts)


def _is_zero3(accelerator: Accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


@torch.no_grad()
def predict_rows(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    accelerator: Accelerator,
    *,
    threshold: float = 0.5,
    with_hd95: bool = True,
    overlay_dir: str | Path | None = None,
    n_overlays: int = 0,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    progress: bool = False,
    tta: bool = False,
    postprocess: str = "none",
) -> list[dict[str, Any]]:
    """Run the model over a (sharded) loader and return every image's metrics row, gathered.

    Args:
        model: the (prepared) network; put in eval mode here and left there.
        loader: this rank's shard, yielding ``image, mask, text, image_id`` batches.
        accelerator: gathers rows across processes.
        threshold: probability threshold of the binary prediction.
        with_hd95: compute HD95 per image.
        overlay_dir: where overlay PNGs go (``None``: none written).
        n_overlays: overlays written in total (split evenly over ranks).
        mean, std: the loader's normalisation, to show the image in overlays.
        progress: show a progress bar (main process only).
        tta: flip test-time augmentation (:func:`cmgnet.model.tta.flip_tta`, 4 forwards).
        postprocess: mask post-processing (:func:`cmgnet.model.postprocess.clean_masks`).

    Returns:
        Rows of all ranks (identical list on every rank).
    """
    from tqdm.auto import tqdm

    model.eval()
    rows: list[dict[str, Any]] = []
    per_rank = math.ceil(n_overlays / accelerator.num_processes) if overlay_dir else 0
    written = 0
    if overlay_dir and per_rank:
        Path(overlay_dir).mkdir(parents=True, exist_ok=True)
    n_batches = len(loader) if hasattr(loader, "__len__") else None
    # ZeRO-3 gathers parameters collectively in every forward: ranks must run equally many.
    pad_to = _batches_per_rank(accelerator, n_batches or 0) if _is_zero3(accelerator) else 0
    last = None
    show = progress and accelerator.is_main_process
    bar = tqdm(loader, total=n_batches, desc="eval", leave=False, disable=not show)
    for batch in bar:
        last = batch
        image = batch["image"].to(accelerator.device, non_blocking=True)
        text = list(batch["text"])
        logits = flip_tta(model, image, text=text) if tta else model(image, text=text).float()
        pred = clean_masks(torch.sigmoid(logits) > threshold, postprocess)
        target = batch["mask"].to(pred.device) > 0.5
        ids = [str(i) for i in batch["image_id"]]
        rows.extend(per_image_rows(pred.cpu(), target.cpu(), ids, with_hd95=with_hd95))
        for i in range(min(len(ids), per_rank - written)):
            picture = overlay(denormalize(batch["image"][i], mean, std), pred[i, 0].cpu().numpy(),
                              target[i, 0].cpu().numpy())
            png = Path(overlay_dir) / f"{ids[i].replace('/', '_')}.png"
            with writing(png):
                Image.fromarray(picture).save(png)
            written += 1
    for _ in range(max(0, pad_to - (n_batches or 0))):
        if last is not None:  # a discarded forward keeps ZeRO-3 collectives in step
            model(last["image"].to(accelerator.device), text=list(last["text"]))
    return gather_object(rows) if accelerator.num_processes > 1 else rows


def format_table(results: Sequence[EvalResult], convention: str = "per_image_mean") -> str:
    """A fixed-width table, one row per result, metrics in percent (HD95 in pixels).

    Per-image means have their 95% bootstrap interval on a ``95% CI`` line under the result,
    and the paired comparisons of :data:`PAIRED_REGIMES` follow the table.

    Args:
        results: evaluations to show.
        convention: ``per_image_mean`` or ``pooled`` (named in the header).

    Returns:
        The table text (with a header naming the convention).
    """
    per_image = convention == "per_image_mean"
    metrics = [m for m in TABLE_METRICS if per_image or m not in PER_IMAGE_ONLY]
    head = ["split/text", "n"] + [TABLE_HEADS.get(m, m) for m in metrics]

    def number(v: Any, m: str) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        return f"{v:.2f}" if m == "hd95" else f"{100 * v:.2f}"

    lines = []
    for r in results:
        values = r.summary[convention]
        lines.append([r.label, str(r.summary["n_images"]), *(number(values.get(m, math.nan), m) for m in metrics)])
        intervals = r.summary.get("per_image_ci95") if per_image else None
        if intervals:
            lines.append(["  95% CI", "", *("-".join(number(v, m) for v in intervals[m]) if m in intervals else ""
                                            for m in metrics)])
    title = f"[{convention}: {CONVENTIONS[convention]}; metrics in %"
    if per_image and any(r.summary.get("per_image_ci95") for r in results):
        title += f"; 95% CI: {BOOTSTRAP['method']}, {BOOTSTRAP['resamples']} resamples, seed {BOOTSTRAP['seed']}"
    table = title + "]\n" + render(head, lines)
    paired = {f"{r.split}: {name.replace('_minus_', ' - ')}": d for r in results
              for name, d in r.summary.get("paired", {}).items()}
    if per_image and paired:
        table += "\n" + format_paired(paired, percent=[m for m in METRICS if m != "hd95"])
    return table


def write_result(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.json`` and ``per_image.csv`` for one evaluation.

    Args:
        result: the evaluation.
        out_dir: target folder (created).

    Returns:
        ``{"json": path, "csv": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "metrics.json"
    json_path.write_text(json.dumps(result.to_json(), indent=2, allow_nan=True) + "\n")
    csv_path = out / "per_image.csv"
    columns = ["image_id", *METRICS, *COUNT_KEYS]
    with open(csv_path, "w", newline="") as f:
        # A comment-free CSV stays machine-readable; the convention is in the column set and the JSON.
        writer = csv.DictWriter(f, fieldnames=[*columns, "split", "text_regime"], extrasaction="ignore")
        writer.writeheader()
        for row in sorted(result.rows, key=lambda r: r["image_id"]):
            # Image ids come from file names: inert in a spreadsheet (metrics stay numbers).
            writer.writerow(spreadsheet_safe({**row, "split": result.split, "text_regime": result.text_regime},
                                             ("image_id",)))
    return {"json": json_path, "csv": csv_path}


def read_per_image(path: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """The rows of an evaluation's ``per_image.csv`` (a file or the ``<split>-<regime>/`` folder holding it).

    Returns:
        ``(the CSV file, rows)``: ``image_id`` as written and every other numeric cell as a float
        (an empty cell: NaN).

    Raises:
        CmgnetError: no such file, no ``image_id`` column, no rows or an id listed twice.
        DataError: an unreadable CSV.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "per_image.csv"
    if not path.is_file():
        raise CmgnetError("no such per-image CSV (an evaluation's <split>-<regime>/per_image.csv)", path)
    columns, lines = read_csv(path)
    if "image_id" not in columns:
        raise CmgnetError(f"no image_id column (columns: {', '.join(columns)})", path)
    rows, seen = [], set()
    for number, cells in lines:
        if cells["image_id"] in seen:
            raise CmgnetError(f"row {number}: image {cells['image_id']!r} listed twice", path)
        seen.add(cells["image_id"])
        row: dict[str, Any] = {"image_id": cells["image_id"]}
        for name, cell in cells.items():
            if name == "image_id":
                continue
            try:
                row[name] = float(cell) if cell.strip() else math.nan
            except ValueError:
                row[name] = cell  # split, text_regime
        rows.append(row)
    if not rows:
        raise CmgnetError("no images listed", path)
    return path, rows


def existing_evaluation(out: str | Path) -> list[Path]:
    """Files of an earlier evaluation in ``out``: ``summary.json`` and each ``<split>-<regime>/``'s
    ``metrics.json``, ``per_image.csv`` and overlays."""
    out = Path(out)
    found = [out / "summary.json"] if (out / "summary.json").is_file() else []
    return found + sorted(p for pattern in ("*/metrics.json", "*/per_image.csv", "*/overlays/*.png")
                          for p in out.glob(pattern) if p.is_file())


def build_result(rows: list[dict[str, Any]], split: str, text_regime: str, with_hd95: bool,
                 **info: Any) -> EvalResult:
    """Summarise gathered rows into an :class:`EvalResult` (``info`` goes into the JSON)."""
    info = {"per_image_metrics": "per_image.csv", "empty_masks": EMPTY_CONVENTION, **info}
    return EvalResult(split, text_regime, summarize(rows, with_hd95=with_hd95), rows, info)


def add_paired(results: Sequence[EvalResult]) -> None:
    """Compare the regimes of :data:`PAIRED_REGIMES` image by image, in place.

    For each ``(a, b)`` pair evaluated on the same split, ``b``'s summary gets
    ``paired["<a>_minus_<b>"] = {metric: {"n_images", "mean_a", "mean_b", "difference", "ci95"}}``
    for every per-image metric (:func:`cmgnet.stats.paired_difference`).
    """
    by_key = {(r.split, r.text_regime): r for r in results}
    for a, b in PAIRED_REGIMES:
        for (split, regime), result in by_key.items():
            if regime == b and (split, a) in by_key:
                # F1 is Dice for binary masks; HD95 only where it was computed
                metrics = [m for m in METRICS if m != "f1" and m in result.summary["per_image_mean"]]
                result.summary.setdefault("paired", {})[f"{a}_minus_{b}"] = paired_differences(
                    by_key[split, a].rows, result.rows, metrics)


@torch.no_grad()
def predict_diagnoses(
    classifier: nn.Module, loader: Iterable[Mapping[str, Any]], accelerator: Accelerator
) -> dict[str, str]:
    """Sample id -> predicted diagnosis over a sharded loader (gathered from every rank)."""
    classifier.eval()
    classes = accelerator.unwrap_model(classifier).classes
    pairs: list[tuple[str, str]] = []
    for batch in loader:
        logits = classifier(batch["image"].to(accelerator.device))
        pairs += [(str(i), classes[int(k)]) for i, k in zip(batch["image_id"], logits.argmax(1).cpu())]
    if accelerator.num_processes > 1:
        pairs = gather_object(pairs)
    return dict(pairs)


class Evaluator:
    """Scores a model on any split under any text regime, sample-exactly across processes.

    Args:
        cfg: the experiment (data, eval settings).
        model: the (prepared) segmentation network.
        data: loaders (see :class:`~cmgnet.train.data.LoaderSource`).
        accelerator: the run's accelerator.
        classifier: the diagnosis classifier for the ``predicted`` regime, if any.
    """

    def __init__(self, cfg: ExperimentConfig, model: nn.Module, data: LoaderSource, accelerator: Accelerator,
                 classifier: nn.Module | None = None) -> None:
        self.cfg, self.model, self.data, self.accelerator, self.classifier = cfg, model, data, accelerator, classifier

    @property
    def batch_size(self) -> int:
        return self.cfg.eval.batch_size or self.cfg.train.batch_size

    def predicted_diagnoses(self, split: str) -> dict[str, str]:
        """Diagnoses of a split's samples predicted from the images by the classifier."""
        if self.classifier is None:
            raise RuntimeError("text regime 'predicted' needs the diagnosis classifier: train with "
                               "'predicted' in eval.text_regimes (train.diagnosis_classifier=true)")
        loader = self.data.eval_loader(split, self.batch_size, "none")
        return predict_diagnoses(self.classifier, loader, self.accelerator)

    def evaluate(self, split: str, text_regime: str, *, with_hd95: bool, overlay_dir: Path | None = None,
                 tta: bool = False, **info: Any) -> EvalResult:
        """Metrics of the current weights on one split under one text regime.

        Args:
            split: split name.
            text_regime: ``none``, ``metadata``, ``shuffled``, ``predicted`` or ``oracle``.
            with_hd95: compute HD95.
            overlay_dir: write ``eval.overlays`` overlay PNGs there (``None``: none).
            tta: flip test-time augmentation.
            info: extra facts for the JSON.

        Returns:
            The :class:`EvalResult` (identical on every process).
        """
        info = {"threshold": self.cfg.eval.threshold, "tta": tta, "postprocess": self.cfg.eval.postprocess,
                "image_size": self.cfg.data.image_size, **describe_sources(self.cfg.data), **info}
        predicted = diagnosis_for = None
        if text_regime == "predicted":
            raw = self.predicted_diagnoses(split)  # per sample key, as truth and the sources are keyed
            truth = self.data.diagnoses(split)
            try:
                train = Counter(d for d in self.data.diagnoses("train").values() if d and d != "unknown")
            except DataError:  # a test-only folder: the classifier ships with the model, no baseline
                train = Counter()
            majority = train.most_common(1)[0][0] if train else None

            def scored_over(keys: Any = None) -> dict[str, Any]:  # the classifier's report over some samples
                scored = diagnosis_report({k: v for k, v in raw.items() if keys is None or k in keys},
                                          {k: v for k, v in truth.items() if keys is None or k in keys}, majority)
                return {"diagnosis": scored, "diagnosis_accuracy": scored.get("accuracy")}  # None: none known

            diagnosis_for = scored_over
            info |= scored_over()
            predicted = vote(raw)
        loader = self.data.eval_loader(split, self.batch_size, text_regime, predicted)
        rows = predict_rows(self.model, loader, self.accelerator, threshold=self.cfg.eval.threshold,
                            with_hd95=with_hd95, overlay_dir=overlay_dir,
                            n_overlays=self.cfg.eval.overlays if overlay_dir else 0,
                            mean=self.cfg.data.mean, std=self.cfg.data.std, tta=tta,
                            postprocess=self.cfg.eval.postprocess)
        result = build_result(rows, split, text_regime, with_hd95, **info)
        source_of = self.data.source_of(split) if hasattr(self.data, "source_of") else {}
        if len(set(source_of.values())) > 1:
            for name in dict.fromkeys(source_of.values()):
                keys = {k for k, owner in source_of.items() if owner == name}
                own = diagnosis_for(keys) if diagnosis_for is not None else {}
                part = build_result([r for r in rows if r["image_id"] in keys], f"{split}.{name}",
                                    text_regime, with_hd95, **(info | own), source=name)
                result.per_source[name] = part
            result.summary["per_source"] = {name: part.summary for name, part in result.per_source.items()}
        return result

    def run(self, splits: Sequence[str], text_regimes: Sequence[str], out_root: Path | None,
            log: Any = print, **info: Any) -> list[EvalResult]:
        """Evaluate every split x regime; write ``<out_root>/<split>-<regime>/`` and ``summary.json``.

        A split the dataset does not have is skipped with a message; so is ``predicted``
        without a classifier. A split evaluated in both regimes of a :data:`PAIRED_REGIMES` pair
        gets their paired comparison (:func:`add_paired`).

        Returns:
            The results, in order.
        """
        results: list[EvalResult] = []
        main = self.accelerator.is_main_process
        for split in splits:
            try:  # a split the dataset lacks is skipped; a bad file in one that exists is an error
                self.data.diagnoses(split)
            except DataError as err:
                if main:
                    log(f"skipping split {split!r}: {err}")
                continue
            done: list[EvalResult] = []
            for regime in text_regimes:
                if regime == "predicted" and self.classifier is None:
                    if main:
                        log("skipping text regime 'predicted': no diagnosis classifier")
                    continue
                out = out_root / f"{split}-{regime}" if out_root is not None else None
                done.append(self.evaluate(split, regime, with_hd95=self.cfg.eval.hd95, tta=self.cfg.eval.tta,
                                          overlay_dir=out / "overlays" if out else None, **info))
            for source in dict.fromkeys(name for result in done for name in result.per_source):
                done += [r.per_source[source] for r in done if source in r.per_source]
            add_paired(done)
            results += done
            if main and out_root is not None:  # written once the split's pairs are compared
                for result in done:
                    out = out_root / f"{result.split}-{result.text_regime}"
                    with writing(out, "the evaluation"):
                        write_result(result, out)
        if main and out_root is not None and results:
            summary = {r.label: r.to_json() for r in results}
            with writing(out_root / "summary.json"):
                (out_root / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
        self.accelerator.wait_for_everyone()
        return results
