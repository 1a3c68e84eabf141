"""Pseudo-text from lesion metadata (CMG-Net paper, section 3.3; docs/design.md section 2.2).

A record's sentence is a diagnosis template (morphology a dermatologist would name:
symmetry, border, colour, dermoscopic structures) followed by a patient clause built from
age, sex and body site, each omitted when missing. With nothing known the sentence is
:data:`NEUTRAL_SENTENCE`. A free-text ``description`` is used verbatim.

The *text regime* decides what the sentence may use, because the diagnosis is the pathology
ground truth and feeding it at test time leaks the answer:

- ``none``: always the neutral sentence;
- ``metadata``: age, sex and site only (what a clinic knows before pathology);
- ``shuffled``: the ``metadata`` sentence of *another* image of the same split (a fixed-seed
  derangement, :func:`shuffled_donors`): the control that tells whether a model uses its own
  image's metadata or only the sentence's form;
- ``predicted``: the template of a diagnosis predicted from the image by the caller;
- ``oracle``: the template of the ground-truth diagnosis (the paper's setting).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

NEUTRAL_SENTENCE = "Skin lesion."

DIAGNOSES: tuple[str, ...] = (
    "melanoma",
    "nevus",
    "atypical_nevus",
    "seborrheic_keratosis",
    "basal_cell_carcinoma",
    "actinic_keratosis",
    "benign_keratosis",
    "dermatofibroma",
    "vascular_lesion",
    "unknown",
)
"""The diagnosis vocabulary (docs/design.md section 3)."""

# ISIC / HAM10000 codes, plural and British spellings, and the long HAM10000 class names.
_ALIASES: dict[str, str] = {
    "mel": "melanoma",
    "nv": "nevus",
    "naevus": "nevus",
    "nevi": "nevus",
    "common_nevus": "nevus",
    "melanocytic_nevus": "nevus",
    "melanocytic_nevi": "nevus",
    "atypical_naevus": "atypical_nevus",
    "dysplastic_nevus": "atypical_nevus",
    "sk": "seborrheic_keratosis",
    "seborrhoeic_keratosis": "seborrheic_keratosis",
    "bcc": "basal_cell_carcinoma",
    "akiec": "actinic_keratosis",
    "actinic_keratoses": "actinic_keratosis",
    "bkl": "benign_keratosis",
    "benign_keratosis_like_lesions": "benign_keratosis",
    "df": "dermatofibroma",
    "vasc": "vascular_lesion",
    "vascular_lesions": "vascular_lesion",
}

TEMPLATES: dict[str, str] = {
    # The paper's own example sentence, kept verbatim for reproduction.
    "melanoma": "Asymmetric lesion with irregular borders and multiple colors.",
    "nevus": "Symmetric lesion with regular borders, uniform brown color and a regular pigment network.",
    "atypical_nevus": (
        "Mildly asymmetric lesion with slightly irregular borders, varied shades of brown "
        "and an irregular pigment network."
    ),
    "seborrheic_keratosis": (
        "Sharply demarcated waxy lesion with a stuck-on appearance, light to dark brown color, "
        "milia-like cysts and comedo-like openings."
    ),
    "basal_cell_carcinoma": (
        "Pearly pink lesion with arborizing vessels, blue-gray ovoid nests and no pigment network."
    ),
    "actinic_keratosis": ("Rough scaly pink to red lesion with a strawberry pattern and white surface scale."),
    "benign_keratosis": (
        "Well-demarcated light to dark brown lesion with a fingerprint-like pattern and a moth-eaten border."
    ),
    "dermatofibroma": (
        "Small symmetric firm pink-brown lesion with a central white scar-like patch and a delicate "
        "peripheral pigment network."
    ),
    "vascular_lesion": "Well-circumscribed red to purple lesion with red-blue lacunae and no pigment network.",
    "unknown": NEUTRAL_SENTENCE,
}

TEXT_REGIMES: tuple[str, ...] = ("none", "metadata", "shuffled", "predicted", "oracle")
SPLIT_REGIMES: tuple[str, ...] = ("shuffled",)
"""Regimes whose sentence depends on the other images of the split (built by :func:`shuffled_sentences`)."""


class TextSource(Protocol):
    """What a sentence is built from (a :class:`cmgnet.data.records.LesionRecord` fits)."""

    diagnosis: str | None
    age: float | None
    sex: str | None
    site: str | None
    description: str | None


def normalize_diagnosis(value: str) -> str:
    """Map a diagnosis name or ISIC/HAM10000 code onto the vocabulary.

    Args:
        value: e.g. ``"MEL"``, ``"Seborrheic keratosis"``, ``"nv"``; case, spaces and
            hyphens do not matter.

    Returns:
        One of :data:`DIAGNOSES`.

    Raises:
        ValueError: the value is not in the vocabulary or its aliases (never mapped to
            ``"unknown"`` silently).
    """
    key = "_".join(str(value).strip().lower().replace("-", " ").split())
    if key in TEMPLATES:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(
        f"unknown diagnosis {value!r}; expected one of {', '.join(DIAGNOSES)} "
        f"or an alias ({', '.join(sorted(_ALIASES))})"
    )


def _indefinite_article(age_text: str) -> str:
    # "an 8-year-old", "an 11-year-old", "an 18-year-old", "an 80-year-old"; "a" otherwise.
    return "an" if age_text.startswith("8") or age_text in ("11", "18") else "a"


def patient_clause(age: float | None, sex: str | None, site: str | None) -> str:
    """The metadata sentence, e.g. ``"Lesion on the back of a 55-year-old male patient."``.

    Args:
        age: age in years, or ``None``.
        sex: ``"male"``/``"female"``, or ``None``.
        site: body site (e.g. ``"back"``, ``"lower extremity"``), or ``None``.

    Returns:
        The clause, or ``""`` when all three are missing.
    """
    if age is None and not sex and not site:
        return ""
    words = ["Lesion"]
    if site:
        words.append(f"on the {site}")
    if age is not None or sex:
        patient = []
        if age is not None:
            age_text = f"{age:g}"
            patient.append(f"{age_text}-year-old")
            article = _indefinite_article(age_text)
        else:
            article = "a"
        if sex:
            patient.append(sex)
        words.append(f"of {article} {' '.join(patient)} patient")
    return " ".join(words) + "."


def _compose(diagnosis: str | None, record: TextSource) -> str:
    parts = []
    if diagnosis is not None and diagnosis != "unknown":
        parts.append(TEMPLATES[normalize_diagnosis(diagnosis)])
    clause = patient_clause(record.age, record.sex, record.site)
    if clause:
        parts.append(clause)
    return " ".join(parts) if parts else NEUTRAL_SENTENCE


def make_sentence(record: TextSource, regime: str = "oracle", predicted_diagnosis: str | None = None) -> str:
    """Build the pseudo-text sentence of one record under a text regime.

    Args:
        record: anything with ``diagnosis, age, sex, site, description`` attributes.
        regime: one of :data:`TEXT_REGIMES` (see the module docstring).
        predicted_diagnosis: the diagnosis predicted from the image, required by
            ``regime="predicted"`` (``"unknown"`` gives the metadata-only sentence).

    Returns:
        The sentence. A non-empty ``record.description`` is returned verbatim in every regime
        but ``none`` (a clinician's note exists at inference time); ``none`` always gives
        :data:`NEUTRAL_SENTENCE`.

    Raises:
        ValueError: unknown regime, ``shuffled`` (a split's regime: :func:`shuffled_sentences`),
            ``predicted`` without a prediction, or a diagnosis outside the vocabulary.
    """
    if regime not in TEXT_REGIMES:
        raise ValueError(f"unknown text regime {regime!r}; expected one of {', '.join(TEXT_REGIMES)}")
    if regime in SPLIT_REGIMES:
        raise ValueError(f"text regime {regime!r} takes another image's sentence: build a split's with "
                         "shuffled_sentences()")
    if regime == "none":
        return NEUTRAL_SENTENCE
    if record.description and record.description.strip():
        return record.description.strip()
    if regime == "metadata":
        return _compose(None, record)
    if regime == "predicted":
        if predicted_diagnosis is None:
            raise ValueError("text regime 'predicted' needs predicted_diagnosis (the image classifier's output)")
        return _compose(predicted_diagnosis, record)
    return _compose(record.diagnosis, record)


def shuffled_donors(image_ids: Sequence[str], seed: int = 0) -> dict[str, str]:
    """Which image lends its sentence to which: a seeded random derangement of the distinct ids.

    The distinct ids are sorted (the result does not depend on their order), permuted with
    ``numpy.random.default_rng(seed)``, and each takes the next one's along that cycle: with
    two or more images no image is its own donor.

    Args:
        image_ids: the split's image ids (repeats, e.g. fixed variants of one image, allowed).
        seed: seed of the permutation.

    Returns:
        ``{image id: donor image id}``.
    """
    import numpy as np

    ids = sorted(set(map(str, image_ids)))
    cycle = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    return {image: cycle[(i + 1) % len(cycle)] for i, image in enumerate(cycle)}


def shuffled_sentences(records: Sequence[TextSource], image_ids: Sequence[str], seed: int = 0) -> list[str]:
    """The ``shuffled`` regime: each record gets the ``metadata`` sentence of its donor image.

    Args:
        records: one per sample (several samples may share a record).
        image_ids: each record's image id (the derangement is over distinct images).
        seed: seed of :func:`shuffled_donors`.

    Returns:
        One sentence per record.
    """
    by_id = dict(zip(map(str, image_ids), records, strict=True))
    donors = shuffled_donors(list(by_id), seed)
    return [make_sentence(by_id[donors[str(i)]], "metadata") for i in image_ids]
