"""A client of the served model (``cmgnet serve``, or an exported repository on NVIDIA's server).

    from cmgnet.deploy.client import SegmentationClient

    client = SegmentationClient("127.0.0.1:8000")                 # or ("127.0.0.1:8001", protocol="grpc")
    mask = client.segment("lesion.jpg", {"age": 55, "sex": "male", "site": "back"})   # H x W uint8, 0/255

Requests are Triton's (KServe v2) through NVIDIA's ``tritonclient``, over HTTP or gRPC: the
encoded file as ``IMAGE`` (BYTES, shape ``[1, 1]``), the metadata as a JSON object in
``METADATA``; the answer is ``MASK`` (UINT8, ``[1, H, W]``). Any Triton client in any
language sends the same. ``cmgnet infer-remote`` (:func:`main`) segments image files through
a server and writes the masks as ``cmgnet predict`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cmgnet.errors import CmgnetError, cli_entry

from .triton_repo import MASK_OUTPUT, METADATA_INPUT, SERVED_NAME
from .triton_repo import REQUEST_IMAGE as IMAGE_INPUT


class RemoteError(CmgnetError):
    """The server refused a request or cannot be reached; the message is the server's."""


def _tritonclient(protocol: str) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError as err:
        raise RemoteError(f"tritonclient is not installed (pip install 'cmgnet[client]'): {err}") from None
    return module


class SegmentationClient:
    """Segments images through a Triton server serving ``cmgnet``.

    Args:
        url: ``host:port`` of the server's HTTP (default 8000) or gRPC (8001) endpoint.
        protocol: ``http`` or ``grpc``.
        model: the served model's name.
        timeout: seconds to wait for one answer.
    """

    def __init__(self, url: str = "127.0.0.1:8000", protocol: str = "http", model: str = SERVED_NAME,
                 timeout: float = 120.0) -> None:
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be http or grpc, got {protocol!r}")
        self.url, self.protocol, self.model, self.timeout = url, protocol, model, timeout
        self.module = _tritonclient(protocol)
        options = {} if protocol == "grpc" else {"connection_timeout": timeout, "network_timeout": timeout}
        self.client = self.module.InferenceServerClient(url, **options)

    def ready(self) -> bool:
        """Whether the server and the model are ready (False when unreachable)."""
        try:
            return bool(self.client.is_server_ready() and self.client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - tritonclient raises assorted connection errors
            return False

    def segment(self, image: bytes | str | Path, metadata: Mapping[str, Any] | None = None) -> np.ndarray:
        """Segment one image.

        Args:
            image: the encoded file's bytes, or its path.
            metadata: any of ``age``, ``sex``, ``site``, ``diagnosis``, ``description``
                (``None``: the neutral sentence).

        Returns:
            The ``H x W`` uint8 mask (0 background, 255 lesion) at the image's size.

        Raises:
            RemoteError: the server's error message (bad image, bad metadata, ...) or no connection.
        """
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)
        inputs = [self._input(IMAGE_INPUT, data)]
        if metadata is not None:
            inputs.append(self._input(METADATA_INPUT, json.dumps(dict(metadata)).encode()))
        try:
            options = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
            result = self.client.infer(self.model, inputs, outputs=[self.module.InferRequestedOutput(MASK_OUTPUT)],
                                       **options)
        except Exception as err:  # noqa: BLE001 - InferenceServerException and connection errors alike
            message = err.message() if callable(getattr(err, "message", None)) else str(err)
            raise RemoteError(f"{self.url}: {message}") from None
        return result.as_numpy(MASK_OUTPUT)[0]

    def _input(self, name: str, data: bytes) -> Any:
        tensor = self.module.InferInput(name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[data]], dtype=object))
        return tensor

    def close(self) -> None:
        """Close the connection."""
        self.client.close()


def _metadata(table: dict, stem: str) -> dict[str, Any] | None:
    from cmgnet.data.metadata import TEXT_FIELDS

    if stem not in table:
        return None
    entry = table[stem][0]
    return {name: getattr(entry, name) for name in TEXT_FIELDS if getattr(entry, name) is not None}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """``cmgnet infer-remote``: image files -> ``OUT/masks/<id>.png`` through a server; 1 if any image failed."""
    from PIL import Image

    from cmgnet.data.metadata import read_metadata
    from cmgnet.outputs import OutputLock, refuse_existing, writing

    from .cli import infer_remote_parser
    from .predict import collect_images

    args: argparse.Namespace = infer_remote_parser().parse_args(argv)
    files = collect_images(args.inputs)
    table = read_metadata(args.metadata) if args.metadata else {}
    masks = Path(args.out) / "masks"
    local = threading.local()

    def one(path: Path) -> str | None:
        if not hasattr(local, "client"):
            local.client = SegmentationClient(args.url, args.protocol, args.model)
        try:
            mask = local.client.segment(path, _metadata(table, path.stem))
        except (RemoteError, OSError) as err:
            return f"{path}: {err}"
        with writing(masks / f"{path.stem}.png", "mask"):
            Image.fromarray(mask).save(masks / f"{path.stem}.png")
        return None

    with OutputLock(Path(args.out)):
        refuse_existing(args.out, sorted(masks.glob("*.png")) if masks.is_dir() else [], args.overwrite, "masks")
        masks.mkdir(parents=True, exist_ok=True)
        if not SegmentationClient(args.url, args.protocol, args.model).ready():
            raise RemoteError(f"{args.url}: no ready model {args.model!r} there ({args.protocol}); start one with "
                              "`cmgnet serve MODEL`")
        with ThreadPoolExecutor(args.concurrency) as pool:
            failures = [f for f in pool.map(one, files) if f]
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    print(f"wrote {len(files) - len(failures)} masks to {masks}" + (f"; {len(failures)} failed" if failures else ""))
    return 1 if failures else 0
