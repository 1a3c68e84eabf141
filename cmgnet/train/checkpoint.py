"""Atomic, resumable checkpoints that never unpickle anything.

A checkpoint is a directory ``<run>/checkpoints/step-XXXXXXXX/``:

* ``model/``: the network as ``save_pretrained`` writes it (``config.json`` + safetensors);
* ``optimizer.safetensors`` + ``optimizer.json``, ``scheduler.json``, ``scaler.json``:
  state dicts split by :func:`save_state` into tensors (safetensors) and a typed JSON
  skeleton, so loading is a safetensors read plus ``json.loads``;
* ``rng-<rank>.safetensors/.json``: Python, NumPy and torch generator states of every rank;
* ``trainer_state.json``: epoch, micro-batches consumed in it, optimiser steps, best score,
  MLflow run id;
* ``deepspeed/``: under DeepSpeed, model and optimiser shards from ``accelerator.save_state``
  (DeepSpeed's own format uses ``torch.save``; resume such runs only from checkpoints you
  wrote).

Atomicity: everything is written into ``.tmp-step-XXXXXXXX/``, flushed, then renamed; the
``latest`` pointer file is replaced atomically after the rename. A crash at any point leaves
the previous checkpoint and pointer intact; a stale temporary directory is removed by the
next save. Multi-process runs need the run directory on a file system every rank sees.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from cmgnet.errors import CheckpointError, one_line
from cmgnet.integrity import load_safetensors
from cmgnet.outputs import atomic_write_text, fsync_dir, replace_dir, writing

LATEST = "latest"
BEST_DIR = "best"
"""A run's best weights (``save_pretrained`` layout), beside ``checkpoints/``."""
COMPLETE = "COMPLETE"


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """Replace tensors/arrays by references and tag non-JSON containers (tuples, int keys)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": path, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors, path)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        # Optimizer state is keyed by int parameter index: keep key types exactly.
        return {"__items__": [[_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path!r} in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_state(state: Any, directory: Path, name: str) -> None:
    """Write a nested state (dicts, lists, tuples, numbers, tensors, arrays) safely.

    Args:
        state: e.g. ``optimizer.state_dict()``.
        directory: target folder.
        name: file stem; writes ``<name>.json`` and, if there are tensors, ``<name>.safetensors``.
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors, "s")
    if tensors:
        with writing(directory / f"{name}.safetensors"):
            save_file(tensors, str(directory / f"{name}.safetensors"))
    with writing(directory / f"{name}.json"):
        (directory / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(directory: Path, name: str) -> Any:
    """Read what :func:`save_state` wrote (safetensors + JSON only: no unpickling)."""
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_safetensors(tensor_file, f"{name} state") if tensor_file.exists() else {}
    path = directory / f"{name}.json"
    try:
        return _decode(json.loads(path.read_text()), tensors)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"unreadable {name} state ({err.__class__.__name__}: {err})", path) from err


def verify_checkpoint(directory: Path) -> str | None:
    """What is wrong with a checkpoint directory, or ``None`` when it looks loadable.

    Cheap: JSON files are parsed, safetensors headers read (a truncated file fails there),
    weights hashed against the SHA-256 their record holds (damaged bytes fail there);
    DeepSpeed shards are not inspected.

    Returns:
        One line naming the bad file, or ``None``.
    """
    from safetensors import SafetensorError, safe_open

    from cmgnet.integrity import file_sha256, recorded_sha256
    from cmgnet.model.base import CONFIG_NAME, WEIGHTS_NAME

    from .diagnosis import CONFIG_NAME as CLASSIFIER_CONFIG
    from .diagnosis import WEIGHTS_NAME as CLASSIFIER_WEIGHTS

    records = {WEIGHTS_NAME: CONFIG_NAME, CLASSIFIER_WEIGHTS: CLASSIFIER_CONFIG}  # weights -> the record of its hash

    state = directory / "trainer_state.json"
    try:
        data = json.loads(state.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("global_step"), int):
            return f"{state}: not a trainer state (expected a JSON object with global_step)"
    except (OSError, ValueError) as err:
        return f"{state}: unreadable ({one_line(err, with_type=True)})"
    for path in sorted(directory.rglob("*.safetensors")):
        if "deepspeed" in path.relative_to(directory).parts:
            continue
        try:
            with safe_open(str(path), "pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as err:
            return f"{path}: corrupt or truncated ({one_line(err)})"
        record = path.with_name(records[path.name]) if path.name in records else None
        try:
            expected = recorded_sha256(record) if record is not None else None
        except CheckpointError as err:
            return str(err)
        if expected is not None and file_sha256(path) != expected:
            return f"{path}: weights do not match the SHA-256 recorded in {record}"
    for path in sorted(directory.glob("*.json")):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return f"{path}: unreadable JSON ({err.__class__.__name__})"
    return None


def rng_state() -> dict[str, Any]:
    """This process' generator states (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_as_tuples(state["python"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(obj: Any) -> Any:
    # random.setstate wants nested tuples; JSON round-trips keep them (tagged) but be lenient.
    return tuple(_as_tuples(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


class CheckpointManager:
    """Atomic checkpoint directories under ``root`` with a ``latest`` pointer.

    Args:
        root: the run's ``checkpoints/`` folder.
        keep: number of checkpoints kept (older ones are deleted after a successful save).
        is_main: this process renames, prunes and updates the pointer.
        barrier: callable that synchronises all processes (``accelerator.wait_for_everyone``).
    """

    def __init__(self, root: str | Path, keep: int = 2, is_main: bool = True,
                 barrier: Callable[[], None] = lambda: None) -> None:
        self.root = Path(root)
        self.keep = max(1, keep)
        self.is_main = is_main
        self.barrier = barrier

    def save(self, name: str, write: Callable[[Path], None]) -> Path:
        """Write a checkpoint atomically.

        Args:
            name: directory name, e.g. ``step-00000100``.
            write: called on every process with the temporary directory; each process writes
                its own files (the main process the shared ones).

        Returns:
            The final checkpoint directory.
        """
        tmp = self.root / f".tmp-{name}"
        final = self.root / name
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # left by a crash mid-save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self.barrier()
        with writing(tmp, "the checkpoint"):  # a full disk names the file; the previous checkpoint stays
            write(tmp)
        self.barrier()
        if self.is_main:
            with writing(tmp, "the checkpoint"):
                (tmp / COMPLETE).write_text(name + "\n")
                _fsync_tree(tmp)
            replace_dir(tmp, final)
            atomic_write_text(self.root / LATEST, name + "\n")
            self._prune(keep=final)
        self.barrier()
        return final

    def _prune(self, keep: Path) -> None:
        done = sorted(p for p in self.root.glob("step-*") if (p / COMPLETE).exists())
        for old in [p for p in done if p != keep][: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Every complete checkpoint, oldest first (the ``latest`` pointer's one last)."""
        done = sorted(p for p in self.root.glob("step-*") if (p / COMPLETE).exists())
        pointer = self.root / LATEST
        if pointer.exists():
            named = self.root / pointer.read_text().strip()
            if named in done:
                done = [p for p in done if p != named] + [named]
        return done

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or ``None``."""
        pointer = self.root / LATEST
        if pointer.exists():
            path = self.root / pointer.read_text().strip()
            if (path / COMPLETE).exists():
                return path
        done = sorted(p for p in self.root.glob("step-*") if (p / COMPLETE).exists())
        return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint, ``checkpoints/`` or run directory path.

    Raises:
        FileNotFoundError: no complete checkpoint there.
    """
    path = Path(path)
    if (path / COMPLETE).exists():
        return path
    for root in (path, path / "checkpoints"):
        found = CheckpointManager(root).latest() if root.is_dir() else None
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete checkpoint in {path}")
