"""Packaging: every source package is installed, under the cmgnet namespace only, and no folder
that lands on ``sys.path`` shadows an installed module."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib

import pytest
from conftest import REPO_ROOT

MAPPED = {"deploy": "cmgnet.deploy"}
# Folders Python puts first on sys.path: the root for `python -m pytest` / `python -c`, the
# script's folder for `python benchmarks/latency.py` and `python launch/train.py`.
PATH_FOLDERS = ("", "benchmarks", "launch")


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = set()
    for top in ("cmgnet", *MAPPED):
        for init in (REPO_ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO_ROOT).parts
            on_disk.add(".".join((MAPPED.get(parts[0], parts[0]), *parts[1:])))
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"


def test_installed_under_cmgnet_only():
    import cmgnet.deploy
    import cmgnet.kernels

    assert cmgnet.kernels.__name__ == "cmgnet.kernels" and cmgnet.deploy.__name__ == "cmgnet.deploy"
    provided = {name for name, dists in importlib.metadata.packages_distributions().items() if "cmgnet" in dists}
    assert provided == {"cmgnet"}


def _importable_names(folder):
    names = {p.stem for p in folder.glob("*.py")}
    return names | {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}


def test_no_script_folder_shadows_an_installed_module():
    """transformers imports Hugging Face's ``kernels``: a ``kernels`` module in the root or beside a
    script once made every BERT import fail there. No such name may come back."""
    installed = set(importlib.metadata.packages_distributions())
    clashes = {f"{folder or '.'}/{name}": sorted(importlib.metadata.packages_distributions()[name])
               for folder in PATH_FOLDERS for name in _importable_names(REPO_ROOT / folder)
               if name in installed and name != "cmgnet"}
    assert not clashes, f"these shadow installed distributions: {clashes}"


@pytest.mark.parametrize("folder", PATH_FOLDERS)
def test_transformers_bert_imports_with_the_folder_first_on_sys_path(folder):
    code = (f"import sys; sys.path.insert(0, {str(REPO_ROOT / folder)!r}); "
            "import transformers.models.bert.modeling_bert")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT / folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
