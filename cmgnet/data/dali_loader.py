"""The DALI loader: streams batches through :func:`~cmgnet.data.augment.dali_pipeline.build_pipeline`."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from PIL import Image

from .augment.dali_pipeline import build_pipeline, sample_inputs, source_inputs
from .augment.params import crop_box, sample_params
from .dataset import Batch, SplitData
from .imageio import DEFAULT_MAX_PIXELS, decode_image, decode_mask, non_binary_mask, read_encoded
from .sampling import EpochPlan


class _Source:
    """The pipeline's input: an endless stream of batches, epoch after epoch from ``start_epoch``.

    Endless because DALI reads ahead: the next epoch's first batches are prepared while
    the current one finishes, which a per-epoch source with ``StopIteration`` would stall.
    """

    def __init__(self, data: SplitData, plan: EpochPlan, seed: int, start_epoch: int, max_pixels: int) -> None:
        self.data, self.plan, self.seed, self.start_epoch = data, plan, seed, start_epoch
        self.max_pixels = max_pixels

    def __iter__(self) -> Iterator[tuple[list[np.ndarray], ...]]:
        for epoch in itertools.count(self.start_epoch):
            for batch in self.plan.batches(epoch):
                yield self._inputs(batch, epoch)

    def _inputs(self, batch: np.ndarray, epoch: int) -> tuple[list[np.ndarray], ...]:
        names = source_inputs(self.data.spec)
        columns: tuple[list[np.ndarray], ...] = tuple([] for _ in names)
        for index in batch:
            values = self._sample_inputs(int(index), epoch)
            for column, name in zip(columns, names, strict=True):
                column.append(values[name])
        return columns

    def _sample_inputs(self, index: int, epoch: int) -> dict[str, np.ndarray]:
        sample = self.data.samples[index]
        record = sample.record
        assert record.mask_path is not None  # prepare_split validated masks
        spec = self.data.spec
        params = sample_params(sample, spec, seed=self.seed, epoch=epoch, train=self.data.train)
        width, height = self.data.sizes[record.image_id]
        top, left, side = crop_box(height, width)
        region = (side, side) if spec.center_crop else (height, width)
        image_bytes, mask_bytes = read_encoded(record.image_path), read_encoded(record.mask_path)
        if record.image_id in self.data.converted:
            # EXIF-rotated, 16-bit, palette, alpha, CMYK, ... files: DALI's decoders would read
            # them otherwise than the PyTorch path, so PIL decodes them and DALI gets upright 8-bit PNGs.
            image_bytes = _png(decode_image(image_bytes, record.image_path, self.max_pixels))
            mask_bytes = _png(decode_mask(mask_bytes, record.mask_path, self.max_pixels))
        return {
            "image_bytes": image_bytes,
            "mask_bytes": mask_bytes,
            "mean": np.array(
                [255.0 * m - s for m, s in zip(spec.mean, params.rgb_shift, strict=True)], dtype=np.float32
            ),
            "index": np.array(index, dtype=np.int64),
            "resize": np.array(region != spec.image_size),
            "roi_start": np.array([top, left], dtype=np.float32),  # read only with spec.center_crop
            "roi_end": np.array([top + side, left + side], dtype=np.float32),
            **sample_inputs(params, spec.size),
        }


def _png(pixels: np.ndarray) -> np.ndarray:
    """Lossless PNG bytes of decoded 8-bit pixels (DALI decodes them back exactly)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


class DaliLoader:
    """Batches from the DALI pipeline (CPU operators, or mixed/GPU ones on a GPU).

    Each ``for batch in loader`` pass yields one epoch: the epoch given to
    :meth:`set_epoch`, else the one after the previous complete pass. Breaking out of a
    pass early restarts the stream on the next pass.

    Args:
        data: the split (from :func:`~cmgnet.data.dataset.prepare_split`).
        plan: order and sharding.
        seed: seed of the augmentation draws.
        epoch: the first epoch.
        num_threads: DALI CPU threads.
        device: ``"cpu"`` or ``"gpu"``.
        device_id: CUDA device for ``"gpu"``.
        max_pixels: limit for the files decoded by PIL (see :class:`_Source`).
    """

    def __init__(
        self,
        data: SplitData,
        plan: EpochPlan,
        *,
        seed: int,
        epoch: int = 0,
        num_threads: int = 2,
        device: str = "cpu",
        device_id: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.data, self.plan, self.seed, self.epoch = data, plan, seed, epoch
        self.max_pixels = max_pixels
        self.num_threads, self.device, self.device_id = num_threads, device, device_id
        self._iterator: DALIGenericIterator | None = None
        self._position: tuple[int, int] | None = None  # (epoch, batches read) of the running stream

    def __len__(self) -> int:
        return len(self.plan)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass yield ``epoch`` (reshuffled and redrawn for training)."""
        self.epoch = epoch

    def _start(self, epoch: int) -> None:
        pipe = build_pipeline(
            _Source(self.data, self.plan, self.seed, epoch, self.max_pixels),
            self.data.spec,
            batch_size=self.plan.batch_size,
            num_threads=self.num_threads,
            device=self.device,
            device_id=self.device_id,
            seed=self.seed,
        )
        self._iterator = DALIGenericIterator([pipe], ["image", "mask", "index", "ambiguous"], size=-1, auto_reset=False)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        if len(self) == 0:  # an evaluation shard can be empty when ranks outnumber samples
            self.epoch = epoch + 1
            return
        if self._position != (epoch, 0):
            self._start(epoch)
        for step, expected in enumerate(self.plan.batches(epoch)):
            output = next(self._iterator)[0]
            self._position = (epoch, step + 1)
            yield self._batch(output, expected)
        self._position = (epoch + 1, 0)
        self.epoch = epoch + 1

    def _batch(self, output: dict[str, torch.Tensor], expected: np.ndarray) -> Batch:
        indices = output["index"].view(-1).tolist()
        if indices != expected.tolist():  # the stream and the plan must never drift apart
            raise RuntimeError(
                f"DALI returned samples {indices[:4]}... but the plan expected {expected[:4].tolist()}..."
            )
        samples = [self.data.samples[i] for i in indices]
        if output["ambiguous"].any():  # the PyTorch path checks the whole mask; here the visible part
            first = int(output["ambiguous"].view(-1).nonzero()[0])
            raise non_binary_mask(samples[first].record.mask_path, "grey levels in 1..127")
        return {
            "image": output["image"],
            "mask": output["mask"],
            "text": [self.data.texts[i] for i in indices],
            "image_id": [s.key for s in samples],
        }
