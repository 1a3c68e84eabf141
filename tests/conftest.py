"""Shared fixtures: tiny model configs that run in milliseconds on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton reads this once, at import: set it before any test module imports it, so the
    # kernel tests run in the interpreter whatever the collection order.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

TINY = dict(
    base_width=8, depth=4, masa_heads=2, text_model="tiny-random-bert", text_max_length=24,
    fusion_dim=16, fusion_heads=2, fusion_scales=(16, 8, 4), fusion_layers=(2, 1, 1),
)


def tiny_config(**overrides):
    from cmgnet.model import CMGNetConfig

    return CMGNetConfig(**(TINY | overrides))


@pytest.fixture
def make_tiny_config():
    """Factory for tiny CMG-Net configs: ``make_tiny_config(masa=False)``."""
    return tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """The project's real ISIC data (``../shared/data``); skips where a clone lacks it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real ISIC data not present at {SHARED_DATA} (only in the project workspace)")
    return SHARED_DATA


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A test's own ``CMGNET_CACHE_DIR`` and no ``CMGNET_DEBUG``: error tests see one-line errors, fresh caches."""
    monkeypatch.setenv("CMGNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CMGNET_DEBUG", raising=False)


def one_error_line(stderr: str, *names: object) -> str:
    """``stderr`` holds one ``error:`` line naming every given file or word, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]
