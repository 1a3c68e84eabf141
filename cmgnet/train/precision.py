"""Which autocast precision a run computes in: ``train.mixed_precision`` resolved on this machine.

``auto`` (the CPU recipes' default) takes bf16 only where the hardware computes it natively:

* CUDA: bf16 on GPUs that support it (Ampere and newer), fp16 with loss scaling before that;
* CPU: bf16 where ATen dispatches AVX-512 kernels and the CPU has AVX512-BF16 or AMX, fp32
  elsewhere. Without those instructions oneDNN and ATen emulate bf16 in software: a CMG-Net
  training step (batch 16, 256 px) measured 10x slower than fp32 with AVX2 kernels on the
  project's EPYC, and over 50x was reported on a CPU that has only AVX2 (README, Training).

An explicit ``bf16`` is obeyed everywhere; on a CPU without native bf16 it warns once.
``accelerate launch --mixed_precision`` still takes precedence over the config.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

CHOICES = ("auto", "no", "bf16", "fp16")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which it has no bf16 instructions.
_ONEDNN_NO_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}
_warned = False


@dataclass(frozen=True)
class Precision:
    """The resolved choice: ``mixed_precision`` as Accelerate takes it, and why."""

    mixed_precision: str  # "no", "bf16" or "fp16"
    reason: str

    @property
    def name(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``."""
        return "fp32" if self.mixed_precision == "no" else self.mixed_precision


def cpu_bf16_native() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and what was seen (for logs).

    Reads the ATen kernel capability (``ATEN_CPU_CAPABILITY`` lowers it), the CPU's
    AVX512-BF16 and AMX flags, and a ``ONEDNN_MAX_CPU_ISA`` cap below bf16.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    flags = [name for name, has in (("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
                                    ("AMX", torch.cpu._is_amx_tile_supported())) if has]
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    seen = f"CPU capability {capability}" + (f" with {' and '.join(flags)}" if flags else ", no AVX512-BF16/AMX")
    if isa_cap:
        seen += f", ONEDNN_MAX_CPU_ISA={isa_cap}"
    native = capability.startswith("AVX512") and bool(flags) and isa_cap not in _ONEDNN_NO_BF16
    return native, seen


def cpu_capability() -> str:
    """ATen's CPU kernel level and bf16 support in a few words, e.g. ``AVX512, native bf16``."""
    native, _ = cpu_bf16_native()
    return f"{torch.backends.cpu.get_cpu_capability()}, {'native' if native else 'emulated'} bf16"


def resolve(configured: str, device_type: str) -> Precision:
    """Resolve ``train.mixed_precision`` for a run on ``device_type`` (``"cpu"`` or ``"cuda"``).

    Raises:
        ValueError: ``configured`` is not one of :data:`CHOICES`.
    """
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched not in ("no", ""):
        configured, source = launched, "accelerate launch --mixed_precision"
    else:
        source = "train.mixed_precision"
    if configured not in CHOICES:
        raise ValueError(f"mixed_precision must be one of {', '.join(CHOICES)}, got {configured!r}")
    if device_type == "cuda":
        if configured != "auto":
            return Precision(configured, f"{source}={configured}")
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "auto: the GPU supports bf16")
        return Precision("fp16", "auto: the GPU has no bf16, fp16 with loss scaling")
    native, seen = cpu_bf16_native()
    if configured == "auto":
        return Precision("bf16", f"auto: {seen}") if native else Precision("no", f"auto: {seen}, no native bf16")
    if configured == "bf16" and not native:
        warn_emulated_bf16(seen)
    return Precision(configured, f"{source}={configured}")


def warn_emulated_bf16(seen: str) -> None:
    """Say once per process that bf16 will be emulated on this CPU."""
    global _warned
    if not _warned:
        _warned = True
        logger.warning("mixed_precision=bf16 on a CPU without native bf16 (%s): it is emulated in software, "
                       "10-50x slower than fp32 as measured (README, Training); set train.mixed_precision=auto "
                       "or no", seen)
