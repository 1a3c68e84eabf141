"""The wheel: ``pip wheel .`` gives a working ``cmgnet`` outside the repository, shipped configs included.

Built from a copy of the working tree in a temporary folder and installed into a fresh
virtual environment that reuses this environment's packages (torch, transformers, ...)
through a ``.pth`` line, so nothing is downloaded. Every command runs from an empty folder,
away from the checkout's ``configs/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # 6-40 s depending on load: a build, an install, two commands that import torch

# What the build reads: the folders mapped into the package, the metadata files.
_SETUPTOOLS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
SOURCES = (*sorted(set(_SETUPTOOLS["package-dir"].values())), "pyproject.toml", "README.md", "LICENSE")
SHIPPED = ("demo", "cpu-real", "paper", "isic2017", "isic2018")


def _run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(bin folder of the fresh venv with the wheel installed, an empty working folder)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in SOURCES:
        source, target = REPO_ROOT / name, src / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    # No build isolation: the build backend comes from this environment, not from the network.
    _run(sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist",
         cwd=src)
    [wheel] = (root / "dist").glob("cmgnet-*.whl")

    venv = root / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    purelib = _run(bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root)
    # Reuse the installed dependencies (CPU torch etc.); the venv's own site-packages comes first.
    Path(purelib.strip(), "_reuse_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "--no-deps", "--no-index", "-q",
         wheel, cwd=root)
    work = root / "elsewhere"
    work.mkdir()
    return bin_dir, work


def test_wheel_ships_configs_license_and_spdx_metadata(installed):
    wheel = next((installed[1].parent / "dist").glob("cmgnet-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert {f"cmgnet/configs/{name}.yaml" for name in SHIPPED} <= names
    accelerate = {p.name for p in (REPO_ROOT / "launch" / "accelerate").glob("*.yaml")}
    assert {f"cmgnet/configs/accelerate/{name}" for name in accelerate} <= names
    assert "cmgnet/configs/splits/isic2018_256.csv" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and "Apache License" in (REPO_ROOT / "LICENSE").read_text()[:200]


def test_installed_cli_runs_outside_the_repository(installed):
    bin_dir, work = installed
    env = {**os.environ, "PYTHONPATH": ""}  # nothing from the checkout
    where = _run(bin_dir / "python", "-c", "import cmgnet; print(cmgnet.__file__)", cwd=work, env=env)
    assert not Path(where.strip()).is_relative_to(REPO_ROOT)
    assert _run(bin_dir / "cmgnet", "demo", "--help", cwd=work, env=env).startswith("usage: cmgnet demo")
    listed = _run(bin_dir / "cmgnet", "configs", cwd=work, env=env)
    assert all(name in listed for name in SHIPPED)
    accelerate = Path(_run(bin_dir / "cmgnet", "configs", "multi_gpu", cwd=work, env=env).strip())
    assert accelerate.is_file() and not accelerate.is_relative_to(REPO_ROOT)


def test_installed_cli_loads_a_shipped_config_by_name(installed):
    bin_dir, work = installed
    env = {**os.environ, "PYTHONPATH": ""}
    code = ("from cmgnet.train.config import load_config; cfg = load_config('cpu-real'); "
            "print(cfg.name, cfg.data.split_csv)")
    name, split_csv = _run(bin_dir / "python", "-c", code, cwd=work, env=env).split()
    # The split CSV shipped beside the YAML is found in the installed package, not in the checkout.
    assert name == "cpu-real" and Path(split_csv).is_file() and not Path(split_csv).is_relative_to(REPO_ROOT)
    printed = _run(bin_dir / "cmgnet", "train", "--config", "demo", "--print-config", cwd=work, env=env)
    assert "name: demo" in printed
