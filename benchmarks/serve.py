"""Throughput and latency of ``cmgnet serve`` (a real Triton server) with dynamic batching on and off.

    python benchmarks/serve.py [--model isic-cmgnet-lite0] [--data ../shared/data/isic2018-256]
                               [--concurrency 1 4 16] [--requests 48] [--repeats 2]
                               [--batching 8:0 1:0 8:0:2 1:0:2] [--protocol http] [--tta | --no-tta]
                               [--out benchmarks/results/serve.json]

Each ``--batching MAX_BATCH:QUEUE_DELAY_US[:INSTANCES]`` is one server (``1:0`` is batching off:
every request runs alone; instances share the cores), all started once on free ports of
127.0.0.1 and then driven in turn:
for each repeat, for each concurrency, every server in order (so a change in the machine's
load hits all of them alike). A level is ``--requests`` requests from ``concurrency`` client
threads (tritonclient, one connection each), each request one real ISIC 2018 image file as
sent by a user (JPEG bytes, no metadata: the neutral sentence); the model runs as served
(its recorded flip TTA and post-processing included). Throughput is requests per second over
the level's wall time; latency percentiles are per request, as the client sees them.

Before the servers start, the predictor alone (``Segmenter.predict`` in this process) is timed at
batch 1 and 8: what dynamic batching can gain is how much less a larger batch costs per image.
The machine's load average before and after every level is in the JSON
(``benchmarks/results/serve.json``) with the CPU, and so is the CPU time the server (tritonserver
and its backend stubs) spent per request, which other work on the machine disturbs less than
wall time; on a shared 2-core machine run it when the load is low. Without the data folder, a serving environment (``make setup``) or tritonclient
the script says why and exits 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

from cmgnet.benchmarking import percentile, print_table, write_json
from cmgnet.errors import cli_entry

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "isic2018-256"


def _images(folder: Path, count: int) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*.jpg") if "Input" in str(p.parent))[:count]
    return [p.read_bytes() for p in files]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _cpu_seconds(pid: int) -> float | None:
    """CPU time of a server and its backend stubs so far (``None`` without psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    process = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])


def _level(url: str, protocol: str, images: list[bytes], concurrency: int, requests: int) -> dict:
    """``requests`` requests from ``concurrency`` threads; throughput and latency percentiles."""
    from cmgnet.deploy.client import SegmentationClient

    clients = [SegmentationClient(url, protocol) for _ in range(concurrency)]
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)

    def worker(client: SegmentationClient) -> None:
        barrier.wait()
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            start = time.perf_counter()
            try:
                client.segment(images[index % len(images)])
            except Exception as err:  # noqa: BLE001 - counted and reported
                errors.append(str(err))
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    for client in clients:
        client.close()
    if errors:
        raise RuntimeError(f"{len(errors)} of {requests} requests failed, e.g. {errors[0]}")
    return {"throughput_rps": round(requests / wall, 3), "p50_ms": round(1000 * percentile(latencies, 50), 1),
            "p99_ms": round(1000 * percentile(latencies, 99), 1), "mean_ms": round(1000 * statistics.mean(latencies), 1)}


def _spec(text: str) -> tuple[int, int, int]:
    """``MAX_BATCH:QUEUE_DELAY_US[:INSTANCES]`` -> the three numbers (one instance by default)."""
    values = [int(v) for v in text.split(":")]
    return values[0], values[1], values[2] if len(values) > 2 else 1


def _predictor_ms(model: str, images: list[bytes], batches: tuple[int, ...] = (1, 8),
                  tta: bool | None = None) -> dict[int, float]:
    """In this process, without a server: the predictor's wall time per image at each batch size.

    What dynamic batching can gain is how much less a larger batch costs per image.
    """
    import numpy as np

    from cmgnet.data.imageio import decode_image
    from cmgnet.deploy import Segmenter

    # The runner's own thread count (physical cores), as one served instance gets.
    segmenter = Segmenter.load(model, batch_size=max(batches), tta=tta, force=tta is not None)
    arrays = [decode_image(np.frombuffer(data, np.uint8), Path("image")) for data in images[:16]]
    segmenter.predict(arrays[: max(batches)])
    result = {}
    for batch in batches:
        start = time.perf_counter()
        for i in range(0, len(arrays), batch):
            segmenter.predict(arrays[i : i + batch])
        result[batch] = round(1000 * (time.perf_counter() - start) / len(arrays), 1)
    return result


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values)) if values else None


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="isic-cmgnet-lite0")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with ISIC 2018 input JPEGs")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48, help="requests per level")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batching", nargs="+", default=["8:0", "1:0", "8:0:2", "1:0:2"],
                        help="MAX_BATCH:QUEUE_DELAY_US[:INSTANCES] per server")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="serve with flip TTA on or off (default: as the model records)")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve.json")
    args = parser.parse_args(argv)

    if not args.data.is_dir():
        print(f"skipped: no image data at {args.data} (the project's ISIC 2018 copy, ../shared/data)")
        return 0
    try:
        import tritonclient.http  # noqa: F401
    except ImportError:
        print("skipped: tritonclient is not installed (pip install 'cmgnet[client]')")
        return 0
    from cmgnet.deploy.server import ServeError, find_serving_env, start_server

    try:
        env = find_serving_env()
    except ServeError as err:
        print(f"skipped: {err}")
        return 0
    images = _images(args.data, 64)
    if not images:
        print(f"skipped: no ISIC input JPEGs under {args.data}")
        return 0

    predictor = _predictor_ms(args.model, images, tta=args.tta)
    print(f"predictor alone, ms per image by batch size: {predictor}", flush=True)
    servers = {}
    try:
        for spec in args.batching:
            max_batch, delay, instances = _spec(spec)
            http, grpc, metrics = _free_ports(3)
            options = argparse.Namespace(model=args.model, host="127.0.0.1", port=http, grpc_port=grpc,
                                         metrics_port=metrics, max_batch=max_batch, queue_delay_us=delay,
                                         instances=instances, backend="auto", max_pixels=None, verbose=False,
                                         tta=args.tta, force=True)
            servers[spec] = (start_server(options, env), http if args.protocol == "http" else grpc)
        for spec, (server, _) in servers.items():
            server.wait_ready(timeout=1800)
            print(f"server {spec} ready", flush=True)
        for _, url_port in servers.values():  # first calls (ONNX Runtime, allocator) untimed
            _level(f"127.0.0.1:{url_port}", args.protocol, images, max(args.concurrency), max(args.concurrency))

        rows = []
        for repeat in range(args.repeats):
            for concurrency in args.concurrency:
                for spec, (server, url_port) in servers.items():
                    max_batch, delay, instances = _spec(spec)
                    load_before, cpu_before = os.getloadavg()[0], _cpu_seconds(server.process.pid)
                    result = _level(f"127.0.0.1:{url_port}", args.protocol, images, concurrency, args.requests)
                    cpu = _cpu_seconds(server.process.pid)
                    # Server CPU per request: what batching saves, less sensitive to other work than wall time.
                    cpu_ms = round(1000 * (cpu - cpu_before) / args.requests) if cpu is not None else None
                    row = {"batching": "off" if max_batch == 1 else "on", "max_batch": max_batch,
                           "queue_delay_us": delay, "instances": instances, "concurrency": concurrency,
                           "repeat": repeat, **result,
                           "server_cpu_ms_per_request": cpu_ms,
                           "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
                    rows.append(row)
                    print(row, flush=True)
    finally:
        for server, _ in servers.values():
            server.stop()

    summary = []
    for spec in args.batching:
        max_batch, delay, instances = _spec(spec)
        for concurrency in args.concurrency:
            mine = [r for r in rows if (r["max_batch"], r["queue_delay_us"], r["instances"]) == (max_batch, delay, instances)
                    and r["concurrency"] == concurrency]
            summary.append({"batching": mine[0]["batching"], "max_batch": max_batch, "queue_delay_ms": delay / 1000,
                            "instances": instances, "concurrency": concurrency,
                            "throughput_rps": round(statistics.median(r["throughput_rps"] for r in mine), 2),
                            "p50_ms": round(statistics.median(r["p50_ms"] for r in mine)),
                            "p99_ms": round(statistics.median(r["p99_ms"] for r in mine)),
                            "server_cpu_ms": _median(r["server_cpu_ms_per_request"] for r in mine),
                            "load": round(statistics.mean(r["load_before"] for r in mine), 1)})
    print_table(summary, ["batching", "max_batch", "queue_delay_ms", "instances", "concurrency", "throughput_rps", "p50_ms",
                          "p99_ms", "server_cpu_ms", "load"])
    write_json(args.out, rows, summary=summary, predictor_ms_per_image_by_batch=predictor, model=args.model, tta=args.tta, protocol=args.protocol, requests=args.requests,
               repeats=args.repeats, serving_numpy=env.numpy, images=f"{len(images)} ISIC 2018 JPEGs from {args.data.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
