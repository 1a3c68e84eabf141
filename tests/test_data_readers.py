"""Readers on small fixtures in each official layout, and on the real data in ../shared/data."""

from __future__ import annotations

from collections import Counter

import pytest
from data_fixtures import (
    HAM10000,
    ISIC2017_METADATA,
    ISIC2018_256,
    make_folder,
    make_ham10000,
    make_isic2018,
    make_ph2,
    requires_shared_data,
    write_csv,
)

from cmgnet.data import (
    detect_format,
    generate_dataset,
    read_dataset,
    read_folder,
    read_ham10000,
    read_isic2017,
    read_isic2018,
    read_ph2,
    validate_records,
)
from cmgnet.data.check import main as check_main


@pytest.fixture(scope="module")
def isic2017(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("isic2017"), 6, 3, 3, size=32, seed=1)


def test_isic2017_official_layout(isic2017):
    records = read_isic2017(isic2017)
    assert Counter(r.split for r in records) == {"train": 6, "val": 3, "test": 3}
    assert all(r.source == "isic2017" and r.mask_path.name == f"{r.image_id}_segmentation.png" for r in records)
    assert {r.diagnosis for r in records} <= {"nevus", "melanoma", "seborrheic_keratosis"}
    assert any(r.age is not None for r in records) and any(r.sex is not None for r in records)
    assert [r.image_id for r in records] == sorted(r.image_id for r in records)
    assert not validate_records(records, level="full").errors


def test_isic2017_skips_superpixels_and_reads_unlabelled_split(isic2017, tmp_path):
    (isic2017 / "ISIC-2017_Training_Data" / "ISIC_0000000_superpixels.png").write_bytes(b"")
    assert len(read_isic2017(isic2017)) == 12
    root = generate_dataset(tmp_path / "d", 2, 0, 2, size=32)
    for path in (root / "ISIC-2017_Test_v2_Part1_GroundTruth").iterdir():
        path.unlink()
    (root / "ISIC-2017_Test_v2_Part1_GroundTruth").rmdir()
    test = [r for r in read_isic2017(root) if r.split == "test"]
    assert len(test) == 2 and all(r.mask_path is None for r in test)


def test_isic2018_with_external_metadata(tmp_path):
    root = make_isic2018(tmp_path / "isic2018", {"Training": 3, "Validation": 2})
    labels = write_csv(
        tmp_path / "meta" / "ISIC-2017_Training_Part3_GroundTruth.csv",
        ("image_id", "melanoma", "seborrheic_keratosis"),
        [("ISIC_0000000", "1.0", "0.0"), ("ISIC_0000001", "0.0", "0.0"), ("ISIC_9999999", "0.0", "1.0")],
    )
    write_csv(
        tmp_path / "meta" / "ISIC-2017_Training_Data_metadata.csv",
        ("image_id", "age_approximate", "sex"),
        [("ISIC_0000000", "55", "male"), ("ISIC_0000001", "unknown", "unknown")],
    )
    task3 = write_csv(
        tmp_path / "task3.csv",
        ("image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"),
        [("ISIC_0000004", 0, 0, 1, 0, 0, 0, 0)],
    )
    records = {r.image_id: r for r in read_isic2018(root, metadata=[tmp_path / "meta", task3])}
    assert Counter(r.split for r in records.values()) == {"train": 3, "val": 2}
    assert (records["ISIC_0000000"].diagnosis, records["ISIC_0000000"].age, records["ISIC_0000000"].sex) == (
        "melanoma",
        55,
        "male",
    )
    assert (records["ISIC_0000001"].diagnosis, records["ISIC_0000001"].age, records["ISIC_0000001"].sex) == (
        "nevus",
        None,
        None,
    )
    assert records["ISIC_0000004"].diagnosis == "basal_cell_carcinoma"
    assert records["ISIC_0000002"].diagnosis is None  # not in any table: no text but the neutral one
    assert read_isic2018(root, metadata=labels)[0].diagnosis == "melanoma"  # a single path works too


def test_ham10000_layout(tmp_path):
    records = read_ham10000(make_ham10000(tmp_path))
    assert len(records) == 4  # the metadata row without an image is ignored
    first = records[0]
    assert (first.diagnosis, first.age, first.sex, first.site, first.split) == ("nevus", 45, "male", "back", None)
    assert first.lesion_id == "HAM_0000000" and records[1].group == records[0].group
    assert [r.diagnosis for r in records] == ["nevus", "melanoma", "benign_keratosis", "dermatofibroma"]


@pytest.mark.parametrize("table", ["txt", "xlsx"])
def test_ph2_layout(tmp_path, table):
    if table == "xlsx":
        pytest.importorskip("openpyxl", reason="openpyxl reads PH2_dataset.xlsx")
    records = read_ph2(make_ph2(tmp_path, n=3, table=table))
    assert [r.image_id for r in records] == ["IMD002", "IMD003", "IMD004"]
    assert [r.diagnosis for r in records] == ["nevus", "atypical_nevus", "melanoma"]
    assert all(r.image_path.suffix == ".bmp" and r.mask_path.name.endswith("_lesion.bmp") for r in records)
    assert not validate_records(records, level="full").errors


def test_folder_layout(tmp_path):
    records = read_folder(make_folder(tmp_path, n=6))
    assert Counter(r.split for r in records) == {"train": 4, "val": 1, "test": 1}
    assert records[0].description == "Raised pink papule noted by the clinician."
    assert records[1].description is None and records[1].site == "back" and records[1].age == 31
    assert all(r.mask_path.name == f"{r.image_id}.png" for r in records)


def test_folder_without_metadata_and_segmentation_suffix(tmp_path):
    records = read_folder(make_folder(tmp_path, n=3, metadata=False, mask_suffix="_segmentation"))
    assert all(r.split is None and r.diagnosis is None for r in records)
    assert all(r.mask_path.name.endswith("_segmentation.png") for r in records)


def test_folder_without_masks_is_unlabelled(tmp_path):
    root = make_folder(tmp_path, n=2, metadata=False)
    for path in (root / "masks").iterdir():
        path.unlink()
    (root / "masks").rmdir()
    assert all(r.mask_path is None for r in read_folder(root))


def test_detect_format_and_dispatch(tmp_path, isic2017):
    folder = make_folder(tmp_path / "f", n=2)
    ph2 = make_ph2(tmp_path / "p", n=1)
    ham = make_ham10000(tmp_path / "h", n=1)
    isic2018 = make_isic2018(tmp_path / "i", {"Training": 1})
    expected = {isic2017: "isic2017", isic2018: "isic2018", ph2: "ph2", ham: "ham10000", folder: "folder"}
    for root, name in expected.items():
        assert detect_format(root) == name
        assert read_dataset("auto", root) == read_dataset(name, root)


def test_check_command_prints_summary(isic2017, capsys):
    assert check_main([str(isic2017)]) == 0
    out = capsys.readouterr().out
    assert "format isic2017, 12 images" in out and "32x32 (12)" in out and "OK" in out
    assert "melanoma" in out or "nevus" in out


@requires_shared_data
def test_real_isic2018_joined_with_isic2017_metadata():
    records = read_isic2018(ISIC2018_256, metadata=[ISIC2017_METADATA])
    assert len(records) == 2065
    with_diagnosis = [r for r in records if r.diagnosis is not None]
    assert len(with_diagnosis) == 1921
    assert {r.diagnosis for r in with_diagnosis} == {"melanoma", "nevus", "seborrheic_keratosis"}
    assert all(r.age is None and r.sex is None for r in records if r.diagnosis is None)  # 144 with no metadata at all
    sample = records[::100]
    report = validate_records(sample, level="full")
    assert not report.errors and set(report.sizes.values()) == {(256, 256)}


@requires_shared_data
def test_real_ham10000():
    records = read_ham10000(HAM10000)
    assert len(records) == 5 and all(r.diagnosis and r.lesion_id and r.site for r in records)
    report = validate_records(records, level="full")
    assert not report.errors and set(report.sizes.values()) == {(600, 450)}
