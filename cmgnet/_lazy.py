"""Lazy package exports (PEP 562), so ``cmgnet <cmd> --help`` never imports torch.

A package ``__init__`` lists what it exports and from which sub-module; a name is imported
on first access. ``from cmgnet.train import Trainer`` and ``cmgnet.train.Trainer`` work as
with eager imports, but ``import cmgnet.train.cli`` (or any light sub-module) no longer
pulls in torch, Accelerate and MLflow through the package ``__init__``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package whose exports load on first use.

    Args:
        package: the package's ``__name__``.
        exports: exported name -> relative sub-module defining it (e.g. ``".engine"``).

    Returns:
        The module-level ``__getattr__`` and ``__dir__`` functions to assign in the package.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        globals_of_package = vars(importlib.import_module(package))
        globals_of_package[name] = value  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(exports))

    return __getattr__, __dir__
