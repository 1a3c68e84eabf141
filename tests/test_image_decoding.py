"""Image decoding: EXIF orientation, every Pillow mode, and CSV cells a spreadsheet will not run.

One rule (:func:`cmgnet.data.imageio.to_array`) for every entry point: ``cmgnet predict``,
``cmgnet data check``, the training/evaluation datasets (PyTorch and DALI) and the runtime.
"""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from data_fixtures import requires_dali, save, write_csv
from PIL import Image, ImageOps

from cmgnet.cli import main as cli_main
from cmgnet.data import DataConfig, DataError, build_loader, read_folder, validate_records
from cmgnet.data.csvfiles import spreadsheet_safe
from cmgnet.data.dataset import SegmentationDataset, prepare_split
from cmgnet.data.imageio import CONVERSIONS, decode_image, decode_mask, probe, read_encoded, to_array
from cmgnet.deploy import Segmenter
from cmgnet.deploy.predict import lesion_statistics
from cmgnet.model import CMGNet

SIZE = 32  # network input of the tiny predict model


@pytest.fixture(autouse=True)
def _own_validation_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CMGNET_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint (the one of tests/test_deploy.py), logits centred so masks are neither empty nor full."""
    torch.manual_seed(0)
    model = CMGNet(tiny_config()).eval()
    with torch.no_grad():
        model.head.bias -= model(torch.randn(2, 3, SIZE, SIZE)).median()
    return model.save_pretrained(tmp_path_factory.mktemp("decoding") / "checkpoint")


def png16(path: Path, levels: np.ndarray) -> Path:
    """A 16-bit grey (``H x W``) or RGB (``H x W x 3``) PNG written chunk by chunk (Pillow writes no 16-bit RGB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = levels.shape[:2]
    rows = b"".join(b"\x00" + levels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2 if levels.ndim == 3 else 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def decode(path: Path) -> np.ndarray:
    return decode_image(read_encoded(path), path)


# ----------------------------------------------------------------------------- every mode


def _palette(transparency: bool) -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0])
    image.putdata([0, 1, 2])
    if transparency:
        image.info["transparency"] = 0  # index 0 transparent: composited onto black
    return image


def _palette_alpha() -> Image.Image:
    image = Image.new("PA", (2, 1))
    image.putpalette([0, 0, 0, 40, 80, 120])
    image.putdata([(1, 255), (1, 0)])  # opaque palette colour; transparent: onto black
    return image


def _from(mode: str, values: list, size: tuple[int, int] | None = None) -> Image.Image:
    image = Image.new(mode, size or (len(values), 1))
    image.putdata(values)
    return image


# mode -> (image, file suffix, expected RGB row); all one row of pixels.
MODES = {
    "1": (_from("1", [0, 1]), "png", [[0, 0, 0], [255, 255, 255]]),
    "L": (_from("L", [0, 77, 255]), "png", [[0] * 3, [77] * 3, [255] * 3]),
    "P": (_palette(False), "png", [[10, 20, 30], [200, 100, 50], [0, 255, 0]]),
    "P+transparency": (_palette(True), "png", [[0, 0, 0], [200, 100, 50], [0, 255, 0]]),
    "LA": (_from("LA", [(200, 255), (200, 128), (200, 0)]), "png", [[200] * 3, [100] * 3, [0] * 3]),
    "RGBA": (_from("RGBA", [(200, 100, 50, 255), (200, 100, 50, 128), (9, 9, 9, 0)]), "png",
             [[200, 100, 50], [100, 50, 25], [0, 0, 0]]),
    "PA": (_palette_alpha(), "tif", [[40, 80, 120], [0, 0, 0]]),
    "RGB": (_from("RGB", [(1, 2, 3), (250, 128, 0)]), "png", [[1, 2, 3], [250, 128, 0]]),
    "CMYK": (_from("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]), "tif",
             [[255, 255, 255], [0, 255, 255], [0, 0, 0]]),
    "YCbCr": (_from("YCbCr", [(128, 128, 128), (200, 90, 160)]), "tif", None),  # Pillow's BT.601
    "I;16": (_from("I;16", [0, 257, 32768, 65535]), "png", [[0] * 3, [1] * 3, [128] * 3, [255] * 3]),
    "I;16B": (_from("I;16B", [0, 513, 65535]), "tif", [[0] * 3, [2] * 3, [255] * 3]),
    "I": (_from("I", [0, 1000, 65535]), "tif", [[0] * 3, [3] * 3, [255] * 3]),
    "I (16-bit PGM)": (_from("I;16", [0, 300, 65535]), "pgm", [[0] * 3, [1] * 3, [255] * 3]),
    "F": (_from("F", [0.0, 0.5, 1.0]), "tif", [[0] * 3, [128] * 3, [255] * 3]),
}


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_converts_by_its_rule(tmp_path, name):
    image, suffix, expected = MODES[name]
    path = tmp_path / f"x.{suffix}"
    image.save(path)
    stored = Image.open(path).mode
    assert stored in CONVERSIONS, stored
    if expected is None:
        expected = np.array(Image.open(path).convert("RGB"))[0]
    got = decode(path)
    assert got.dtype == np.uint8 and got.shape == (1, len(expected), 3)
    np.testing.assert_array_equal(got[0], np.array(expected, dtype=np.uint8))


def test_sixteen_bit_rgb_keeps_the_high_byte(tmp_path):
    levels = np.array([[[0x80FF, 0x1234, 65535], [0, 256, 511]]], dtype=np.uint16)
    got = decode(png16(tmp_path / "rgb16.png", levels))
    np.testing.assert_array_equal(got, levels >> 8)
    assert probe(tmp_path / "rgb16.png").conversion() == "16-bit"


def test_in_memory_premultiplied_and_padded_modes():
    rgb = np.array([[[10, 20, 30], [200, 100, 0]]], dtype=np.uint8)
    for mode in ("RGBX", "RGBa"):
        image = Image.fromarray(np.concatenate([rgb, np.full((1, 2, 1), 255, np.uint8)], axis=2), "RGBA").convert(mode)
        np.testing.assert_array_equal(to_array(image, "memory"), rgb)
    la = Image.fromarray(np.array([[[90, 255], [90, 0]]], dtype=np.uint8), "LA").convert("La")
    np.testing.assert_array_equal(to_array(la, "memory")[0, :, 0], [90, 0])


@pytest.mark.parametrize("case", ["LAB", "I negative", "F above 1", "F NaN"])
def test_unconvertible_pixels_are_refused_naming_the_file(tmp_path, case):
    image = {
        "LAB": Image.new("LAB", (2, 2), (50, 0, 0)),
        "I negative": _from("I", [-5, 10]),
        "F above 1": _from("F", [0.0, 2.5]),
        "F NaN": _from("F", [0.0, float("nan")]),
    }[case]
    path = tmp_path / "odd image.tif"
    image.save(path)
    with pytest.raises(DataError) as caught:
        decode(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert case.split()[0] in message  # names the mode


def test_masks_sixteen_bit_and_small_labels(tmp_path):
    mask = np.zeros((4, 6), dtype=np.uint16)
    mask[1:3, 2:5] = 65535
    path = tmp_path / "mask16.png"
    Image.fromarray(mask).save(path)  # Pillow writes I;16 as a 16-bit grey PNG
    np.testing.assert_array_equal(decode_mask(read_encoded(path), path), (mask >> 8).astype(np.uint8))
    # Labels 0/200 of 65535 look black in a viewer: refused, not read as lesion (clipping made them 255).
    Image.fromarray(np.where(mask > 0, 200, 0).astype(np.uint16)).save(path)
    with pytest.raises(DataError, match=r"mask16.png: mask is not binary.*full scale 65535"):
        decode_mask(read_encoded(path), path)


def test_mask_transparency_is_background(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere, but only the opaque pixels are painted
    rgba[0, :, 3] = 255
    path = save(rgba, tmp_path / "painted.png")
    np.testing.assert_array_equal(decode_mask(read_encoded(path), path), [[255] * 3, [0] * 3])


# ----------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_as_exif_transpose(tmp_path, orientation):
    pixels = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    path = tmp_path / "phone.png"
    Image.fromarray(pixels).save(path, exif=with_orientation(orientation))
    shown = np.array(ImageOps.exif_transpose(Image.open(path)))
    np.testing.assert_array_equal(decode(path), shown)
    info = probe(path)
    assert (info.height, info.width) == shown.shape[:2] and info.orientation == orientation
    mask = np.where(pixels[..., 0] > 127, 255, 0).astype(np.uint8)
    Image.fromarray(mask).save(path, exif=with_orientation(orientation))
    np.testing.assert_array_equal(decode_mask(read_encoded(path), path),
                                  np.array(ImageOps.exif_transpose(Image.open(path))))


def _exif6_photo(path: Path, displayed: np.ndarray) -> Path:
    """A JPEG stored in sensor orientation whose EXIF orientation 6 shows ``displayed``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rot90(displayed, 1)).save(path, quality=95, exif=with_orientation(6))
    return path


@pytest.mark.slow  # builds and runs a tiny checkpoint (seconds)
def test_predict_writes_masks_as_displayed(checkpoint, tmp_path, capsys):
    displayed = np.random.default_rng(3).integers(0, 256, (40, 24, 3), dtype=np.uint8)  # portrait as shown
    photo = _exif6_photo(tmp_path / "in" / "phone.jpg", displayed)
    assert Image.open(photo).size == (40, 24)  # stored landscape
    out = tmp_path / "out"
    assert cli_main(["predict", str(checkpoint), str(photo), "--out", str(out), "--image-size", str(SIZE),
                     "--no-progress"]) == 0
    shown = np.array(ImageOps.exif_transpose(Image.open(photo)))  # what a viewer shows: 24 wide, 40 high
    [expected] = Segmenter.load(checkpoint, backend="torch", device="cpu", image_size=SIZE).predict([shown])
    mask = np.array(Image.open(out / "masks" / "phone.png")) > 0
    assert mask.shape == (40, 24)
    np.testing.assert_array_equal(mask, expected.mask)
    assert 0 < mask.sum() < mask.size  # a mask that locates something
    row = next(csv.DictReader(open(out / "predictions.csv")))
    stats = lesion_statistics(expected.mask, expected.probability)
    assert (int(row["height"]), int(row["width"])) == (40, 24)
    for key in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "lesion_pixels"):
        assert int(row[key]) == stats[key], key
    assert (float(row["centroid_x"]), float(row["centroid_y"])) == (stats["centroid_x"], stats["centroid_y"])
    assert Image.open(out / "overlays" / "phone.png").size == (24, 40)


# ----------------------------------------------------------------------------- datasets


def _folder(root: Path, write_image, n: int = 4, size: int = 32) -> Path:
    """A folder dataset of ``n`` cases: a bright square on dark skin, the mask drawn on the displayed view.

    ``write_image(path_without_suffix, displayed_rgb)`` stores the image (and returns its path).
    """
    rows = []
    for index in range(n):
        displayed = np.full((size, size, 3), 40, dtype=np.uint8)
        top, left = 2 + 3 * index, 4 + 2 * index  # off-centre: any rotation moves it
        displayed[top : top + 8, left : left + 12] = 220
        mask = np.where(displayed[..., 0] > 127, 255, 0).astype(np.uint8)
        write_image(root / "images" / f"case{index}", displayed)
        save(mask, root / "masks" / f"case{index}.png")
        rows.append((f"case{index}", "train" if index < n - 1 else "test"))
    write_csv(root / "metadata.csv", ("image_id", "split"), rows)
    return root


def _config(root: Path, loader: str = "torch", size: int = 32) -> DataConfig:
    return DataConfig(format="folder", root=str(root), image_size=size, loader=loader, augment="none",
                      mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_workers=1)


def _rotated_png(stem: Path, displayed: np.ndarray) -> Path:
    path = stem.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rot90(displayed, 1)).save(path, exif=with_orientation(6))
    return path


def _grey16(stem: Path, displayed: np.ndarray) -> Path:
    path = stem.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    # >> 8 gives v8 back; a rounding / 257 (DALI's own 16-bit decoding) would give v8 + 1 for dark levels.
    Image.fromarray(displayed[..., 0].astype(np.uint16) * 256 + 200).save(path)
    return path


@pytest.mark.parametrize("write_image", [_rotated_png, _grey16], ids=["exif-rotated", "16-bit-grey"])
def test_training_dataset_reads_as_displayed(tmp_path, write_image):
    root = _folder(tmp_path / "data", write_image)
    data = prepare_split(_config(root), "train", train=False)
    assert set(data.converted) == {"case0", "case1", "case2"}
    dataset = SegmentationDataset(data)
    for index, sample in enumerate(data.samples):
        item = dataset[index]
        image = (item["image"] * 255).round().to(torch.uint8)  # mean 0, std 1: x / 255
        mask = item["mask"][0] > 0.5
        expected = decode_mask(read_encoded(sample.record.mask_path), sample.record.mask_path) > 127
        np.testing.assert_array_equal(mask.numpy(), expected)
        assert (image[:, mask] == 220).all() and (image[:, ~mask] == 40).all()  # grey levels right, pairing right


def test_square_mask_drawn_on_the_raw_view_no_longer_pairs(tmp_path):
    """A non-square EXIF-rotated image whose mask follows the stored pixels: refused, the message says why."""
    root = tmp_path / "data"
    displayed = np.zeros((24, 40, 3), dtype=np.uint8)
    _exif6_photo(root / "images" / "case0.jpg", displayed)
    save(np.zeros((24, 40), dtype=np.uint8), root / "masks" / "case0.png")  # the displayed size: pairs
    save(np.zeros((40, 24), dtype=np.uint8), root / "masks" / "case1.png")  # the stored size: does not
    _exif6_photo(root / "images" / "case1.jpg", displayed)
    report = validate_records(read_folder(root), level="full")
    assert report.sizes["case0"] == (40, 24) and len(report.errors) == 1
    message = str(report.errors[0])
    assert "case1.png" in message and "EXIF orientation 6" in message


def test_data_check_reports_converted_files_and_refuses_unconvertible(tmp_path, capsys):
    root = _folder(tmp_path / "data", _grey16, n=2)
    assert cli_main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "converted when decoded" in out and "case0 (image: mode I;16)" in out
    Image.new("LAB", (32, 32)).save(root / "images" / "case1.png", format="TIFF")  # a TIFF named .png
    assert cli_main(["data", "check", str(root)]) == 1
    problems = [line for line in capsys.readouterr().out.splitlines() if "case1.png" in line]
    assert len(problems) == 1 and "pixel mode LAB" in problems[0]


@pytest.mark.slow  # builds and runs a tiny checkpoint (seconds)
def test_predict_sixteen_bit_grey_and_refusal(checkpoint, tmp_path, capsys):
    grey = np.tile(np.linspace(10, 250, 24).astype(np.uint8), (20, 1))
    image = tmp_path / "in" / "grey16.png"
    image.parent.mkdir()
    Image.fromarray(grey.astype(np.uint16) * 256 + 255).save(image)
    lab = tmp_path / "in" / "lab.tif"
    Image.new("LAB", (8, 8)).save(lab)
    out = tmp_path / "out"
    assert cli_main(["predict", str(checkpoint), str(image), str(lab), "--out", str(out), "--image-size", str(SIZE),
                     "--no-progress"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {lab}: ") and "LAB" in errors[0]
    mask = np.array(Image.open(out / "masks" / "grey16.png")) > 0
    overlay = np.array(Image.open(out / "overlays" / "grey16.png"))
    assert mask.any() and not mask.all()
    # Outside the lesion the overlay is the decoded image: the 16-bit grey levels, not white.
    np.testing.assert_array_equal(overlay[~mask], np.repeat(grey[..., None], 3, axis=2)[~mask])


@requires_dali
@pytest.mark.parametrize("write_image", [_rotated_png, _grey16], ids=["exif-rotated", "16-bit-grey"])
def test_dali_decodes_converted_files_as_pytorch_does(tmp_path, write_image):
    root = _folder(tmp_path / "data", write_image)
    batches = {}
    for loader in ("torch", "dali"):
        batches[loader] = list(build_loader(_config(root, loader), "train", 3, train=False))
    for a, b in zip(batches["torch"], batches["dali"], strict=True):
        assert a["image_id"] == b["image_id"]
        torch.testing.assert_close(b["image"].cpu(), a["image"], atol=1e-6, rtol=0)
        assert torch.equal(b["mask"].cpu(), a["mask"])


# ----------------------------------------------------------------------------- CSV injection


def test_spreadsheet_safe_escapes_text_cells_only():
    row = {"image_id": "=cmd|' /C calc'!A0", "sentence": "@SUM(1+1)", "path": "+1", "error": "-2",
           "tab": "\tx", "cr": "\rx", "plain": "ISIC_1", "dice": -0.5, "count": "-3"}
    safe = spreadsheet_safe(row, ("image_id", "sentence", "path", "error", "tab", "cr", "plain", "missing"))
    assert safe == row | {"image_id": "'=cmd|' /C calc'!A0", "sentence": "'@SUM(1+1)", "path": "'+1",
                          "error": "'-2", "tab": "'\tx", "cr": "'\rx"}
    assert row["image_id"].startswith("=")  # the caller's row is left alone


@pytest.mark.slow  # builds and runs a tiny checkpoint (seconds)
def test_predictions_csv_escapes_names_and_sentences(checkpoint, tmp_path):
    images = tmp_path / "in"
    save(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8), images / "=cmd.png")
    metadata = write_csv(tmp_path / "metadata.csv", ("image_id", "description"),
                         [("=cmd", "@SUM(1+1)*cmd|' /C calc'!A0")])
    out = tmp_path / "out"
    assert cli_main(["predict", str(checkpoint), str(images), "--out", str(out), "--metadata", str(metadata),
                     "--image-size", str(SIZE), "--no-progress"]) == 0
    row = next(csv.DictReader(open(out / "predictions.csv")))
    assert row["image_id"] == "'=cmd" and row["sentence"] == "'@SUM(1+1)*cmd|' /C calc'!A0"
    assert row["status"] == "ok" and float(row["lesion_fraction"]) >= 0 and not row["width"].startswith("'")
    assert (out / "masks" / "=cmd.png").is_file()


def test_per_image_csv_escapes_ids(tmp_path):
    from cmgnet.metrics import per_image_rows
    from cmgnet.train.evaluate import build_result, write_result

    target = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    target[:, :, 1:3, 1:3] = True
    rows = per_image_rows(target, target, ["=HYPERLINK(1)", "-1", "ISIC_2"], with_hd95=False)
    written = write_result(build_result(rows, "test", "none", with_hd95=False), tmp_path)
    cells = {r["image_id"]: r for r in csv.DictReader(open(written["csv"]))}
    assert set(cells) == {"'=HYPERLINK(1)", "'-1", "ISIC_2"}
    assert float(cells["'-1"]["dice"]) == 1.0 and cells["'-1"]["tp"] == "4" and cells["'-1"]["split"] == "test"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_bytes_are_refused_by_the_decoder_itself(tmp_path, fmt):
    # Bytes that never passed through read_encoded (the MLflow model's cells, a server request).
    import io

    from cmgnet.train.pyfunc_model import decode

    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), 120, np.uint8)).save(buffer, fmt)
    data = np.frombuffer(buffer.getvalue(), np.uint8)
    assert decode_image(data, Path("whole")).shape == (32, 48, 3)
    with pytest.raises(DataError, match="truncated"):
        decode_image(data[: len(data) - 20], Path("cut"))
    with pytest.raises(DataError, match="truncated"):
        decode(buffer.getvalue()[:-20])
