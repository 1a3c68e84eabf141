"""Triton kernels vs the PyTorch reference: forward and gradients, and the dispatch rules.

On a machine without a GPU the kernels run in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set here before Triton is imported); with a GPU they run compiled
on it. Shapes are tiny and deliberately odd (non-powers of two, padded text) so the
masks and the multi-block loops are exercised; the interpreter's blocks are 32 wide.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") == "0" else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "0":
    # Triton decides at import whether its own library functions (tl.max, tl.sum) are interpreted.
    if "triton" in sys.modules:
        pytest.skip("triton was imported before TRITON_INTERPRET could be set: run "
                    "TRITON_INTERPRET=1 pytest tests/test_kernels.py", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"  # harmless for the rest of a CPU-only session

pytest.importorskip("triton")

from cmgnet import kernels  # noqa: E402
from cmgnet.kernels import dispatch, dispatch_table, reference  # noqa: E402

# The interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584, "not
# supported yet"), so bfloat16 is checked on GPUs only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Max error within ``TOLERANCE[dtype]`` of the reference's largest magnitude."""
    assert actual.shape == expected.shape, what
    err = (actual.float() - expected.float()).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-3)
    assert err <= TOLERANCE[dtype] * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def leaf(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_()


def check(kernel_fn, reference_fn, inputs: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Compare outputs and input gradients of ``kernel_fn`` with ``reference_fn`` run in fp32."""
    for t in inputs:
        if t is not None and not t.is_leaf:
            t.retain_grad()  # views of leaves, laid out as the model passes them
    outputs = kernel_fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    upcast = [t.detach().float().requires_grad_() if t is not None else None for t in inputs]
    expected = reference_fn(*upcast)
    expected = expected if isinstance(expected, tuple) else (expected,)
    grads = [torch.randn(e.shape, device=DEVICE) for e in expected]
    torch.autograd.backward(list(outputs), [g.to(o.dtype) for g, o in zip(grads, outputs)])
    torch.autograd.backward(list(expected), grads)
    for i, (o, e) in enumerate(zip(outputs, expected)):
        assert o.dtype == dtype, f"output {i} is {o.dtype}"
        assert_close(o, e, dtype, f"output {i}")
    for i, (t, u) in enumerate(zip(inputs, upcast)):
        if t is None or u.grad is None:  # unused by the op (e.g. the gate's inputs with a fixed gate)
            assert t is None or t.grad is None or not t.grad.any(), f"input {i} should get no gradient"
        else:
            assert_close(t.grad, u.grad, dtype, f"grad of input {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "channels", "heads", "h", "w"), [(2, 24, 2, 5, 7), (1, 32, 1, 17, 3)])
def test_multi_axis_attention_matches_reference(dtype, batch, channels, heads, h, w):
    rows = leaf(batch, 3 * channels, h, w, dtype=dtype)
    cols = leaf(batch, 3 * channels, h, w, dtype=dtype)
    with kernels.use_backend("triton"):
        check(lambda r, c: kernels.multi_axis_attention(r, c, heads),
              lambda r, c: reference.multi_axis_attention(r, c, heads, fused=False), [rows, cols], dtype)


@pytest.mark.parametrize("layout", ["channels_last", "mixed"])
def test_multi_axis_attention_on_strided_maps(layout):
    # channels-last maps are read through their strides; maps with different strides are made
    # contiguous first (the two axes share one set of strides in the kernel).
    rows = leaf(1, 36, 6, 9, dtype=torch.float32).to(memory_format=torch.channels_last)
    cols = leaf(1, 36, 6, 9, dtype=torch.float32)
    if layout == "channels_last":
        cols = cols.to(memory_format=torch.channels_last)
    with kernels.use_backend("triton"):
        check(lambda r, c: kernels.multi_axis_attention(r, c, 3),
              lambda r, c: reference.multi_axis_attention(r, c, 3, fused=False), [rows, cols], torch.float32)


@pytest.mark.parametrize("axis", ["horizontal", "vertical"])
def test_single_axis_attention(axis):
    q, k, v = (leaf(2, 12, 6, 9, dtype=torch.float32) for _ in range(3))
    with kernels.use_backend("triton"):
        check(lambda *t: kernels.axial_attention(*t, 3, axis),
              lambda *t: reference.axial_attention(*t, 3, axis, fused=False), [q, k, v], torch.float32)


def _heads_view(b: int, n: int, heads: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """``B x heads x n x d`` view of a ``B x n x heads*d`` projection, as the model splits heads."""
    return leaf(b, n, heads * d, dtype=dtype).view(b, n, heads, d).transpose(1, 2)


def _text_mask(b: int, length: int) -> torch.Tensor:
    mask = torch.ones(b, length, dtype=torch.bool, device=DEVICE)
    mask[-1, length // 2:] = False  # padded text in the last sample
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "heads", "n", "d", "length", "channels", "text_dim"),
                         [(2, 2, 45, 8, 7, 40, 12), (1, 3, 16, 16, 33, 16, 8)])
@pytest.mark.parametrize("learned_gate", [True, False])
def test_gated_cross_attention_matches_reference(dtype, batch, heads, n, d, length, channels, text_dim, learned_gate):
    image = leaf(batch, channels, n, dtype=dtype).transpose(1, 2)  # the model's token view of a map
    image_normed = leaf(batch, n, channels, dtype=dtype)
    q = _heads_view(batch, n, heads, d, dtype)
    k, v = (_heads_view(batch, length, heads, d, dtype) for _ in range(2))
    out_weight, out_bias = leaf(channels, heads * d, dtype=dtype, scale=0.3), leaf(channels, dtype=dtype)
    gate = [None] * 3
    if learned_gate:
        gate = [leaf(1, 2 * channels + text_dim, dtype=dtype, scale=0.2), leaf(1, dtype=dtype),
                leaf(batch, text_dim, dtype=dtype)]
    mask = _text_mask(batch, length)

    def run(op):
        return lambda image, image_normed, q, k, v, w, b, *g: op(image, image_normed, q, k, v, mask, w, b, *g)

    with kernels.use_backend("triton"):
        check(run(kernels.gated_cross_attention), run(lambda *a: reference.gated_cross_attention(*a, fused=False)),
              [image, image_normed, q, k, v, out_weight, out_bias, *gate], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("queries", "keys", "masked"), [(7, 70, False), (5, 37, True), (20, 20, True)])
def test_decode_attention_matches_reference(dtype, queries, keys, masked):
    q = _heads_view(2, queries, 3, 12, dtype)
    k, v = (_heads_view(2, keys, 3, 12, dtype) for _ in range(2))
    mask = _text_mask(2, keys) if masked else None
    with kernels.use_backend("triton"):
        check(lambda q, k, v: kernels.attention(q, k, v, mask),
              lambda q, k, v: reference.attention_math(q, k, v, mask), [q, k, v], dtype)


def test_forward_without_autograd_matches():
    """Without autograd the kernels skip what only the backward needs (e.g. the saved ``A``)."""
    maps = torch.randn(2, 3 * 24, 5, 7, device=DEVICE)
    q, k, v = (torch.randn(2, 2, n, 8, device=DEVICE) for n in (40, 9, 9))
    image, normed = torch.randn(2, 40, 16, device=DEVICE), torch.randn(2, 40, 16, device=DEVICE)
    out_proj = [torch.randn(16, 16, device=DEVICE), torch.randn(16, device=DEVICE)]
    gate = [torch.randn(1, 40, device=DEVICE), torch.randn(1, device=DEVICE), torch.randn(2, 8, device=DEVICE)]
    mask = _text_mask(2, 9)
    ops = [
        lambda: kernels.multi_axis_attention(maps, maps, 2),
        lambda: kernels.attention(k, q, q, None),
        lambda: kernels.gated_cross_attention(image, normed, q, k, v, mask, *out_proj, *gate),
    ]
    for op in ops:
        with kernels.use_backend("triton"):
            with torch.inference_mode():
                fast = op()
            slow = op()
        with kernels.use_backend("reference"):
            expected = op()
        for a, b, e in zip(*(t if isinstance(t, tuple) else (t,) for t in (fast, slow, expected))):
            assert torch.equal(a, b)
            assert_close(a, e, torch.float32, "inference output")


def test_model_with_kernels_matches_reference(make_tiny_config, monkeypatch):
    """The whole tiny CMG-Net, forward and every parameter gradient, kernels vs reference math."""
    import importlib

    from cmgnet.model import CMGNet

    calls = {}
    for module, name in [("triton_axial", "axial_attention"), ("triton_gated_cross", "gated_cross_attention"),
                         ("triton_decode", "attention")]:
        mod = importlib.import_module(f"cmgnet.kernels.{module}")

        def counted(*args, _fn=getattr(mod, name), _module=module):
            calls[_module] = calls.get(_module, 0) + 1
            return _fn(*args)

        monkeypatch.setattr(mod, name, counted)
    net = CMGNet(make_tiny_config()).to(DEVICE).train()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    text = ["Asymmetric lesion with irregular borders and multiple colors.", "Skin lesion."]
    results = {}
    for backend in ("reference", "triton"):
        net.zero_grad()
        with kernels.use_backend(backend):
            out = net(x, text=text)
        out.square().mean().backward()
        results[backend] = out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    # MASA once; CMFM layers 2 + 1 + 1 over three scales, each with text self- and text -> image
    # attention, plus image self-attention in the two bottleneck layers (2 x 2 tokens at 32 px).
    assert calls == {"triton_axial": 1, "triton_gated_cross": 4, "triton_decode": 10}
    (ref_out, ref_grads), (out, grads) = results["reference"], results["triton"]
    assert_close(out, ref_out, torch.float32, "model output")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], torch.float32, name)


def test_shape_key_buckets_to_powers_of_two():
    assert kernels.shape_key("decode", torch.bfloat16, b=24, n=1000, d=32) == "decode/bfloat16/b32/n1024/d32"
    assert kernels.shape_key("axial_hv", torch.float16, b=1, h=16) == "axial_hv/float16/b1/h16"


def test_dispatch_table_is_well_formed():
    ops = ("axial_hv", "axial_h", "axial_v", "gated_cross", "decode")
    for gpu, rows in dispatch_table.TABLE.items():
        assert gpu in dispatch_table.SOURCES, f"{gpu}: no benchmark source recorded"
        for key, speedup in rows.items():
            assert key.split("/")[0] in ops and speedup >= dispatch_table.MIN_SPEEDUP, (gpu, key, speedup)


def test_auto_uses_a_kernel_only_where_the_table_lists_the_shape(monkeypatch):
    cuda = torch.device("cuda", 0)
    listed = "decode/float16/b8/heads8/m32/n4096/d32"
    monkeypatch.setattr(dispatch, "_listed", lambda index: frozenset({listed}))
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    with kernels.use_backend("auto"):
        assert dispatch._use_kernel(lambda: listed, True, cuda)
        assert not dispatch._use_kernel(lambda: "decode/float16/b1/heads8/m32/n4096/d32", True, cuda)
        assert not dispatch._use_kernel(lambda: listed, False, cuda)  # shape the kernel cannot take
        assert not dispatch._use_kernel(lambda: listed, True, torch.device("cpu"))
    for backend in ("sdpa", "reference"):
        with kernels.use_backend(backend):
            assert not dispatch._use_kernel(lambda: listed, True, cuda)


def test_forced_triton_needs_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 4, 8)
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.attention(q, q, q)


def test_without_triton_only_the_forced_backend_fails(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="pip install"):
        kernels.set_backend("triton")
    q = torch.randn(1, 2, 4, 8)
    with kernels.use_backend("auto"):
        torch.testing.assert_close(kernels.attention(q, q, q), reference.attention_math(q, q, q))
    with pytest.raises(ValueError, match="unknown attention backend"):
        kernels.set_backend("flash")


def _benchmark_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_kernels.py"
    spec = importlib.util.spec_from_file_location("benchmark_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(DEVICE == "cuda", reason="the dry run runs the kernels in the interpreter, not on the GPU")
def test_benchmark_dry_run_writes_results_and_a_dispatch_table(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the dry run sets it too (already set on CPU)
    bench = _benchmark_module()
    out, table = tmp_path / "kernels.json", tmp_path / "dispatch_table.py"
    args = ["--dry-run", "--ops", "decode", "--batches", "1", "--impls", "sdpa", "triton", "--out", str(out),
            "--write-dispatch", "--dispatch-path", str(table)]
    assert bench.main(args) == 0
    results = json.loads(out.read_text())
    assert results["dry_run"] and {r["impl"] for r in results["results"]} == {"sdpa", "triton"}
    assert all("fwd_bwd_ms" in r for r in results["results"]), results["results"]
    written = {}
    exec(table.read_text(), written)  # a valid module with the same names as the shipped table
    assert written["MIN_SPEEDUP"] == dispatch_table.MIN_SPEEDUP and isinstance(written["TABLE"], dict)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_benchmark_refuses_without_cuda(capsys):
    assert _benchmark_module().main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
