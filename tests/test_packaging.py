"""Packaging: every source package is installed, under the cmgnet namespace only."""

from __future__ import annotations

import tomllib

from conftest import REPO_ROOT

MAPPED = {"kernels": "cmgnet.kernels", "deploy": "cmgnet.deploy"}


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = set()
    for top in ("cmgnet", *MAPPED):
        for init in (REPO_ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO_ROOT).parts
            on_disk.add(".".join((MAPPED.get(parts[0], parts[0]), *parts[1:])))
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"


def test_no_bare_top_level_kernels_or_deploy():
    """transformers probes a top-level ``kernels`` distribution; ours must not be one."""
    import importlib.metadata

    import cmgnet.deploy
    import cmgnet.kernels

    assert cmgnet.kernels.__name__ == "cmgnet.kernels" and cmgnet.deploy.__name__ == "cmgnet.deploy"
    provided = {name for name, dists in importlib.metadata.packages_distributions().items() if "cmgnet" in dists}
    assert provided == {"cmgnet"}
    from transformers.utils.import_utils import is_kernels_available

    assert not is_kernels_available()
