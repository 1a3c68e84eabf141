"""Argument parsers of ``cmgnet export`` and ``cmgnet predict``, importable without torch.

:mod:`cmgnet.deploy.export` and :mod:`cmgnet.deploy.predict` import torch, ONNX and the model
at module level; their parsers live here so that ``--help`` and usage errors answer before
any of that loads. :func:`export_main` and :func:`predict_main` parse, then hand the same
arguments to the real command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from cmgnet.cliargs import add_out_argument, make_parser
from cmgnet.errors import DEBUG_FLAG
from cmgnet.inference import POSTPROCESS_MODES

from .spec import BACKENDS, DEFAULT_OPSET, SEGMENTER_TEXT_REGIMES


def export_parser() -> argparse.ArgumentParser:
    """The ``cmgnet export`` parser."""
    parser = make_parser('cmgnet export', 'Export a checkpoint to a deployment bundle: ONNX (checked against PyTorch with ONNX Runtime), text features, optionally an int8 ONNX and a TensorRT engine / torch-tensorrt program.', [
        'cmgnet export runs/demo/best --out exported/',
        'cmgnet export runs/demo/best --out exported/ --int8-calibration images/ --tensorrt skip',
        'cmgnet export runs/isic2017/best --out exported/ --tensorrt require --precision fp16 --max-batch 32',
        'cmgnet export runs/demo/best --out exported/ --mlflow-run-id RUN --mlflow-tracking-uri sqlite:///runs/mlflow.db',
        'cmgnet export isic-cmgnet-lite0 --triton-repo triton-repo/ --ort-tensorrt-fp16',
    ])
    parser.add_argument("checkpoint", help="save_pretrained directory (config.json + model.safetensors)")
    add_out_argument(parser, "bundle directory to write (needed unless --triton-repo)")
    parser.add_argument("--overwrite", action="store_true", help="replace a bundle already in --out")
    pre = parser.add_argument_group("pre/post-processing (default: the checkpoint's inference.json; "
                                    "a different value needs --force)")
    pre.add_argument("--image-size", type=int, default=None, help="network input side")
    pre.add_argument("--mean", type=float, nargs=3, default=None, help="normalisation mean (0..1 scale)")
    pre.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std (0..1 scale)")
    pre.add_argument("--threshold", type=float, default=None, help="mask probability threshold")
    pre.add_argument("--force", action="store_true", help="accept values that contradict the checkpoint's record")
    onnx_args = parser.add_argument_group("ONNX")
    onnx_args.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (>= 18)")
    onnx_args.add_argument("--static-size", action="store_true", help="fix H/W to --image-size (only batch dynamic)")
    onnx_args.add_argument("--verify-batches", type=int, nargs="*", default=[1, 2, 4],
                           help="batch sizes of the ONNX Runtime vs PyTorch check (none: skip)")
    onnx_args.add_argument("--sentences", help="text file, one sentence per line, to precompute besides the templates")
    onnx_args.add_argument("--int8-calibration", nargs="+", metavar="IMAGES",
                           help="image files/folders: also write model.int8.onnx calibrated on them (CPU serving)")
    onnx_args.add_argument("--calibration-count", type=int, default=32, help="images used for int8 calibration")
    trt = parser.add_argument_group("TensorRT (GPU machine with TensorRT >= 10)")
    trt.add_argument("--tensorrt", choices=["auto", "require", "skip"], default="auto",
                     help="build model.engine: when available / or fail / never")
    trt.add_argument("--precision", choices=["fp16", "bf16", "fp32", "typed"], default="fp16",
                     help="engine precision (typed: as the ONNX is typed, for TensorRT 11+)")
    trt.add_argument("--max-batch", type=int, default=32, help="optimisation profile: batch 1..max")
    trt.add_argument("--opt-batch", type=int, default=None, help="batch to tune for (default: min(8, max-batch))")
    trt.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace limit")
    trt.add_argument("--timing-cache", help="timing cache file (default ~/.cache/cmgnet/tensorrt-<ver>-sm<cc>...)")
    trt.add_argument("--torch-tensorrt", action="store_true", help="also compile model_trt.ep with torch-tensorrt")
    triton = parser.add_argument_group("Triton model repository (for NVIDIA's tritonserver container)")
    triton.add_argument("--triton-repo", metavar="DIR",
                        help="also write a model repository: the network (ONNX Runtime; TensorRT plan when built) "
                             "behind the Python-backend model 'cmgnet' that `cmgnet serve` runs")
    triton.add_argument("--triton-instances", type=int, default=1,
                        help="CPU instances of the pre/post-processing model")
    triton.add_argument("--ort-tensorrt-fp16", action="store_true",
                        help="let the ONNX model run on ONNX Runtime's TensorRT accelerator at fp16")
    ml = parser.add_argument_group("MLflow")
    ml.add_argument("--mlflow-run-id",
                    help="log the bundle as artifacts of this run (skipped with a warning if MLflow is absent)")
    ml.add_argument("--mlflow-tracking-uri", help="the run's tracking store, e.g. sqlite:///runs/mlflow.db")
    return parser


def predict_parser() -> argparse.ArgumentParser:
    """The ``cmgnet predict`` parser."""
    parser = make_parser('cmgnet predict', 'Segment images: mask PNGs at the original size, overlays and a statistics CSV. The exit code is 1 if any image failed (the others are still written).', [
        'cmgnet predict exported/ images/ --out predictions/',
        "cmgnet predict runs/demo/best lesion.jpg --text 'Lesion on the back of a 55-year-old male patient.' --out p/",
        'cmgnet predict exported/ images/ --metadata images/metadata.csv --backend onnxruntime --out predictions/',
        'cmgnet predict isic-cmgnet-lite0 images/ --backend torch --out predictions/',
    ])
    parser.add_argument("model", help="checkpoint dir, exported bundle dir, or .onnx/.engine/.ep file")
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, or .txt lists of paths")
    add_out_argument(parser, "output folder", required=True)
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--text", help="one sentence for every image")
    text.add_argument("--metadata", nargs="+",
                      help="metadata CSV(s) with image_id + diagnosis/age/sex/site/description")
    parser.add_argument("--text-regime", choices=SEGMENTER_TEXT_REGIMES, default=None,
                        help="what metadata may contribute to the sentence (oracle = also the diagnosis); "
                             "default: the model's recorded regime")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="flip test-time augmentation on or off (default: as recorded for the model)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto: for a checkpoint or shipped model, ONNX Runtime on a CPU where installed "
                             "(exported once per weights file into ~/.cache/cmgnet/onnx, or $CMGNET_CACHE_DIR), "
                             "else PyTorch; for a bundle, TensorRT when usable, else ONNX Runtime; "
                             "a model file's own backend")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=8, help="images per network call")
    contract = parser.add_argument_group("inference contract (default: recorded with the model; "
                                         "a different value needs --force)")
    contract.add_argument("--threshold", type=float, default=None, help="mask probability threshold")
    contract.add_argument("--image-size", type=int, default=None, help="network input side")
    contract.add_argument("--mean", type=float, nargs=3, default=None, help="normalisation mean (0..1 scale)")
    contract.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std (0..1 scale)")
    contract.add_argument("--postprocess", choices=POSTPROCESS_MODES, default=None,
                          help="mask post-processing: largest connected component and/or filled holes")
    contract.add_argument("--force", action="store_true", help="accept values that contradict the model's record")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: one per physical core)")
    parser.add_argument("--no-overlays", action="store_true", help="write masks and CSV only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _checked(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> list[str] | None:
    """Parse once here (``--help`` and usage errors exit before heavy imports); pass ``argv`` on."""
    if argv is not None:
        argv = list(argv)
    parser.parse_args([a for a in (sys.argv[1:] if argv is None else argv) if a != DEBUG_FLAG])
    return argv


def serve_parser() -> argparse.ArgumentParser:
    """The ``cmgnet serve`` parser."""
    from .triton_repo import DEFAULT_MAX_BATCH, DEFAULT_QUEUE_DELAY_US, MAX_ASPECT, MIN_SIDE

    parser = make_parser('cmgnet serve', 'Serve a model with NVIDIA Triton Inference Server (HTTP, gRPC, Prometheus metrics, dynamic batching) until Ctrl-C. Clients send encoded image files (IMAGE) and optional JSON metadata (METADATA) to model "cmgnet" and get masks (MASK) at the images\' size; see `cmgnet infer-remote`. Needs a serving environment with numpy < 2 (`make setup` makes .venv-serve; or set CMGNET_SERVE_ENV).', [
        'cmgnet serve isic-cmgnet-lite0',
        'cmgnet serve runs/demo/best --port 9000 --grpc-port 9001 --metrics-port 9002',
        'cmgnet serve exported/ --max-batch 16 --queue-delay-us 5000 --instances 2',
        'cmgnet serve isic-cmgnet-lite0 --max-batch 1        # no dynamic batching',
        'cmgnet serve isic-cmgnet-lite0 --tta --force        # 4-pass flip TTA instead of the recorded one pass',
    ])
    parser.add_argument("model", help="shipped model name, checkpoint dir, exported bundle dir or .onnx file")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    parser.add_argument("--max-batch", type=_positive, default=DEFAULT_MAX_BATCH,
                        help="most images per model execution (1: no dynamic batching)")
    parser.add_argument("--queue-delay-us", type=_non_negative, default=DEFAULT_QUEUE_DELAY_US,
                        help="how long the dynamic batcher waits for more requests, in microseconds")
    parser.add_argument("--instances", type=_positive, default=1, help="model instances (processes sharing the cores)")
    parser.add_argument("--backend", choices=[b for b in BACKENDS if b != "torch-tensorrt"], default="auto",
                        help="the predictor's backend (auto: ONNX Runtime on a CPU where installed)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="flip test-time augmentation on or off (default: as recorded for the model; a "
                             "different value needs --force). Off: a quarter of the compute per image, and on a "
                             "CPU dynamic batching then pays")
    parser.add_argument("--force", action="store_true", help="accept a --tta that contradicts the model's record")
    parser.add_argument("--max-pixels", type=_positive, default=None,
                        help="refuse larger images (default: the decoder's 80 MP); images must also have sides >= "
                             f"{MIN_SIDE} px and an aspect ratio <= {MAX_ASPECT:g}:1")
    parser.add_argument("--verbose", action="store_true", help="print Triton's full log")
    return parser


def infer_remote_parser() -> argparse.ArgumentParser:
    """The ``cmgnet infer-remote`` parser."""
    parser = make_parser('cmgnet infer-remote', 'Segment image files through a running server (`cmgnet serve`, or an exported Triton repository) with tritonclient: masks at the original size in OUT/masks/<id>.png. The exit code is 1 if any image failed (the others are still written).', [
        'cmgnet infer-remote images/ --out masks/',
        'cmgnet infer-remote lesion.jpg --metadata metadata.csv --url 127.0.0.1:8001 --protocol grpc --out m/',
    ])
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, or .txt lists of paths")
    add_out_argument(parser, "output folder", required=True)
    parser.add_argument("--url", default="127.0.0.1:8000", help="the server's host:port (HTTP 8000, gRPC 8001)")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http", help="how to talk to it")
    parser.add_argument("--model", default="cmgnet", help="the served model's name")
    parser.add_argument("--metadata", nargs="+", help="metadata CSV(s) with image_id + age/sex/site/diagnosis/description")
    parser.add_argument("--concurrency", type=_positive, default=4, help="requests in flight")
    parser.add_argument("--overwrite", action="store_true", help="replace masks already in --out")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _command(parser_of: Callable[[], argparse.ArgumentParser], module: str, name: str) -> Callable[..., int]:
    """``cmgnet <name>``: parse with ``parser_of`` (light), then run ``cmgnet.deploy.<module>.main``."""

    def run(argv: Sequence[str] | None = None) -> int:
        argv = _checked(parser_of(), argv)
        return importlib.import_module(f".{module}", __package__).main(argv)

    run.__doc__ = f"``cmgnet {name}``: see :func:`cmgnet.deploy.{module}.main`."
    return run


export_main = _command(export_parser, "export", "export")
predict_main = _command(predict_parser, "predict", "predict")
serve_main = _command(serve_parser, "server", "serve")
infer_remote_main = _command(infer_remote_parser, "client", "infer-remote")
