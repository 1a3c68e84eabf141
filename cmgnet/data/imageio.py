"""Reading image and mask files safely: header probes, size limits, truncation, binary masks.

Both loader paths read files through :func:`read_encoded`, so a truncated file is refused
with the same message whether PIL or DALI would decode it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_MAX_PIXELS = 80_000_000
"""Largest image (width x height) decoded; ISIC originals reach ~30 MP. Below PIL's own
decompression-bomb limits (warning at ~89 MP, error at ~179 MP), which still apply above it."""

_JPEG_TAIL = 1024  # EOI may be followed by a little padding; entropy data never holds FF D9.


@dataclass(frozen=True)
class ImageInfo:
    """What a file header says, without decoding pixels."""

    width: int
    height: int
    mode: str
    format: str


def _open(source: Path | io.BytesIO, path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse oversized images before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = Image.open(source)
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except Image.DecompressionBombError:
        raise _too_large(f"larger than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP", path, max_pixels) from None
    except UnidentifiedImageError:
        # PIL names the in-memory buffer (<_io.BytesIO object at ...>), not the file: say it ourselves.
        raise DataError("unreadable image: not a recognised image format (or corrupt header)", path) from None
    except (OSError, SyntaxError) as error:
        raise DataError(f"unreadable image: {error}", path) from None
    if image.width * image.height > max_pixels:
        image.close()
        raise _too_large(f"{image.width}x{image.height} = {image.width * image.height / 1e6:.0f} MP", path, max_pixels)
    return image


def _too_large(size: str, path: Path, max_pixels: int) -> DataError:
    return DataError(
        f"image is {size}, above the {max_pixels / 1e6:.0f} MP limit (decoding it could exhaust memory); "
        "downscale it or raise max_pixels",
        path,
    )


def probe(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Read an image header (no pixel decoding) and refuse images too large to decode.

    Args:
        path: the image or mask file.
        max_pixels: the largest accepted ``width * height``.

    Returns:
        Size, mode and format from the header.

    Raises:
        DataError: missing/unreadable file, unknown format, or more than ``max_pixels`` pixels.
    """
    with _open(path, path, max_pixels) as image:
        return ImageInfo(image.width, image.height, image.mode, image.format or "")


def read_encoded(path: Path) -> np.ndarray:
    """The raw bytes of an image file, refused when visibly truncated.

    JPEG files must end with their end-of-image marker and PNG files with their ``IEND``
    chunk: DALI's decoders would otherwise fill a cut file with grey without complaint.

    Args:
        path: the file.

    Returns:
        The file content as a 1-D ``uint8`` array (what DALI's decoders take).

    Raises:
        DataError: unreadable or truncated file.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise DataError(f"cannot read file: {error}", path) from None
    head, tail = data[:8].tobytes(), data[-_JPEG_TAIL:].tobytes()
    truncated = (head[:2] == b"\xff\xd8" and b"\xff\xd9" not in tail) or (
        head == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail[-32:]
    )
    if truncated or data.size == 0:
        raise DataError("truncated or empty image file", path)
    return data


def decode_image(data: np.ndarray, path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded bytes to RGB.

    Args:
        data: bytes from :func:`read_encoded`.
        path: the file the bytes came from (for error messages).
        max_pixels: refuse larger images before decoding.

    Returns:
        ``H x W x 3`` ``uint8`` array.

    Raises:
        DataError: undecodable, truncated or oversized image.
    """
    image = _open(io.BytesIO(data.tobytes()), path, max_pixels)
    try:
        return np.array(image.convert("RGB"))  # writable, as torch.from_numpy wants
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot decode image: {error}", path) from None


def decode_mask(data: np.ndarray, path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a mask to grey levels and check it is binary.

    Args:
        data: bytes from :func:`read_encoded`.
        path: the mask file (for error messages).
        max_pixels: refuse larger masks before decoding.

    Returns:
        ``H x W`` ``uint8`` array of 0 (background) and values above 127 (lesion).

    Raises:
        DataError: undecodable or non-binary mask.
    """
    image = _open(io.BytesIO(data.tobytes()), path, max_pixels)
    try:
        mask = np.array(image.convert("L"))
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot decode mask: {error}", path) from None
    check_binary(mask, path)
    return mask


def non_binary_mask(path: Path | str, detail: str) -> DataError:
    """The error for a mask with grey levels between background (0) and lesion (above 127)."""
    return DataError(
        f"mask is not binary: {detail}; expected 0 for background and 255 (any value above 127) for lesion", path
    )


def check_binary(mask: np.ndarray, path: Path | str) -> None:
    """Refuse a mask with grey levels in 1..127 (0 is background, above 127 is lesion).

    Raises:
        DataError: the mask is not binary; the message shows the offending values.
    """
    ambiguous = (mask > 0) & (mask <= 127)
    if ambiguous.any():
        values = np.unique(mask)
        shown = ", ".join(map(str, values[:8])) + (", ..." if values.size > 8 else "")
        raise non_binary_mask(path, f"{int(ambiguous.sum())} pixels in 1..127 (values: {shown})")
