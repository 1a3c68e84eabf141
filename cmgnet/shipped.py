"""The experiment and Accelerate configs shipped with the package, found by name.

The repository's ``configs/`` and ``launch/accelerate/`` folders are the one source; the
wheel installs them as package data (``cmgnet/configs``, ``cmgnet/configs/accelerate``), so
``cmgnet train --config demo`` works from a checkout and from an installed wheel alike::

    config_path("demo")                    # .../configs/demo.yaml
    accelerate_config_path("multi_gpu")    # .../launch/accelerate/multi_gpu.yaml (or the installed copy)

A name is a file stem (``demo``, ``cpu-real``, ``paper``, ``isic2017``, ``isic2018``); an
existing path is returned unchanged, so every ``--config`` accepts both.
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
