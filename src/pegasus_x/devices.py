"""Where a model runs: the device, the dtype, and the process group of a ``torchrun`` launch.

Every command and API picks its device and dtype through these functions, so a bad name gets the same one-line
error everywhere, float16 is refused for one reason in one place, and each ``torchrun`` process takes its own GPU.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist

from .errors import ConfigError, InputError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda", "mps")


# ---------------------------------------------------------------------------------------------------- dtype
def refuse_float16(dtype: torch.dtype) -> None:
    """Raise ConfigError when ``dtype`` is float16, which PEGASUS-X cannot run in.

    Raises:
        ConfigError: ``dtype`` is ``torch.float16``.
    """
    if dtype == torch.float16:
        raise ConfigError("float16 overflows inside PEGASUS-X (activations exceed 65504); use torch.bfloat16 or "
                          "torch.float32 ('bf16' or 'fp32')")


def check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A requested model dtype: ``torch.float32`` / ``torch.bfloat16`` or a name in :data:`DTYPES`; None stays None.

    Raises:
        ConfigError: float16 (it overflows inside PEGASUS-X) or any other dtype.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is unknown; use one of fp32, bf16")
        dtype = DTYPES[dtype]
    if dtype is None or dtype in (torch.float32, torch.bfloat16):
        return dtype
    refuse_float16(dtype)
    raise ConfigError(f"dtype {dtype!r} is not supported; use torch.float32 or torch.bfloat16 ('fp32' or 'bf16')")


# ---------------------------------------------------------------------------------------------------- device
def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a :class:`torch.device`, checked to exist on this machine before any slow work starts.

    Raises:
        InputError: an unknown name, a device type this library does not run on, or CUDA / MPS / that GPU not
            available here.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {device!r} is unknown; use cpu, cuda, cuda:N or mps") from None
    name = str(resolved)
    if resolved.type not in DEVICE_TYPES:
        raise InputError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or mps")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} was asked for but CUDA is not available here; use cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise InputError(f"device {name!r} does not exist: this machine has {count} CUDA device(s), "
                             f"cuda:0 … cuda:{count - 1}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {name!r} was asked for but MPS (Apple GPUs) is not available here; use cpu")
    return resolved


def local_rank() -> int:
    """This process's number on its node, as ``torchrun`` sets it (0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(requested: torch.device | str | None = None) -> torch.device:
    """The device to run on: ``requested`` (checked), else CUDA when it is available, else the CPU.

    A CUDA device without an index is this process's GPU, ``cuda:LOCAL_RANK`` (``cuda:0`` outside torchrun), so
    the processes of a ``torchrun`` launch do not share one GPU.

    Raises:
        InputError: see :func:`check_device`.
    """
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device(requested)
    if device.type == "cuda" and device.index is None:
        device = check_device(torch.device("cuda", local_rank()))
    return device


# ---------------------------------------------------------------------------------------------------- processes
def init_distributed(device: torch.device | str | None = None) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1) unless one exists already.

    Args:
        device: the device this process will run on (as for :func:`resolve_device`): a CUDA run selects this
            process's GPU and uses NCCL; a CPU run uses gloo.
    Returns:
        True when this call created the group (the caller then destroys it).
    Raises:
        InputError: see :func:`check_device`.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return True


def rank_and_world_size() -> tuple[int, int]:
    """(this process's rank, number of processes) of the process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------------------------------- the automatic dtype
# Which dtype a machine should run: the one rule behind ``dtype=None`` / ``--dtype auto``.
#
# On CUDA, bf16 where the GPU supports it. On a CPU, fp32. Where the CPU has bf16 arithmetic in hardware
# (AVX512-BF16 or AMX) bf16 decodes faster, but the automatic choice also asks bf16's logits to stay within 1e-2
# (relative, per row) of fp32's, and on pegasus-x-base weights they do not (``benchmarks/int8_accuracy.py`` prints
# the number, ``benchmarks/RESULTS.md`` logs it): there the reason says so and ``--dtype bf16`` is the user's call.
# Elsewhere (AVX2, most ARM) torch emulates bf16 arithmetic: the encoder runs far slower than in fp32, though decode
# steps, which stream half the bytes through the native kernels, run faster (``benchmarks/encoder.py``,
# ``benchmarks/peers.py``). int8 is never chosen automatically (``quantize="int8"`` asks for it).
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
                               "choice allows (measured by benchmarks/int8_accuracy.py)")
    return torch.float32, ("fp32: this CPU has no AVX512-BF16 or AMX, so in bf16 the encoder would be emulated and "
                           "far slower than in fp32 (decode steps alone would be faster)")
