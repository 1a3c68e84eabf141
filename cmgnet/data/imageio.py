"""Reading image and mask files safely: header probes, size limits, truncation, binary masks.

Both loader paths read files through :func:`read_encoded`, so a truncated file is refused
with the same message whether PIL or DALI would decode it.

Every entry point (training, evaluation, ``data check``, ``predict``, the runtime) turns an
opened file into pixels through :func:`to_array`: the EXIF orientation is applied (what a
viewer shows, :func:`PIL.ImageOps.exif_transpose` semantics), then each mode is converted by
one explicit rule (:data:`CONVERSIONS`); modes without a rule are refused, naming the file.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_MAX_PIXELS = 80_000_000
"""Largest image (width x height) decoded; ISIC originals reach ~30 MP. Below PIL's own
decompression-bomb limits (warning at ~89 MP, error at ~179 MP), which still apply above it."""

_JPEG_TAIL = 1024  # EOI may be followed by a little padding; entropy data never holds FF D9.


CONVERSIONS: dict[str, str] = {
    "RGB": "as stored (a 16-bit RGB PNG: Pillow keeps the high byte of each sample)",
    "L": "as stored; grey is repeated into R, G and B",
    "1": "0 -> 0, 1 -> 255",
    "P": "through the palette",
    "PA": "through the palette, alpha composited as below",
    "LA": "composited onto black: value * alpha / 255, rounded",
    "RGBA": "composited onto black: value * alpha / 255, rounded",
    "La": "already premultiplied by alpha (composited onto black): colour as stored",
    "RGBa": "already premultiplied by alpha (composited onto black): colour as stored",
    "RGBX": "the padding byte dropped",
    "CMYK": "Pillow's CMYK -> RGB (Adobe-inverted JPEGs are un-inverted when read)",
    "YCbCr": "Pillow's YCbCr -> RGB (ITU-R BT.601)",
    "I;16": "16-bit grey: value >> 8 (65535 -> 255)",
    "I;16L": "16-bit grey: value >> 8",
    "I;16B": "16-bit grey: value >> 8",
    "I;16N": "16-bit grey: value >> 8",
    "I": "32-bit integer read as 16-bit grey (0..65535, value >> 8; e.g. a 16-bit PGM); other values refused",
    "F": "32-bit float read as 0..1 (value * 255, rounded); other values (or NaN) refused",
}
"""Pixel conversion by mode (Pillow's mode after opening). A mode not here (e.g. ``LAB``) is
refused. A colour key (``transparency`` of an ``L``/``RGB``/``P`` file) counts as alpha. Masks
become grey the same way, colour ones by Pillow's luma (``L = (299 R + 587 G + 114 B) / 1000``);
their binary check (0 background, above half of full scale lesion) runs on the stored
values, so a 16-bit mask with small labels (1, 2, ...) is refused rather than read as empty."""

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_PLAIN_FORMATS = ("JPEG", "PNG", "BMP")  # what DALI's decoders read as Pillow does (8-bit, upright)
# ImageOps.exif_transpose's table (EXIF orientation -> FLIP_LEFT_RIGHT, ROTATE_180, FLIP_TOP_BOTTOM,
# TRANSPOSE, ROTATE_270, TRANSVERSE, ROTATE_90) on H x W (x C) arrays, after conversion.
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


@dataclass(frozen=True)
class ImageInfo:
    """What a file header says, without decoding pixels.

    Attributes:
        width, height: the size as displayed (EXIF orientation applied), i.e. as decoded.
        mode: Pillow's mode.
        format: Pillow's format name (``JPEG``, ``PNG``, ...).
        orientation: the EXIF orientation (1 = upright; 5..8 swap width and height).
        bit_depth: bits per sample (16 for 16-bit PNGs and ``I;16`` files, else 8).
        transparency: a colour key (``transparency`` info) that decoding turns into alpha.
    """

    width: int
    height: int
    mode: str
    format: str
    orientation: int = 1
    bit_depth: int = 8
    transparency: bool = False

    def conversion(self, mask: bool = False) -> str | None:
        """Why the stored pixels are not used as they are, or ``None`` for a plain file.

        Plain is an upright 8-bit JPEG, PNG or BMP in ``RGB`` or ``L`` (masks: ``L`` only),
        without transparency: DALI's decoders read those as :func:`to_array` does (a 16-bit
        PNG, for one, they scale by 1/257 instead of keeping the high byte).
        """
        reasons = [f"EXIF orientation {self.orientation}"] if self.orientation != 1 else []
        if self.mode not in (("L",) if mask else ("RGB", "L")):
            reasons.append(f"mode {self.mode}")
        if self.bit_depth != 8 and self.mode not in _SIXTEEN_BIT:
            reasons.append(f"{self.bit_depth}-bit")
        if self.transparency:
            reasons.append("transparency")
        if self.format not in _PLAIN_FORMATS:
            reasons.append(f"{self.format or 'unknown'} format")
        return ", ".join(reasons) or None


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
        orientation = _orientation(image, path)
        width, height = (image.height, image.width) if orientation >= 5 else image.size
        wide = image.mode in _SIXTEEN_BIT or (image.format == "PNG" and _png_bit_depth(path) == 16)
        keyed = image.mode in ("L", "RGB", "P") and image.info.get("transparency") is not None
        return ImageInfo(width, height, image.mode, image.format or "", orientation, 16 if wide else 8, keyed)


def _png_bit_depth(path: Path) -> int:
    """Bits per sample from a PNG's IHDR chunk (always first: byte 24 of the file)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(25)
    except OSError as error:
        raise DataError(f"cannot read file: {error}", path) from None
    return head[24] if len(head) == 25 else 8


def _orientation(image: Image.Image, path: Path | str) -> int:
    """The EXIF orientation (1..8) in the file's header; 1 when absent or out of range.

    ``Image.getexif`` rather than PNG's override, which decodes every pixel to look for an
    eXIf chunk after the image data (the PNG spec places it before): probing and decoding
    must read the same orientation.
    """
    try:
        value = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    except Exception as error:  # noqa: BLE001 - Pillow's EXIF parser raises assorted types on malformed blocks
        raise DataError(f"unreadable EXIF block ({error.__class__.__name__}): its orientation is unknown",
                        path) from None
    return value if isinstance(value, int) and value in _UPRIGHT else 1


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
    return check_complete(data, path)


def check_complete(data: np.ndarray, path: Path | str) -> np.ndarray:
    """Refuse encoded image bytes that are empty or visibly truncated (see :func:`read_encoded`).

    Args:
        data: the encoded file as a 1-D ``uint8`` array (a file's content, a request's bytes).
        path: where the bytes came from (for the message).

    Returns:
        ``data``.

    Raises:
        DataError: a JPEG without its end-of-image marker, a PNG without ``IEND``, or no bytes.
    """
    head, tail = data[:8].tobytes(), data[-_JPEG_TAIL:].tobytes()
    truncated = (head[:2] == b"\xff\xd8" and b"\xff\xd9" not in tail) or (
        head == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail[-32:]
    )
    if truncated or data.size == 0:
        raise DataError("truncated or empty image file", path)
    return data


def decode_image(data: np.ndarray, path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, min_side: int = 1,
                 max_aspect: float | None = None) -> np.ndarray:
    """Decode encoded bytes to RGB as displayed (see :func:`to_array`).

    Args:
        data: encoded bytes (:func:`read_encoded`, a request, a pyfunc cell); empty or truncated
            bytes are refused (:func:`check_complete`).
        path: the file the bytes came from (for error messages).
        max_pixels: refuse larger images before decoding.
        min_side: refuse images whose shorter side is below this, before decoding.
        max_aspect: refuse images whose longer side exceeds this many times the shorter one,
            before decoding (``None``: any shape).

    Returns:
        ``H x W x 3`` ``uint8`` array.

    Raises:
        DataError: undecodable, truncated, oversized, too small, too elongated or unconvertible image.
    """
    image = _open(io.BytesIO(check_complete(data, path).tobytes()), path, max_pixels)
    short, long = sorted(image.size)
    if short < min_side:
        image.close()
        raise DataError(f"image is {image.width}x{image.height}, below the {min_side}-pixel minimum side", path)
    if max_aspect is not None and long > max_aspect * short:
        image.close()
        raise DataError(f"image is {image.width}x{image.height}, more elongated than the {max_aspect:g}:1 "
                        "maximum aspect ratio", path)
    return to_array(image, path)


def decode_mask(data: np.ndarray, path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a mask to grey levels as displayed and check it is binary (see :func:`to_array`).

    Args:
        data: bytes from :func:`read_encoded`.
        path: the mask file (for error messages).
        max_pixels: refuse larger masks before decoding.

    Returns:
        ``H x W`` ``uint8`` array of 0 (background) and values above 127 (lesion).

    Raises:
        DataError: undecodable, unconvertible or non-binary mask.
    """
    return to_array(_open(io.BytesIO(data.tobytes()), path, max_pixels), path, mask=True)


def to_array(image: Image.Image, path: Path | str, *, mask: bool = False) -> np.ndarray:
    """An opened image's pixels as a viewer shows them: the one decoding rule of every entry point.

    The EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose` semantics) and the
    mode converted by its rule in :data:`CONVERSIONS`.

    Args:
        image: an opened (lazy or loaded) Pillow image.
        path: the file it came from (for error messages).
        mask: return checked binary grey levels instead of RGB.

    Returns:
        ``H x W x 3`` ``uint8`` RGB, or with ``mask`` ``H x W`` ``uint8`` of 0 and values above 127.

    Raises:
        DataError: a mode without a rule, values outside its rule's range, a non-binary mask,
            or pixel data that cannot be decoded.
    """
    orientation = _orientation(image, path)
    try:
        array = _converted(image, path, mask)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot decode {'mask' if mask else 'image'}: {error}", path) from None
    if orientation in _UPRIGHT:
        array = _UPRIGHT[orientation](array)
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()  # writable, as torch.from_numpy wants


def _converted(image: Image.Image, path: Path | str, mask: bool) -> np.ndarray:
    """Stored pixels -> ``uint8`` RGB (or checked grey for a mask), by :data:`CONVERSIONS`."""
    mode = image.mode
    if mode not in CONVERSIONS:
        raise DataError(f"cannot convert pixel mode {mode} ({'mask' if mask else 'image'}): no defined conversion; "
                        "save it as 8- or 16-bit RGB or grey PNG", path)
    if mode in ("L", "RGB", "P") and image.info.get("transparency") is not None:
        image = image.convert("LA" if mode == "L" else "RGBA")  # the colour key becomes alpha
        mode = image.mode
    elif mode == "P":
        image, mode = image.convert("RGB"), "RGB"
    elif mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    elif mode in ("CMYK", "YCbCr"):
        image, mode = image.convert("RGB"), "RGB"
    checked = False
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        levels, full_scale = _wide_levels(image, path)
        if mask:  # on the stored values: small labels (1, 2, ...) must not vanish into 0
            check_binary(levels, path, full_scale)
            checked = True
        array = (levels >> 8).astype(np.uint8) if full_scale == 65535 else np.rint(levels * 255).astype(np.uint8)
    elif mode == "1":
        array = np.where(np.asarray(image), 255, 0).astype(np.uint8)
    elif mode in ("LA", "RGBA"):
        stored = np.asarray(image).astype(np.uint16)
        array = ((stored[..., :-1] * stored[..., -1:] + 127) // 255).astype(np.uint8)  # onto black
    elif mode in ("La", "RGBa", "RGBX"):
        array = np.asarray(image)[..., :-1]
    else:  # L, RGB
        array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if mask:
        if array.ndim == 3:
            array = np.asarray(Image.fromarray(np.ascontiguousarray(array)).convert("L"))  # Pillow's luma
        if not checked:
            check_binary(array, path)
        return array
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array


def _wide_levels(image: Image.Image, path: Path | str) -> tuple[np.ndarray, int | float]:
    """The samples of a 16-bit, 32-bit integer or float grey image, and their full scale."""
    levels = np.asarray(image)
    if image.mode in _SIXTEEN_BIT:
        return levels.astype(np.uint16), 65535
    if image.mode == "I":
        low, high = (int(levels.min()), int(levels.max())) if levels.size else (0, 0)
        if low < 0 or high > 65535:
            raise DataError(f"32-bit integer pixels (mode I) range {low}..{high}, outside the 16-bit 0..65535 "
                            "this tool reads them as; save the image as 8- or 16-bit PNG", path)
        return levels.astype(np.uint16), 65535
    levels = levels.astype(np.float32)
    if not np.isfinite(levels).all() or (levels.size and (levels.min() < 0 or levels.max() > 1)):
        finite = levels[np.isfinite(levels)]
        shown = f"{finite.min():g}..{finite.max():g}" if finite.size else "none finite"
        raise DataError(f"float pixels (mode F) range {shown}{'' if finite.size == levels.size else ' and NaN/inf'}, "
                        "outside the 0..1 this tool reads them as; save the image as 8- or 16-bit PNG", path)
    return levels, 1.0


def non_binary_mask(path: Path | str, detail: str) -> DataError:
    """The error for a mask with grey levels between background (0) and lesion (above 127)."""
    return DataError(
        f"mask is not binary: {detail}; expected 0 for background and 255 (any value above 127) for lesion", path
    )


def check_binary(mask: np.ndarray, path: Path | str, full_scale: float = 255) -> None:
    """Refuse a mask with grey levels in 1..127 (0 is background, above 127 is lesion).

    Args:
        mask: the stored levels.
        path: the mask file (for the message).
        full_scale: white of the stored levels (65535 for 16-bit, 1.0 for float); the
            ambiguous levels are those above 0 up to half of it.

    Raises:
        DataError: the mask is not binary; the message shows the offending values.
    """
    ambiguous = (mask > 0) & (mask <= full_scale / 2)
    if ambiguous.any():
        values = np.unique(mask)
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if values.size > 8 else "")
        span = "1..127" if full_scale == 255 else f"(0, {full_scale / 2:g}] of full scale {full_scale:g}"
        raise non_binary_mask(path, f"{int(ambiguous.sum())} pixels in {span} (values: {shown})")
