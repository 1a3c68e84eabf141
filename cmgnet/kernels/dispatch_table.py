"""Where the Triton kernels beat the best PyTorch path: the table behind backend ``"auto"``.

``TABLE`` maps a GPU name (``torch.cuda.get_device_name()``) to the shape classes
(``cmgnet.kernels.dispatch.shape_key``) on which a kernel ran at least ``MIN_SPEEDUP`` times
faster, forward + backward, than the best of PyTorch eager, ``scaled_dot_product_attention``
and ``torch.compile``; the value is that measured speed-up. ``SOURCES`` says, per GPU, which
benchmark run the numbers come from. A CUDA call whose (GPU, shape class) is not listed runs
the PyTorch path.

Fill it on the target GPU with ``python benchmarks/attention_kernels.py --write-dispatch``, which
rewrites this file keeping the other GPUs' rows.
"""

MIN_SPEEDUP = 1.5

# Empty: no GPU benchmark has listed a kernel yet, so backend "auto" keeps every op on PyTorch.
TABLE: dict[str, dict[str, float]] = {}

SOURCES: dict[str, str] = {}
