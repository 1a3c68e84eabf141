"""Bad input: every case gets a DataError naming the file (and CSV row), never a silent skip."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from data_fixtures import make_folder, make_ham10000, make_isic2018, png_header_only, requires_dali, save, write_csv

from cmgnet.data import DataConfig, DataError, build_loader, read_folder, read_isic2017, read_isic2018, validate_records
from cmgnet.data.check import main as check_main
from cmgnet.data.imageio import decode_image, probe, read_encoded
from cmgnet.data.protocols import read_split_csv


def rewrite_metadata(root, row_index, **changes):
    path = root / "metadata.csv"
    rows = list(csv.reader(path.read_text().splitlines()))
    header = rows[0]
    for name, value in changes.items():
        rows[row_index + 1][header.index(name)] = value
    write_csv(path, header, rows[1:])
    return path


def only_error(records, level="full"):
    report = validate_records(records, level=level)
    assert len(report.errors) == 1, report.errors
    return report.errors[0]


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data", n=4, splits=("train", "val"))


def test_unreadable_image(folder):
    (folder / "images" / "case001.png").write_bytes(b"this is not an image")
    error = only_error(read_folder(folder), level="header")
    assert "case001.png" in str(error) and "unreadable" in str(error)


def truncate_one_image(folder):
    image = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    path = save(image, folder / "images" / "case002.jpg")
    (folder / "images" / "case002.png").unlink()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_truncated_image_refused_by_validation(folder):
    path = truncate_one_image(folder)
    error = only_error(read_folder(folder))
    assert "case002.jpg" in str(error) and "truncated" in str(error)
    with pytest.raises(DataError, match="case002.jpg.*truncated"):
        read_encoded(path)


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=requires_dali)])
def test_truncated_image_stops_the_loader(folder, loader):
    truncate_one_image(folder)  # the header is intact, so the default header-level validation passes
    cfg = DataConfig(format="folder", root=str(folder), image_size=32, loader=loader, num_workers=1)
    with pytest.raises(DataError, match="case002.jpg.*truncated"):
        list(build_loader(cfg, "train", 2, train=False))


def test_mask_of_another_size(folder):
    save(np.zeros((20, 30), np.uint8), folder / "masks" / "case003.png")
    error = only_error(read_folder(folder), level="header")
    assert "case003.png" in str(error) and "30x20" in str(error) and "48x48" in str(error)


def test_non_binary_mask(folder):
    save(np.tile(np.arange(48, dtype=np.uint8) * 5, (48, 1)), folder / "masks" / "case000.png")
    error = only_error(read_folder(folder))
    assert "masks/case000.png" in str(error) and "not binary" in str(error)
    assert not validate_records(read_folder(folder), level="header").errors  # needs decoding to see


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=requires_dali)])
def test_non_binary_mask_stops_the_loader(folder, loader):
    save(np.full((48, 48), 60, np.uint8), folder / "masks" / "case000.png")
    cfg = DataConfig(format="folder", root=str(folder), image_size=32, loader=loader, num_workers=1)
    with pytest.raises(DataError, match="case000.png.*not binary"):
        list(build_loader(cfg, "train", 2, train=False))


def test_missing_mask(folder):
    (folder / "masks" / "case001.png").unlink()
    with pytest.raises(DataError, match="masks.*missing mask for image 'case001'"):
        read_folder(folder)


def test_missing_mask_refused_for_training(folder):
    records = read_folder(folder)
    records[0].mask_path = None
    assert "no mask" in str(only_error(records, level="header"))


def test_duplicate_ids(folder, tmp_path):
    save(np.zeros((48, 48, 3), np.uint8), folder / "images" / "case001.jpg")
    with pytest.raises(DataError, match="duplicate image id 'case001'"):
        read_folder(folder)
    root = make_isic2018(tmp_path / "isic", {"Training": 1, "Validation": 1})
    source = root / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000000.jpg"
    (root / "ISIC2018_Task1-2_Validation_Input" / "ISIC_0000001.jpg").rename(
        source.parent.parent / "ISIC2018_Task1-2_Validation_Input" / "ISIC_0000000.jpg"
    )
    (root / "ISIC2018_Task1_Validation_GroundTruth" / "ISIC_0000001_segmentation.png").rename(
        root / "ISIC2018_Task1_Validation_GroundTruth" / "ISIC_0000000_segmentation.png"
    )
    with pytest.raises(DataError, match="duplicate image id 'ISIC_0000000'"):
        read_isic2018(root)


def test_duplicate_metadata_row(folder):
    path = folder / "metadata.csv"
    path.write_text(path.read_text() + "case000,nevus,30,male,back,,train\n")
    with pytest.raises(DataError, match=r"metadata.csv, row 6: duplicate image id 'case000' \(first on row 2\)"):
        read_folder(folder)


def test_csv_without_expected_columns(folder, tmp_path):
    write_csv(folder / "metadata.csv", ("name", "diagnosis"), [("case000", "nevus")])
    with pytest.raises(DataError, match=r"metadata.csv, row 1: no image id column"):
        read_folder(folder)
    write_csv(folder / "metadata.csv", ("image_id", "colour"), [("case000", "brown")])
    with pytest.raises(DataError, match="no metadata column"):
        read_folder(folder)
    records = read_folder(make_folder(tmp_path / "ok", n=2, metadata=False))
    bad = write_csv(tmp_path / "split.csv", ("image_id", "fold"), [("case000", 1)])
    with pytest.raises(DataError, match="split.csv, row 1: split CSV needs columns image_id and split"):
        read_split_csv(bad, records)


def test_unknown_diagnosis_names_file_and_row(folder):
    rewrite_metadata(folder, 2, diagnosis="psoriasis")
    with pytest.raises(DataError, match=r"metadata.csv, row 4: unknown diagnosis 'psoriasis'"):
        read_folder(folder)


def test_non_numeric_age_names_file_and_row(folder):
    rewrite_metadata(folder, 1, age="forty")
    with pytest.raises(DataError, match=r"metadata.csv, row 3: age 'forty' is not a number"):
        read_folder(folder)


def test_bad_sex_and_split_values(folder):
    rewrite_metadata(folder, 0, sex="x")
    with pytest.raises(DataError, match="row 2: sex 'x'"):
        read_folder(folder)
    rewrite_metadata(folder, 0, sex="f", split="holdout")
    with pytest.raises(DataError, match="row 2: split 'holdout'"):
        read_folder(folder)


def test_metadata_row_without_image(folder):
    rewrite_metadata(folder, 3, image_id="case999")
    with pytest.raises(DataError, match=r"row 5: image id 'case999' has no file"):
        read_folder(folder)


def test_isic2017_label_row_with_both_classes(tmp_path):
    from cmgnet.data import generate_dataset

    root = generate_dataset(tmp_path / "d", 2, 0, 0, size=32)
    write_csv(
        root / "ISIC-2017_Training_Part3_GroundTruth.csv",
        ("image_id", "melanoma", "seborrheic_keratosis"),
        [("ISIC_0000000", "0.0", "0.0"), ("ISIC_0000001", "1.0", "1.0")],
    )
    with pytest.raises(DataError, match="Part3_GroundTruth.csv, row 3: both melanoma and seborrheic_keratosis"):
        read_isic2017(root)


def test_conflicting_metadata_tables(tmp_path):
    root = make_ham10000(tmp_path / "ham", n=2)
    other = write_csv(tmp_path / "other.csv", ("image_id", "diagnosis"), [("ISIC_0024306", "melanoma")])
    with pytest.raises(DataError, match="other.csv, row 2: diagnosis of 'ISIC_0024306' is 'melanoma' here but 'nevus'"):
        from cmgnet.data import read_ham10000

        read_ham10000(root, metadata=[other])


def test_empty_folder(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="images: no images"):
        read_folder(tmp_path)


def test_wrong_layout(tmp_path):
    folder = make_folder(tmp_path, n=1)
    with pytest.raises(DataError, match="wrong layout: expected one of ISIC-2017_Training_Data/.*found images, masks"):
        read_isic2017(folder)
    with pytest.raises(DataError, match="dataset folder not found"):
        read_folder(tmp_path / "nowhere")


def test_oversized_image_refused_before_decoding(tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)  # 10 G pixels if decoded
    with pytest.raises(DataError, match="bomb.png: image is larger than 179 MP, above the 80 MP limit"):
        probe(bomb)
    with pytest.raises(DataError, match="above the"):
        decode_image(read_encoded(bomb), bomb)
    large = png_header_only(tmp_path / "large.png", 10_000, 10_000)  # over our limit, under PIL's
    with pytest.raises(DataError, match="large.png: image is 10000x10000 = 100 MP, above the 80 MP limit"):
        probe(large)
    with pytest.raises(DataError, match="large.png: image is 10000x10000"):
        decode_image(read_encoded(large), large)
    small = save(np.zeros((40, 40, 3), np.uint8), tmp_path / "small.png")
    with pytest.raises(DataError, match="small.png.*above the"):
        probe(small, max_pixels=1000)


def test_check_command_reports_every_problem(folder, capsys):
    save(np.full((48, 48), 60, np.uint8), folder / "masks" / "case000.png")
    (folder / "images" / "case001.png").write_bytes(b"junk")
    assert check_main([str(folder)]) == 1
    out = capsys.readouterr().out
    assert "2 problem(s)" in out and "case000.png" in out and "case001.png" in out
    assert check_main([str(folder / "nowhere")]) == 1
    assert "dataset folder not found" in capsys.readouterr().out


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="protocol"):
        DataConfig(protocol="random")
    with pytest.raises(ValueError, match="multiple of 16"):
        DataConfig(image_size=100)
    with pytest.raises(ValueError, match="split_csv"):
        DataConfig(protocol="split-csv")
    assert DataConfig(mean=[0.5, 0.5, 0.5], metadata="x.csv").metadata == ["x.csv"]
