"""What ships with the package, found by name: experiment and Accelerate configs, trained models.

The repository's ``configs/`` and ``launch/accelerate/`` folders are the one source; the
wheel installs them as package data (``cmgnet/configs``, ``cmgnet/configs/accelerate``), so
``cmgnet train --config demo`` works from a checkout and from an installed wheel alike::

    config_path("demo")                    # .../configs/demo.yaml
    accelerate_config_path("multi_gpu")    # .../launch/accelerate/multi_gpu.yaml (or the installed copy)

A name is a file stem (``demo``, ``cpu-real``, ``paper``, ``isic2017``, ``isic2018``); an
existing path is returned unchanged, so every ``--config`` accepts both.

Trained models: like Hugging Face's ``from_pretrained("name")``, but offline. Each shipped
model is a folder ``cmgnet/pretrained/<name>/`` holding what ``save_pretrained`` writes
(``config.json``, ``model.safetensors`` in fp16, ``inference.json``), the diagnosis classifier
(``diagnosis/``) and a model card (``README.md``); ``config.json`` and ``diagnosis/classifier.json``
record the SHA-256 of their weights, which loading verifies (:mod:`cmgnet.integrity`)::

    SegmentationModel.from_pretrained("isic-cmgnet-lite0")
    cmgnet predict isic-cmgnet-lite0 images/ --out masks/
    cmgnet models                          # the list, with sizes

``pretrained/examples/`` holds a few real ISIC images with their masks (see its LICENSE.md).
This module imports nothing heavy, so the CLI answers at once.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_REPO = _PACKAGE.parent


def _first_dir(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def configs_dir() -> Path | None:
    """Folder of the shipped experiment YAMLs: the installed copy, else the checkout's ``configs/``."""
    return _first_dir(_PACKAGE / "configs", _REPO / "configs")


def accelerate_dir() -> Path | None:
    """Folder of the shipped Accelerate / DeepSpeed launch configs."""
    return _first_dir(_PACKAGE / "configs" / "accelerate", _REPO / "launch" / "accelerate")


def _names(folder: Path | None) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def list_configs() -> list[str]:
    """Names of the shipped experiment configs."""
    return _names(configs_dir())


def list_accelerate_configs() -> list[str]:
    """Names of the shipped Accelerate configs."""
    return _names(accelerate_dir())


def _resolve(name_or_path: str | Path, folder: Path | None, names: list[str], what: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    if folder is not None and path.parent == Path(".") and (folder / f"{path.stem}.yaml").exists() \
            and path.suffix in ("", ".yaml"):
        return folder / f"{path.stem}.yaml"
    raise FileNotFoundError(f"{name_or_path}: no such file and no shipped {what} of that name "
                            f"(shipped: {', '.join(names) or 'none'})")


def config_path(name_or_path: str | Path) -> Path:
    """An experiment config file: an existing path as given, else the shipped config of that name.

    Raises:
        FileNotFoundError: neither a file nor a shipped name (the message lists the names).
    """
    return _resolve(name_or_path, configs_dir(), list_configs(), "config")


def accelerate_config_path(name_or_path: str | Path) -> Path:
    """An Accelerate config file (``--config_file`` of ``accelerate launch``), by path or shipped name."""
    return _resolve(name_or_path, accelerate_dir(), list_accelerate_configs(), "Accelerate config")


def configs_main(argv: list[str] | None = None) -> int:
    """``cmgnet configs [NAME]``: list the shipped configs, or print one's path."""
    from .cliargs import make_parser

    parser = make_parser(
        "cmgnet configs", "List the shipped experiment and Accelerate configs, or print the path of one.",
        ["cmgnet configs", "cmgnet configs demo",
         "accelerate launch --config_file $(cmgnet configs multi_gpu) launch/train.py --config isic2017"])
    parser.add_argument("name", nargs="?", help="a config name: print its path (experiment configs first)")
    args = parser.parse_args(argv)
    if args.name:
        try:
            path = config_path(args.name)
        except FileNotFoundError:
            try:
                path = accelerate_config_path(args.name)
            except FileNotFoundError:
                parser.error(f"no shipped config {args.name!r}; experiment: {', '.join(list_configs())}; "
                             f"accelerate: {', '.join(list_accelerate_configs())}")
        print(path)
        return 0
    print(f"experiment configs ({configs_dir()}):  --config NAME")
    print("  " + "  ".join(list_configs()))
    print(f"Accelerate configs ({accelerate_dir()}):  accelerate launch --config_file $(cmgnet configs NAME)")
    print("  " + "  ".join(list_accelerate_configs()))
    return 0


# ---------------------------------------------------------------- trained models
PRETRAINED_DIR = _PACKAGE / "pretrained"
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


def models_main(argv: list[str] | None = None) -> int:
    """``cmgnet models [NAME]``: list the shipped trained models, or print one's model card."""
    from .cliargs import make_parser

    parser = make_parser(
        "cmgnet models", "List the trained models shipped with the package, or print the model card of one.",
        ["cmgnet models", "cmgnet models isic-cmgnet-lite0",
         "cmgnet predict isic-cmgnet-lite0 images/ --out masks/"])
    parser.add_argument("name", nargs="?", help="a shipped model: print its model card")
    args = parser.parse_args(argv)
    if args.name:
        if args.name not in list_pretrained():
            parser.error(f"no shipped model {args.name!r}; shipped: {', '.join(list_pretrained()) or 'none'}")
        print(model_card(args.name))
        return 0
    rows = describe()
    if not rows:
        print("no trained models are shipped with this build")
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name'].ljust(width)}  {r['arch']} on {r['encoder']}, {r['size_mb']} MB  {r['summary']}")
    print(f"examples: {EXAMPLES_DIR}")
    return 0
