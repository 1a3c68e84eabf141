"""ONNX Runtime for checkpoints: each weights file is exported once, into a cache keyed by its SHA-256.

On a CPU, :meth:`cmgnet.deploy.Segmenter.load` of a checkpoint (a shipped model name or a
``save_pretrained`` folder) runs the network on ONNX Runtime when it is installed: eager
PyTorch is 2-4x slower there, above all for the batched flip-TTA views. The first load exports
the checkpoint with :func:`cmgnet.deploy.export.export_bundle`, including the export's parity
check of ONNX Runtime against PyTorch, into::

    <cache>/onnx/<SHA-256 of model.safetensors>/   a bundle: model.onnx, inference.json, text_cache/
                                                   + cache.json (what the export depended on)

``<cache>`` is ``$CMGNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/cmgnet`` or ``~/.cache/cmgnet``
(:func:`cmgnet.data.validate.cache_dir`). Later loads reuse the folder while ``cache.json``
matches (same weights, ``config.json``, opset, PyTorch and cmgnet versions); changed weights
hash to another folder. The export is written to a temporary folder and renamed into place,
so a crash or a concurrent ``predict`` never leaves a half-written bundle in use. A network
``torch.export`` cannot export is noted in ``<sha256>.failed.json`` with the reason, so later
loads do not spend the export time again (until the weights or versions change).

The serving settings always come from the checkpoint's own ``inference.json`` (which may
change after the export, e.g. TTA chosen later): the cached bundle provides the network only.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from cmgnet import __version__
from cmgnet.data.validate import cache_dir
from cmgnet.errors import CmgnetError, one_line
from cmgnet.integrity import check_sha256, file_sha256, recorded_sha256
from cmgnet.model.base import CONFIG_NAME, WEIGHTS_NAME

from .errors import DeployError
from .spec import DEFAULT_OPSET, ONNX_NAME

CACHE_SUBDIR = "onnx"
MANIFEST_NAME = "cache.json"
VERIFY_BATCHES = (1, 2)
"""Batch sizes of the parity check run when a checkpoint is exported into the cache."""


def onnx_cache_root() -> Path:
    """The folder holding one exported bundle per weights file."""
    return cache_dir() / CACHE_SUBDIR


def _manifest(checkpoint: Path) -> dict[str, Any]:
    """What an export of ``checkpoint`` depends on; the weights' SHA-256 is verified against ``config.json``.

    Raises:
        CheckpointError: the weights differ from the SHA-256 recorded in ``config.json``.
    """
    import torch

    weights, config = checkpoint / WEIGHTS_NAME, checkpoint / CONFIG_NAME
    digest = file_sha256(weights)
    recorded = recorded_sha256(config)
    if recorded is not None and recorded != digest:
        check_sha256(weights, recorded, config)  # raises, naming both files
    return {"weights_sha256": digest, "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
            "opset": DEFAULT_OPSET, "torch": torch.__version__, "cmgnet": __version__}


def _valid(folder: Path, manifest: dict[str, Any]) -> bool:
    try:
        saved = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and all(saved.get(k) == v for k, v in manifest.items()) \
        and (folder / ONNX_NAME).is_file()


def cached_bundle(checkpoint: str | Path, log: Any = None) -> Path:
    """The cached ONNX bundle of a checkpoint, exported (and parity-checked) on first use.

    Args:
        checkpoint: a ``save_pretrained`` folder.
        log: ``callable(message)`` for the one-time export note (default: stderr).

    Returns:
        The bundle folder.

    Raises:
        CheckpointError: unreadable or damaged weights or config.
        DeployError: the export or its parity check failed, now or before (nothing is cached then).
        WriteFailedError: the cache folder cannot be written.
    """
    from cmgnet.model import SegmentationModel
    from cmgnet.outputs import writing

    from .export import export_bundle

    checkpoint = Path(checkpoint)
    manifest = _manifest(checkpoint)
    root = onnx_cache_root()
    folder = root / manifest["weights_sha256"]
    if _valid(folder, manifest):
        return folder
    failed = root / f"{folder.name}.failed.json"
    if (reason := _failed_before(failed, manifest)) is not None:
        raise DeployError(f"{checkpoint}: its ONNX export failed before ({reason}; noted in {failed})")
    (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
        f"note: exporting {checkpoint} to ONNX Runtime once, into {folder} (reused while the weights are unchanged)")
    tmp = root / f".tmp-{folder.name[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with writing(root, "the ONNX cache"):
            tmp.mkdir(parents=True)
        model = SegmentationModel.from_pretrained(checkpoint).eval()
        try:
            result = export_bundle(model, tmp, verify_batches=VERIFY_BATCHES)
        except CmgnetError:
            raise
        except Exception as err:  # noqa: BLE001 - torch.export raises many types: each is "this network does not export"
            reason = one_line(err)[:300]
            with writing(failed):
                failed.write_text(json.dumps(manifest | {"reason": reason}, indent=2) + "\n")
            raise DeployError(f"{checkpoint}: ONNX export failed ({reason})") from err
        parity = [{"batch": p.batch, "max_abs_diff": p.max_abs_diff, "mask_flips": p.mask_flips}
                  for p in result.parity]
        with writing(tmp / MANIFEST_NAME):
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest | {"checkpoint": str(checkpoint),
                                                                    "parity": parity}, indent=2) + "\n")
        _move_into_place(tmp, folder, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _failed_before(marker: Path, manifest: dict[str, Any]) -> str | None:
    """The reason an export of these weights and versions failed before, or ``None``."""
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    same = isinstance(saved, dict) and all(saved.get(k) == v for k, v in manifest.items())
    return str(saved.get("reason", "no reason recorded")) if same else None


def _move_into_place(tmp: Path, folder: Path, manifest: dict[str, Any]) -> None:
    """Rename the finished export to ``folder``; a valid one another process put there first wins."""
    if folder.exists():
        if _valid(folder, manifest):
            return
        stale = folder.with_name(f".stale-{folder.name[:16]}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.replace(folder, stale)  # an export of other code versions: set aside, then removed
        except OSError:
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process renamed its export in between: theirs is as good as ours
        if not _valid(folder, manifest):
            raise
