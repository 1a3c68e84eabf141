"""Trained models shipped inside the package, loadable by name.

Like Hugging Face's ``from_pretrained("name")``, but offline: each shipped model is a folder
``cmgnet/pretrained/<name>/`` holding what :meth:`SegmentationModel.save_pretrained` writes
(``config.json``, ``model.safetensors`` in fp16, ``inference.json``), optionally the
diagnosis classifier (``diagnosis/``) and a model card (``README.md``)::

    from cmgnet.model import SegmentationModel
    net = SegmentationModel.from_pretrained("isic-cmgnet-lite0")

``cmgnet models`` lists them; ``cmgnet predict isic-cmgnet-lite0 images/ --out masks/``
segments with one. ``examples/`` beside them holds a few real ISIC images with their masks.
"""

from __future__ import annotations

from pathlib import Path

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
EXAMPLES_DIR = PRETRAINED_DIR / "examples"
CARD_NAME = "README.md"


def list_pretrained() -> list[str]:
    """Names of the shipped models."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").is_file())


def is_pretrained_name(name_or_path: str | Path) -> bool:
    """True for the name of a shipped model that is not also an existing path."""
    return not Path(name_or_path).exists() and str(name_or_path) in list_pretrained()


def resolve_pretrained(name_or_path: str | Path) -> Path:
    """A shipped model's folder for its name; any other value is returned as a path.

    Args:
        name_or_path: a name from :func:`list_pretrained` or a model folder.

    Returns:
        The folder to load from (an existing path wins over a shipped name).
    """
    return PRETRAINED_DIR / str(name_or_path) if is_pretrained_name(name_or_path) else Path(name_or_path)


def model_card(name: str) -> str:
    """The model card (Markdown) of a shipped model."""
    return (resolve_pretrained(name) / CARD_NAME).read_text()


def describe() -> list[dict[str, str]]:
    """One row per shipped model: name, architecture, encoder, size on disk, card summary line."""
    import json

    rows = []
    for name in list_pretrained():
        folder = PRETRAINED_DIR / name
        saved = json.loads((folder / "config.json").read_text())
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        card = folder / CARD_NAME
        summary = next((ln.strip() for ln in card.read_text().splitlines()[1:] if ln.strip()), "") if card.is_file() else ""
        rows.append({"name": name, "arch": saved["model"], "encoder": saved["config"].get("encoder", "unet"),
                     "size_mb": f"{size / 1e6:.1f}", "summary": summary})
    return rows
