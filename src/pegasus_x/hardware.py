"""Which dtype a machine should run: the one rule behind ``dtype=None`` / ``--dtype auto``.

On CUDA, bf16 where the GPU supports it. On a CPU, fp32. Where the CPU has bf16 arithmetic in hardware
(AVX512-BF16 or AMX) bf16 decodes faster, but the automatic choice also asks bf16's logits to stay within 1e-2
(relative, per row) of fp32's, and on pegasus-x-base weights they do not (``benchmarks/int8_accuracy.py`` prints
the number): there the reason says so and ``--dtype bf16`` is the user's call. Elsewhere (AVX2, most ARM) bf16 is
emulated and slower than fp32. int8 is never chosen automatically (``quantize="int8"`` asks for it).
"""

from __future__ import annotations

import functools

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")     # /proc/cpuinfo flags of bf16 arithmetic in hardware


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux); elsewhere what torch reports (e.g. ``avx512``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability().lower()           # "avx2", "avx512", "default", ...
    return frozenset({capability})


def auto_dtype(device: torch.device | str) -> tuple[torch.dtype, str]:
    """(dtype, why) for ``device`` when the caller did not choose one."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16: this GPU supports it (half the memory, faster)"
        return torch.float32, "fp32: this GPU has no bf16"
    if device.type != "cpu":
        return torch.float32, f"fp32: the default on {device.type}"
    found = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
    if found:
        return torch.float32, (f"fp32: this CPU has bf16 arithmetic ({', '.join(found)}) and --dtype bf16 decodes "
                               "faster here, but bf16 logits differ from fp32 by more than the 1e-2 the automatic "
                               "choice allows")
    return torch.float32, ("fp32: this CPU has no AVX512-BF16 or AMX, so bf16 would be emulated and slower than "
                           "fp32")
