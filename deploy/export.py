"""Checkpoint -> deployment bundle: ONNX (checked), text features, optional int8, TensorRT, MLflow.

    cmgnet export CHECKPOINT --out DIR [--overwrite] [--max-batch 32] [--force --image-size N ...]
                  [--tensorrt auto|require|skip] [--precision fp16] [--torch-tensorrt]
                  [--int8-calibration IMAGES...] [--mlflow-run-id RUN]
                  [--triton-repo DIR [--triton-instances N] [--ort-tensorrt-fp16]]

``--triton-repo`` also lays the bundle out as a Triton model repository
(:mod:`cmgnet.deploy.triton_repo`); without ``--out`` the bundle is only a temporary step.

The ONNX graph is the segmentation network alone, with inputs ``image`` (``B x 3 x H x W``,
normalised), ``text_features`` (``B x L x D_t``: the frozen text encoder's last hidden states,
``L`` = the config's ``text_max_length``) and ``text_mask`` (``B x L`` bool, True for real
tokens), output ``logits`` (``B x 1 x H x W``). Batch and image sides are dynamic (sides
multiples of 16). It is exported with PyTorch's ``torch.export``-based exporter at opset 18 (the
lowest that exporter emits; TensorRT >= 10 parses it), with attention through plain
``scaled_dot_product_attention``, then checked with the ONNX checker and against PyTorch with
ONNX Runtime at several batch sizes.

Image size, normalisation, centre crop, threshold, text regime, TTA and post-processing are not
retyped: the checkpoint's ``inference.json`` (written at training time, see :mod:`cmgnet.inference`)
is the bundle's ``inference.json``, with the bundle's own fields added (network name, opset, text
cache and weights files, network config). ``--image-size/--mean/--std/--threshold`` that
contradict it are refused unless ``--force``.

The text encoder is not part of the graph: its features for the neutral sentence and every
diagnosis template are precomputed into the bundle's ``text_cache/``; any other sentence is
encoded once at run time by the same (frozen) encoder and cached. See :mod:`cmgnet.deploy.spec`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from cmgnet import kernels
from cmgnet.data.imageio import IMAGE_EXTENSIONS
from cmgnet.errors import UsageError, cli_entry
from cmgnet.inference import INFERENCE_NAME, LEGACY_BUNDLE_NAME, InferenceRecord, image_hw, resolve
from cmgnet.model import SegmentationModel
from cmgnet.outputs import OutputLock, refuse_existing, writing
from cmgnet.text import NEUTRAL_SENTENCE, TextFeatureCache
from cmgnet.text.pseudo_text import TEMPLATES

from .errors import BackendUnavailableError, DeployError
from .runners import load_image, network_inputs, onnxruntime_session, resolve_model_path, serving_record
from .spec import (
    DEFAULT_OPSET,
    ENGINE_NAME,
    IMAGE_INPUT,
    INT8_ONNX_NAME,
    ONNX_NAME,
    OUTPUT_NAME,
    RECORD_NAME,
    TEXT_CACHE_DIR,
    TEXT_WEIGHTS_NAME,
    TORCH_TRT_NAME,
)

INT8_AGREEMENT_NAME = "model.int8.agreement.json"
STANDARD_SENTENCES = tuple(dict.fromkeys([NEUTRAL_SENTENCE, *TEMPLATES.values()]))
"""Sentences whose features every bundle carries: the neutral one and each diagnosis template."""


# ----------------------------------------------------------------------------- ONNX


def _random_images(count: int, size: tuple[int, int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def export_onnx(model: SegmentationModel, record: InferenceRecord, path: str | Path, *, dynamic_size: bool = True,
                opset: int = DEFAULT_OPSET) -> Path:
    """Export the network (image + text features + mask -> logits) to ONNX.

    Args:
        model: the network (CPU; put in eval mode).
        record: its inference record (image size, text length; embedded in the ONNX metadata too).
        path: output ``.onnx`` file (weights inline up to ONNX's 2 GB limit, external beyond).
        dynamic_size: dynamic image height/width (multiples of the stride) besides the
            dynamic batch; ``False`` fixes them to ``record.image_size`` (a faster export).
        opset: ONNX opset (18 or newer: the ``torch.export`` exporter's range).

    Returns:
        ``path``.
    """
    model = model.eval().cpu()
    example = network_inputs(model, record, _random_images(2, record.image_size, 0), [NEUTRAL_SENTENCE] * 2)
    dims = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    dynamic = {name: (dims if name == IMAGE_INPUT else {0: "batch"}) for name in example}
    for chatter in ("torch.onnx", "onnx_ir", "onnxscript"):  # per-op registration and pass notes, not problems
        logging.getLogger(chatter).setLevel(logging.ERROR)
    # SDPA exports to plain MatMul/Softmax that ONNX Runtime and TensorRT fuse; Triton kernels would not export.
    with torch.no_grad(), kernels.use_backend("sdpa"), warnings.catch_warnings():
        # Exporter-internal notices: the three inputs share one "batch" axis on purpose.
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)", category=FutureWarning)
        program = torch.onnx.export(
            model, tuple(example.values()), dynamo=True, opset_version=opset, input_names=list(example),
            output_names=[OUTPUT_NAME], dynamic_shapes=dynamic, optimize=True, verbose=False,
        )
    program.model.metadata_props["cmgnet.inference"] = json.dumps(record.to_json())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return path


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime vs PyTorch on the same inputs at one batch size.

    Attributes:
        batch: batch size.
        max_abs_diff: largest logit difference.
        mask_flips: pixels whose mask differs while PyTorch's logit is clearly away from the
            threshold (|logit| above the tolerance); 0 means the same mask.
        tolerance: the allowed difference, ``atol * max(1, max |logit|)``.
    """

    batch: int
    max_abs_diff: float
    mask_flips: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.mask_flips == 0


def verify_onnx(
    path: str | Path,
    model: SegmentationModel,
    record: InferenceRecord,
    batch_sizes: Sequence[int] = (1, 2, 4),
    atol: float = 1e-3,
    seed: int = 0,
) -> list[Parity]:
    """Check an exported file: ONNX checker, then ONNX Runtime vs PyTorch at each batch size.

    Inputs are random images at the record's size with the standard sentences (real text
    features with padding), so the text path and its mask are exercised.

    Returns:
        One :class:`Parity` per batch size.

    Raises:
        DeployError: the checker rejects the model, logits differ by more than ``atol``
            relative to the logits' scale (absolute below 1), or a mask differs.
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise DeployError(f"{path}: ONNX checker: {err}") from err
    session = onnxruntime_session(path)
    model = model.eval().cpu()
    results = []
    for batch in batch_sizes:
        sentences = [STANDARD_SENTENCES[i % len(STANDARD_SENTENCES)] for i in range(batch)]
        inputs = network_inputs(model, record, _random_images(batch, record.image_size, seed + batch), sentences)
        with torch.no_grad():
            expected = model(*inputs.values()).numpy()
        got = session.run([OUTPUT_NAME], {k: v.numpy() for k, v in inputs.items()})[0]
        # fp32 rounding differences grow with the logits' magnitude; a flip counts only away from the threshold.
        tolerance = atol * max(1.0, float(np.abs(expected).max()))
        flips = ((expected > 0) != (got > 0)) & (np.abs(expected) > tolerance)
        results.append(Parity(batch, float(np.abs(expected - got).max()), int(flips.sum()), tolerance))
    if bad := [r for r in results if not r.ok]:
        raise DeployError(f"{path}: ONNX Runtime disagrees with PyTorch: {bad}")
    return results


# ----------------------------------------------------------------------------- bundle


def write_text_assets(
    model: SegmentationModel, record: InferenceRecord, bundle: Path, sentences: Sequence[str] = ()
) -> InferenceRecord:
    """Precompute text features into ``bundle/text_cache`` (and save fine-tuned encoder weights).

    Args:
        model: the network (its text encoder is used, fine-tuned or not).
        record: the record to complete.
        bundle: the bundle folder.
        sentences: sentences to cache besides :data:`STANDARD_SENTENCES`.

    Returns:
        ``record`` with ``text_cache`` (and ``text_weights``) set; unchanged for image-only models.
    """
    if record.text_model is None:
        return record
    encoder = model.text_branch.encoder
    weights = None
    if not encoder.freeze:
        # A fine-tuned encoder is not the published model the id names: ship its weights.
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.backbone.state_dict().items()}
        save_file(state, str(bundle / TEXT_WEIGHTS_NAME))
        weights = TEXT_WEIGHTS_NAME
    cache = TextFeatureCache(bundle / TEXT_CACHE_DIR)
    wanted = list(dict.fromkeys([*STANDARD_SENTENCES, *sentences]))
    with torch.no_grad():
        features, mask = encoder.encode_live(wanted)
    for sentence, f, m in zip(wanted, features, mask):
        cache.put(encoder.model_id, sentence, f[m])
    cache.save()
    return replace(record, text_weights=weights, text_cache=TEXT_CACHE_DIR)


@dataclass
class ExportResult:
    """What :func:`export_bundle` wrote."""

    bundle: Path
    record: InferenceRecord
    onnx: Path
    parity: list[Parity]

    @property
    def spec(self) -> InferenceRecord:
        """The record (its name before the deploy spec and the record became one)."""
        return self.record


def export_bundle(
    model: SegmentationModel,
    out_dir: str | Path,
    *,
    image_size: int | tuple[int, int] | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    threshold: float | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_size: bool = True,
    verify_batches: Sequence[int] = (1, 2, 4),
    sentences: Sequence[str] = (),
) -> ExportResult:
    """Write a bundle: ``inference.json``, ``model.onnx`` (verified) and the text assets.

    Args:
        model: the network.
        out_dir: bundle folder (created; existing files are replaced).
        image_size, mean, std, threshold: pre/post-processing (see :class:`~cmgnet.inference.InferenceRecord`);
            ``None``: the model's inference record (``model.inference``), else the defaults.
        opset, dynamic_size: see :func:`export_onnx`.
        verify_batches: batch sizes of the parity check (empty: skip it).
        sentences: extra sentences to precompute.

    Returns:
        The paths, record and parity results.
    """
    bundle = Path(out_dir)
    bundle.mkdir(parents=True, exist_ok=True)
    # A record left from an earlier export must not vouch for a model.onnx that then fails its check.
    for name in (RECORD_NAME, LEGACY_BUNDLE_NAME):
        (bundle / name).unlink(missing_ok=True)
    given = {"image_size": image_hw(image_size) if image_size is not None else None, "mean": mean, "std": std,
             "threshold": threshold}
    record = serving_record(model)
    record = replace(record, **{k: v for k, v in given.items() if v is not None}, opset=opset,
                     network_config=json.loads(json.dumps(dataclasses.asdict(model.config))))
    record = write_text_assets(model, record, bundle, sentences)
    onnx_path = export_onnx(model, record, bundle / ONNX_NAME, dynamic_size=dynamic_size, opset=opset)
    parity = verify_onnx(onnx_path, model, record, verify_batches) if verify_batches else []
    record.save(bundle / RECORD_NAME)
    return ExportResult(bundle, record, onnx_path, parity)


def calibration_inputs(
    model: SegmentationModel, record: InferenceRecord, images: Sequence[Path]
) -> list[dict[str, np.ndarray]]:
    """Batch-1 network inputs for int8 calibration: each image with a standard sentence in turn."""
    feeds = []
    for i, path in enumerate(images):
        inputs = network_inputs(model, record, [load_image(path)], [STANDARD_SENTENCES[i % len(STANDARD_SENTENCES)]])
        feeds.append({k: v.numpy() for k, v in inputs.items()})
    return feeds


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (non-recursively) in the given folders, sorted per folder."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        else:
            found.append(path)
    return found


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    """The ``cmgnet export`` parser (defined in :mod:`cmgnet.deploy.cli`, which imports no torch)."""
    from .cli import export_parser

    return export_parser()


def checkpoint_dir(path: str | Path) -> Path:
    """A ``save_pretrained`` folder from a shipped name, that folder, a run (``best/``) or a checkpoint (``model/``)."""
    path = resolve_model_path(path)
    for candidate in (path, path / "best", path / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    return path  # from_pretrained names what is missing


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """``cmgnet export``; returns the exit code (0 ok, 1 a step failed).

    Raises:
        CheckpointError, DeployError, UsageError: reported as one line by ``cli_entry``.
    """
    args = _parser().parse_args(argv)
    if args.out is None and args.triton_repo is None:
        raise UsageError("give --out DIR (a bundle), --triton-repo DIR (a Triton model repository) or both")
    if args.out and args.triton_repo and Path(args.out).resolve() == Path(args.triton_repo).resolve():
        raise UsageError("--out and --triton-repo must be different folders")
    with contextlib.ExitStack() as stack:
        if args.out is None:  # only the repository is wanted: the bundle is a step towards it
            args.out = stack.enter_context(tempfile.TemporaryDirectory(prefix="cmgnet-bundle-"))
        bundle = Path(args.out)
        with OutputLock(bundle):  # a second export into the same --out fails at once
            refuse_existing(bundle, existing_bundle(bundle), args.overwrite, "a bundle")
            if args.triton_repo:
                _check_triton_repo(args)
            failed = _export(args)
            if args.triton_repo:
                _write_triton_repo(args, bundle)
        # Logged once the lock is released, so its file is not among the artefacts.
        if args.mlflow_run_id:
            from cmgnet.train.tracking import log_to_run  # MLflow only when asked
        if args.mlflow_run_id and log_to_run(bundle, args.mlflow_run_id, args.mlflow_tracking_uri):
            print(f"logged {bundle} to MLflow run {args.mlflow_run_id} (artifacts/deploy)")
    return 1 if failed else 0


def _check_triton_repo(args: argparse.Namespace) -> None:
    """Refuse a repository folder that holds models already, unless ``--overwrite``, before exporting anything."""
    from .triton_repo import repository_models

    repo = Path(args.triton_repo)
    refuse_existing(repo, repository_models(repo), args.overwrite, "a model repository")


def _write_triton_repo(args: argparse.Namespace, bundle: Path) -> None:
    from .triton_repo import Batching, repository_models, write_triton_repository

    repo = Path(args.triton_repo)
    with OutputLock(repo), writing(repo, "the model repository"):
        for stale in repository_models(repo):  # --overwrite replaces: no model of an earlier export stays
            shutil.rmtree(stale)
        configs = write_triton_repository(bundle, repo, batching=Batching(instances=args.triton_instances),
                                          network_max_batch=args.max_batch, tensorrt_fp16=args.ort_tensorrt_fp16)
    print(f"wrote Triton model repository {repo}: models {', '.join(c.parent.name for c in configs)} "
          "(serve it with NVIDIA's tritonserver container; README, Serving)")


def existing_bundle(bundle: Path) -> list[Path]:
    """Files of an earlier export in ``bundle`` (its record, the model files, the text assets)."""
    names = (RECORD_NAME, LEGACY_BUNDLE_NAME, ONNX_NAME, f"{ONNX_NAME}.data", INT8_ONNX_NAME, INT8_AGREEMENT_NAME, ENGINE_NAME,
             f"{ENGINE_NAME}.json", TORCH_TRT_NAME, f"{TORCH_TRT_NAME}.json", TEXT_WEIGHTS_NAME, TEXT_CACHE_DIR)
    return [bundle / name for name in names if (bundle / name).exists()]


def _export(args: argparse.Namespace) -> bool:
    """Write the bundle; ``True`` when an optional step (int8, TensorRT) failed."""
    checkpoint = checkpoint_dir(args.checkpoint)
    model = SegmentationModel.from_pretrained(checkpoint).eval()
    given = {"image_size": image_hw(args.image_size) if args.image_size else None, "mean": args.mean,
             "std": args.std, "threshold": args.threshold}
    if model.inference is not None:
        given = resolve(model.inference, given, checkpoint / INFERENCE_NAME, args.force)
    else:
        print(f"warning: {checkpoint} has no {INFERENCE_NAME} (saved before inference records): the bundle uses "
              "the options given, else 256 px, ImageNet normalisation, threshold 0.5", file=sys.stderr)
    extra = [s.strip() for s in Path(args.sentences).read_text().splitlines() if s.strip()] if args.sentences else []
    with writing(args.out, "the bundle"):
        # --overwrite replaces, not merges (the checks above passed): no engine or int8 file of another model stays.
        for stale in existing_bundle(Path(args.out)):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        result = export_bundle(
            model, args.out, image_size=given["image_size"], mean=given["mean"], std=given["std"],
            threshold=given["threshold"], opset=args.opset, dynamic_size=not args.static_size,
            verify_batches=args.verify_batches, sentences=extra,
        )
    bundle, record = result.bundle, result.record
    print(f"wrote {result.onnx} (opset {record.opset}, inputs {', '.join(record.input_names)})")
    for p in result.parity:
        print(f"  ONNX Runtime vs PyTorch, batch {p.batch}: max |logit diff| {p.max_abs_diff:.2e}, "
              f"mask flips {p.mask_flips}")

    failed = False
    if args.int8_calibration:
        failed |= not _export_int8(model, record, bundle, image_files(args.int8_calibration)[: args.calibration_count])
    if args.tensorrt != "skip":
        failed |= not _build_tensorrt(args, bundle)
    if args.torch_tensorrt:
        failed |= not _compile_torch_tensorrt(args, model, record, bundle)
    return failed


def _export_int8(model: SegmentationModel, record: InferenceRecord, bundle: Path, images: list[Path]) -> bool:
    from .quantize import mask_agreement, quantize_onnx

    try:
        feeds = calibration_inputs(model, record, images)
        quantize_onnx(bundle / ONNX_NAME, bundle / INT8_ONNX_NAME, feeds)
        agreement = mask_agreement(bundle / ONNX_NAME, bundle / INT8_ONNX_NAME, feeds, record.threshold)
    except (DeployError, ValueError, OSError) as err:
        print(f"error: int8 export failed: {err}", file=sys.stderr)
        return False
    (bundle / INT8_AGREEMENT_NAME).write_text(json.dumps(asdict(agreement), indent=2) + "\n")
    print(f"wrote {bundle / INT8_ONNX_NAME}: vs fp32 on {agreement.images} calibration images, mean Dice "
          f"{agreement.mean_dice:.4f} (min {agreement.min_dice:.4f}), "
          f"max |prob diff| {agreement.max_probability_diff:.3f}")
    return True


def _build_tensorrt(args: argparse.Namespace, bundle: Path) -> bool:
    from .trt_engine import build_engine

    try:
        meta = build_engine(
            bundle / ONNX_NAME, bundle / ENGINE_NAME, precision=args.precision, max_batch=args.max_batch,
            opt_batch=args.opt_batch, workspace_gib=args.workspace_gib, timing_cache=args.timing_cache,
        )
    except BackendUnavailableError as err:
        if args.tensorrt == "auto":
            print(f"note: no TensorRT engine built ({str(err).split('. ')[0]}); model.onnx serves with ONNX Runtime")
            return True
        print(f"error: {err}", file=sys.stderr)
        return False
    except DeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return False
    print(f"wrote {bundle / ENGINE_NAME} ({meta.precision}, batch 1..{meta.max_batch}, "
          f"TensorRT {meta.tensorrt_version}, "
          f"{meta.gpu_name})")
    return True


def _compile_torch_tensorrt(args: argparse.Namespace, model: SegmentationModel, record: InferenceRecord,
                            bundle: Path) -> bool:
    from .torch_trt import PRECISIONS, compile_torch_tensorrt

    if args.precision not in PRECISIONS:
        print(f"error: torch-tensorrt compiles {' or '.join(PRECISIONS)}, not --precision {args.precision}",
              file=sys.stderr)
        return False
    try:
        meta = compile_torch_tensorrt(model, record, bundle / TORCH_TRT_NAME, precision=args.precision,
                                      max_batch=args.max_batch, opt_batch=args.opt_batch)
    except DeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return False
    print(f"wrote {bundle / TORCH_TRT_NAME} ({meta.precision}, batch 1..{meta.max_batch})")
    return True
