"""The NVIDIA DALI pipeline: decode, geometry, the paper's variants, flips/jitter, normalise.

One definition serves both devices: ``device="cpu"`` builds CPU operators for a
``device_id=None`` pipeline (CPU-only machines); ``device="gpu"`` decodes with nvJPEG
(``mixed``) and runs every operator on the GPU. Per-sample parameters come from Python
through ``external_source`` (see :mod:`cmgnet.data.augment.params`), so this pipeline and
the PyTorch path apply the same draw to the same sample.

Costly operators run only on the samples that need them (DALI conditionals): the resize
only where the (cropped) image is not already ``size x size``, the interpolating warp only
for odd multiples of 45 degrees or a zoom/translation (right angles alone are an exact
transpose + flip), the blur only for blurred variants.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import DataNode, Pipeline

from .params import AugmentParams, TransformSpec, color_matrix, warp_matrix

# Per-sample arrays the source can yield, by group. "mean" is 255 * mean - rgb_shift (the
# RGB shift folded into normalisation); "index" attaches sentences and ids afterwards.
_BASE_INPUTS = ("image_bytes", "mask_bytes", "mean", "index", "resize")  # resize: bool, False = already S x S
_CROP_INPUTS = ("roi_start", "roi_end")  # float32[2] (y, x): the crop box in source pixels
_VARIANT_INPUTS = ("warp", "angle", "transpose", "blur", "blur_sigma")
_AFFINE_INPUTS = ("affine", "matrix")  # bool; float32[2, 3] destination -> source (params.warp_matrix)
_FLIP_INPUTS = ("flip_h", "flip_v")
_COLOR_INPUTS = ("color_matrix", "color_offset")
_DTYPES = {
    "image_bytes": types.UINT8,
    "mask_bytes": types.UINT8,
    "index": types.INT64,
    "resize": types.BOOL,
    "warp": types.BOOL,
    "affine": types.BOOL,
    "transpose": types.BOOL,
    "blur": types.BOOL,
    "flip_h": types.INT32,
    "flip_v": types.INT32,
}


def source_inputs(spec: TransformSpec) -> tuple[str, ...]:
    """Names of the per-sample arrays the pipeline of ``spec`` reads, in source order."""
    names = _BASE_INPUTS + _CROP_INPUTS * spec.center_crop + _VARIANT_INPUTS * spec.variants
    names += _AFFINE_INPUTS * spec.affine
    return names + _FLIP_INPUTS * (spec.variants or spec.strong) + _COLOR_INPUTS * spec.strong


def _right_angle_flips(quarter_turns: int) -> tuple[bool, bool]:
    # Counter-clockwise rotation by k right angles = (transpose if k is odd) then these flips.
    return {0: (False, False), 1: (False, True), 2: (True, True), 3: (True, False)}[quarter_turns % 4]


def sample_inputs(params: AugmentParams, size: int) -> dict[str, np.ndarray]:
    """The per-sample pipeline arguments of one draw (all but bytes, crop box, mean and index).

    A zoom or translation takes the whole geometry (rotation included) into one affine warp
    of the ``size x size`` image; otherwise odd multiples of 45 degrees are a rotation and
    right angles a transpose + flips.
    """
    angle = params.angle % 360.0
    affine = params.affine
    warp = not affine and angle % 90 != 0
    turns = 0 if warp or affine else int(angle // 90)
    turn_h, turn_v = _right_angle_flips(turns)
    matrix, offset = color_matrix(params)
    return {
        "warp": np.array(warp),
        "angle": np.array(angle if warp else 0.0, dtype=np.float32),
        "transpose": np.array(turns % 2 == 1),
        "blur": np.array(params.blur_sigma > 0),
        "blur_sigma": np.array(max(params.blur_sigma, 0.1), dtype=np.float32),  # unused when not blurred
        "flip_h": np.array(turn_h != params.flip_h, dtype=np.int32),  # flips compose by XOR
        "flip_v": np.array(turn_v != params.flip_v, dtype=np.int32),
        "color_matrix": matrix,
        "color_offset": offset,
        "affine": np.array(affine),
        "matrix": warp_matrix(params, size),
    }


def _geometry(x: DataNode, spec: TransformSpec, inputs: dict[str, DataNode], mask: bool) -> DataNode:
    """Resize to the record's image size, reading only the crop box when ``spec.center_crop``."""
    interp = types.INTERP_NN if mask else types.INTERP_LINEAR
    roi = {"roi_start": inputs["roi_start"], "roi_end": inputs["roi_end"]} if spec.center_crop else {}
    return fn.resize(x, size=list(spec.image_size), interp_type=interp, antialias=not mask, **roi)


@pipeline_def(enable_conditionals=True)
def _graph(source: Iterable, spec: TransformSpec, device: str):  # type: ignore[no-untyped-def]
    names = source_inputs(spec)
    nodes = fn.external_source(
        source=source, num_outputs=len(names), batch=True, dtype=[_DTYPES.get(n, types.FLOAT) for n in names]
    )
    inputs = dict(zip(names, nodes))  # noqa: B905 (DALI's AutoGraph zip takes no strict=)
    decoder = "mixed" if device == "gpu" else "cpu"
    # Every file here is upright 8-bit RGB/grey: the loader hands EXIF-rotated and other
    # converted files over already decoded by cmgnet.data.imageio.to_array (re-encoded as PNG).
    image = fn.decoders.image(inputs["image_bytes"], device=decoder, output_type=types.RGB, adjust_orientation=False)
    mask = fn.decoders.image(inputs["mask_bytes"], device=decoder, output_type=types.GRAY, adjust_orientation=False)
    if inputs["resize"]:  # data often comes pre-resized; resampling S x S to S x S is a costly no-op
        image, mask = _geometry(image, spec, inputs, mask=False), _geometry(mask, spec, inputs, mask=True)
    if spec.affine:
        if inputs["affine"]:
            image = fn.warp_affine(image, matrix=inputs["matrix"], fill_value=0)
            mask = fn.warp_affine(mask, matrix=inputs["matrix"], fill_value=0, interp_type=types.INTERP_NN)
    if spec.variants:
        if inputs["warp"]:
            image = fn.rotate(image, angle=inputs["angle"], keep_size=True, fill_value=0)
            mask = fn.rotate(mask, angle=inputs["angle"], keep_size=True, fill_value=0, interp_type=types.INTERP_NN)
        if inputs["transpose"]:
            image = fn.transpose(image, perm=[1, 0, 2], transpose_layout=False)  # still "HWC"
            mask = fn.transpose(mask, perm=[1, 0, 2], transpose_layout=False)
    if spec.variants or spec.strong:
        image = fn.flip(image, horizontal=inputs["flip_h"], vertical=inputs["flip_v"])
        mask = fn.flip(mask, horizontal=inputs["flip_h"], vertical=inputs["flip_v"])
    if spec.variants:
        if inputs["blur"]:
            image = fn.gaussian_blur(image, sigma=inputs["blur_sigma"])
    if spec.strong:  # one affine colour map, clamped to uint8
        image = fn.coord_transform(image, M=inputs["color_matrix"], T=inputs["color_offset"], dtype=types.UINT8)
    image = fn.crop_mirror_normalize(
        image, dtype=types.FLOAT, output_layout="CHW", mean=inputs["mean"], std=[255.0 * s for s in spec.std]
    )
    mask = fn.transpose(mask, perm=[2, 0, 1])
    # Grey levels 1..127 mean a non-binary mask: flag the sample (the loader names the file).
    ambiguous = fn.reductions.max(fn.cast((mask > 0) & (mask <= 127), dtype=types.UINT8))
    return image, fn.cast(mask > 127, dtype=types.FLOAT), inputs["index"], ambiguous


def build_pipeline(
    source: Iterable,
    spec: TransformSpec,
    *,
    batch_size: int,
    num_threads: int,
    device: str = "cpu",
    device_id: int | None = None,
    seed: int = 0,
) -> Pipeline:
    """Build (not yet run) the DALI pipeline.

    Args:
        source: an iterable of batches, each a tuple of lists (one array per sample) in
            :func:`source_inputs` order.
        spec: the transform; operators it does not need are left out of the graph.
        batch_size: the largest batch the source yields (smaller batches are fine).
        num_threads: CPU worker threads.
        device: ``"cpu"`` or ``"gpu"``.
        device_id: CUDA device for ``device="gpu"``; ignored (``None``) for ``"cpu"``.
        seed: DALI's own seed (the pipeline draws nothing itself; kept for determinism).

    Returns:
        The pipeline. Outputs: image ``float32 B x 3 x S x S`` (normalised), mask
        ``float32 B x 1 x S x S`` in {0, 1}, sample index ``int64 B x 1``, and ``uint8 B``
        set where the mask had grey levels 1..127 (not binary).
    """
    if device not in ("cpu", "gpu"):
        raise ValueError(f"DALI device must be 'cpu' or 'gpu', got {device!r}")
    pipe = _graph(
        source,
        spec,
        device,
        batch_size=batch_size,
        num_threads=max(1, num_threads),
        device_id=device_id if device == "gpu" else None,
        seed=seed,
    )
    pipe.build()
    return pipe
