"""Pseudo-text: vocabulary, templates, patient clauses and text regimes (paper section 3.3)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cmgnet.text.pseudo_text import (
    DIAGNOSES,
    NEUTRAL_SENTENCE,
    TEMPLATES,
    TEXT_REGIMES,
    make_sentence,
    normalize_diagnosis,
    patient_clause,
    shuffled_donors,
    shuffled_sentences,
)


def record(diagnosis=None, age=None, sex=None, site=None, description=None):
    return SimpleNamespace(diagnosis=diagnosis, age=age, sex=sex, site=site, description=description)


def test_neutral_sentence_is_fixed():
    assert NEUTRAL_SENTENCE == "Skin lesion."


def test_every_diagnosis_has_a_distinct_clinical_template():
    assert set(TEMPLATES) == set(DIAGNOSES)
    sentences = [TEMPLATES[d] for d in DIAGNOSES if d != "unknown"]
    assert len(set(sentences)) == len(sentences)
    for sentence in sentences:
        assert sentence.endswith(".") and sentence[0].isupper()
        assert any(word in sentence.lower() for word in ("border", "color", "colour", "red", "pink", "brown", "pearly"))


def test_paper_example_for_melanoma():
    assert make_sentence(record("melanoma", 55, "male", "back")) == (
        "Asymmetric lesion with irregular borders and multiple colors. "
        "Lesion on the back of a 55-year-old male patient."
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("MEL", "melanoma"),
        ("nv", "nevus"),
        ("Seborrheic keratosis", "seborrheic_keratosis"),
        ("seborrheic-keratosis", "seborrheic_keratosis"),
        ("BCC", "basal_cell_carcinoma"),
        ("akiec", "actinic_keratosis"),
        ("bkl", "benign_keratosis"),
        ("df", "dermatofibroma"),
        ("VASC", "vascular_lesion"),
        ("Atypical Nevus", "atypical_nevus"),
        ("common nevus", "nevus"),
        ("unknown", "unknown"),
    ],
)
def test_normalize_diagnosis_aliases(value, expected):
    assert normalize_diagnosis(value) == expected


@pytest.mark.parametrize("value", ["psoriasis", "", "lentigo NOS"])
def test_unknown_diagnosis_raises(value):
    with pytest.raises(ValueError, match="unknown diagnosis"):
        normalize_diagnosis(value)


@pytest.mark.parametrize("diagnosis", DIAGNOSES)
def test_oracle_sentence_for_every_diagnosis(diagnosis):
    sentence = make_sentence(record(diagnosis, 40, "female", "lower extremity"), "oracle")
    assert sentence.endswith("Lesion on the lower extremity of a 40-year-old female patient.")
    if diagnosis != "unknown":
        assert sentence.startswith(TEMPLATES[diagnosis])


@pytest.mark.parametrize(
    ("age", "sex", "site", "expected"),
    [
        (None, None, None, ""),
        (80, None, None, "Lesion of an 80-year-old patient."),
        (18, "female", None, "Lesion of an 18-year-old female patient."),
        (None, "male", None, "Lesion of a male patient."),
        (None, None, "scalp", "Lesion on the scalp."),
        (42.5, "male", "trunk", "Lesion on the trunk of a 42.5-year-old male patient."),
    ],
)
def test_patient_clause_omits_missing_fields(age, sex, site, expected):
    assert patient_clause(age, sex, site) == expected


def test_regimes():
    r = record("melanoma", 70, "male", "back")
    assert make_sentence(r, "none") == NEUTRAL_SENTENCE
    assert make_sentence(r, "metadata") == "Lesion on the back of a 70-year-old male patient."
    assert make_sentence(r, "predicted", predicted_diagnosis="NV").startswith(TEMPLATES["nevus"])
    assert make_sentence(r, "oracle").startswith(TEMPLATES["melanoma"])
    assert set(TEXT_REGIMES) == {"none", "metadata", "shuffled", "predicted", "oracle"}
    with pytest.raises(ValueError, match="shuffled_sentences"):  # a split's regime, not one record's
        make_sentence(r, "shuffled")


def test_nothing_known_gives_neutral_sentence():
    for regime in ("metadata", "oracle"):
        assert make_sentence(record(), regime) == NEUTRAL_SENTENCE
    assert make_sentence(record("unknown"), "oracle") == NEUTRAL_SENTENCE
    assert make_sentence(record(), "predicted", predicted_diagnosis="unknown") == NEUTRAL_SENTENCE


def test_description_is_used_verbatim_except_in_none():
    r = record("melanoma", 70, "male", "back", description="  Itchy, growing mole on the left shoulder. ")
    for regime in ("metadata", "oracle"):
        assert make_sentence(r, regime) == "Itchy, growing mole on the left shoulder."
    assert make_sentence(r, "none") == NEUTRAL_SENTENCE


def test_bad_regime_and_missing_prediction():
    with pytest.raises(ValueError, match="unknown text regime"):
        make_sentence(record(), "leaky")
    with pytest.raises(ValueError, match="predicted_diagnosis"):
        make_sentence(record("nevus"), "predicted")


@pytest.mark.parametrize("n", [2, 3, 7, 50])
def test_shuffled_donors_are_a_reproducible_derangement(n):
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    donors = shuffled_donors(ids, seed=3)
    assert sorted(donors) == ids and sorted(donors.values()) == ids  # a permutation of the images
    assert all(donors[i] != i for i in ids)  # no image keeps its own sentence
    assert shuffled_donors(list(reversed(ids)), seed=3) == donors  # fixed by the seed, not the order
    if n > 3:
        assert shuffled_donors(ids, seed=4) != donors


def test_shuffled_sentences_take_another_images_metadata():
    records = [record("melanoma", 30 + 10 * i, "male" if i % 2 else "female", f"site{i}") for i in range(6)]
    ids = [f"img{i}" for i in range(6)]
    own = [make_sentence(r, "metadata") for r in records]
    shuffled = shuffled_sentences(records, ids, seed=0)
    assert sorted(shuffled) == sorted(own) and all(a != b for a, b in zip(shuffled, own))
    assert shuffled == shuffled_sentences(records, ids, seed=0)
    assert not any(TEMPLATES["melanoma"] in s for s in shuffled)  # metadata only: no diagnosis leaks in
    # Samples of one image (fixed variants) share one donor; a one-image split keeps its own.
    twice = shuffled_sentences([records[0], records[0], records[1]], ["img0", "img0", "img1"], seed=0)
    assert twice == [own[1], own[1], own[0]]
    assert shuffled_sentences(records[:1], ids[:1]) == own[:1]
