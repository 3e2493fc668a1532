"""The CPU decode-step kernels of ``decode_kernels.c``: built once with the system C compiler, called via ctypes.

Decoding one token reads every decoder weight, the LM head and the cross-attention keys/values for one to a few
query rows, so a step is as fast as those bytes stream from memory. torch's kernels for such products stream at
~26 GB/s here (its batched matrix products) or less; a plain ``sum`` reaches ~31–34 GB/s. The C kernels stream each
tensor once at the ``sum`` rate on the threads of torch's own OpenMP pool. ``benchmarks/generate.py`` has the
end-to-end numbers.

The shared library is compiled on first use (about half a second) into ``$PEGASUS_X_CACHE`` (default
``~/.cache/pegasus-x``), keyed by the source, the compiler and the CPU, and loaded from there afterwards.
Without a C compiler, or with ``PEGASUS_X_NATIVE=0``, :func:`library` returns None and callers use torch kernels:
results agree up to the order of floating-point summation.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("decode_kernels.c")
MAX_ROWS = 8            # query rows per px_linear / px_decoder call (4 per pass over the weights)
MAX_HEAD_DIM = 256      # px_attention's limit

_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
# The activation functions px_decoder knows, by config name.
ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_new": 2, "gelu_fast": 2, "gelu_pytorch_tanh": 2, "silu": 3, "swish": 3,
               "tanh": 4}


class _Layer(ctypes.Structure):
    """``px_layer`` of decode_kernels.c: one decoder layer's tensors for :func:`decoder_step`."""

    _fields_ = ([(name, _ptr) for name in ("ln1_w", "ln1_b", "q", "k", "v", "o", "ln2_w", "ln2_b", "cq", "co",
                                          "ln3_w", "ln3_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b", "self_k",
                                          "self_v", "cross_k", "cross_v", "keep")]
                + [(name, _i64) for name in ("R", "B", "H", "hd", "ffn", "max_len", "S")]
                + [("bf16", _int), ("activation", _int), ("eps", ctypes.c_float)])


def _cache_dir() -> Path:
    root = os.environ.get("PEGASUS_X_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pegasus-x")
    return Path(root) / "kernels"


def _cpu_id() -> str:
    # -march=native code must not run on another CPU (a shared home directory): the CPU's flags join the key.
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build(cc: str) -> Path:
    """Compile the kernels (once per source/compiler/CPU) and return the shared library's path."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + version.encode() + _cpu_id().encode() + torch.__version__.encode()).hexdigest()
    path = _cache_dir() / f"decode_kernels-{key[:16]}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed: a concurrent process never loads a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", tmp,
                               str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-2000:] or f"{cc} exited with {done.returncode}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when they are switched off or cannot be built here."""
    if os.environ.get("PEGASUS_X_NATIVE", "1") == "0" or platform.system() == "Windows":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"pegasus-x: could not build the native decode kernels with {cc} into {_cache_dir()} "
                      f"({err}); decoding uses torch kernels and is slower. Set PEGASUS_X_CACHE to a writable "
                      "folder or CC to another compiler, or PEGASUS_X_NATIVE=0 to silence this.", stacklevel=2)
        return None
    lib.px_linear.argtypes = [_ptr, _int, _i64, _i64, _ptr, _int, _ptr, _ptr, _ptr, _int]
    lib.px_attention.argtypes = [_ptr, _ptr, _ptr, _int, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64,
                                 _ptr, _i64, _ptr, _ptr, _int]
    lib.px_decoder_work.argtypes = [_i64, _i64, _i64, _i64, _i64, _i64, _int]
    lib.px_decoder_work.restype = _i64
    lib.px_decoder.argtypes = [ctypes.POINTER(_Layer), _int, _i64, _ptr, _ptr, _int]
    return lib


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` for ``rows ≤ MAX_ROWS`` rows of ``x`` ``(..., in)``; fp32 or bf16 CPU tensors, contiguous weight.

    Accumulates in fp32; a bf16 result is rounded once at the end (as torch's bf16 linear does).
    """
    lib = library()
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    xf = x.reshape(rows, in_features).to(torch.float32).contiguous()
    bf = None if bias is None else bias.to(weight.dtype).contiguous()
    y = torch.empty(rows, out_features, dtype=torch.float32)
    bf16 = weight.dtype == torch.bfloat16
    work = torch.empty(rows * in_features if bf16 else 0)
    lib.px_linear(weight.data_ptr(), int(bf16), out_features, in_features, xf.data_ptr(), rows,
                  None if bf is None else bf.data_ptr(), y.data_ptr(), work.data_ptr(), torch.get_num_threads())
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


def attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
    """softmax(q kᵀ / sqrt(d) + mask) v for few query rows: q ``(B, H, G, d)``, k/v ``(B, H, S, d)``.

    k and v may be views of a preallocated cache (rows of d contiguous, any batch/head strides).
    ``keep``: bool ``(B, 1, 1, S)`` or None. Returns ``(B, H, G, d)`` in q's dtype.
    """
    lib = library()
    B, H, G, D = q.shape
    S = k.shape[2]
    qf = q.to(torch.float32).contiguous()
    out = torch.empty(B, H, G, D, dtype=torch.float32)
    threads = torch.get_num_threads()
    work = torch.empty(threads * G * (S + D), dtype=torch.float32)
    keep_bytes = None if keep is None else keep.reshape(keep.shape[0], S).contiguous().view(torch.uint8)
    lib.px_attention(qf.data_ptr(), k.data_ptr(), v.data_ptr(), int(k.dtype == torch.bfloat16), B, H, G, S, D,
                     k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                     None if keep_bytes is None else keep_bytes.data_ptr(),
                     0 if keep_bytes is None else keep_bytes.stride(0), out.data_ptr(),
                     work.data_ptr(), threads)
    return out.to(q.dtype)


def attention_fits(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> bool:
    """Whether :func:`attention` takes these tensors (else the caller uses SDPA)."""
    B, H, G, D = q.shape
    return (D % 8 == 0 and D <= MAX_HEAD_DIM and k.dtype == v.dtype and k.dtype in (torch.float32, torch.bfloat16)
            and k.shape == v.shape == (B, H, k.shape[2], D) and k.stride(3) == v.stride(3) == 1
            and k.stride(2) == v.stride(2) == D
            and (keep is None or (keep.dtype == torch.bool and keep.shape == (B, 1, 1, k.shape[2]))))


def _layer_tensors(layer) -> list[Tensor]:
    sa, ca = layer.self_attn, layer.encoder_attn
    return [layer.self_attn_layer_norm.weight, layer.self_attn_layer_norm.bias, sa.q_proj.weight, sa.k_proj.weight,
            sa.v_proj.weight, sa.out_proj.weight, layer.encoder_attn_layer_norm.weight,
            layer.encoder_attn_layer_norm.bias, ca.q_proj.weight, ca.out_proj.weight, layer.final_layer_norm.weight,
            layer.final_layer_norm.bias, layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias]


@dataclass
class DecoderPlan:
    """``px_decoder``'s arguments for one decoder over one cache (all but the position)."""

    layers: ctypes.Array           # of _Layer, one per decoder layer
    tensors: list[Tensor]       # what the pointers point into, kept alive with the plan
    rows: int
    d_model: int
    ffn: int
    inputs: int
    keys: int


def decoder_plan(decoder, cache, x: Tensor) -> DecoderPlan | None:
    """The plan for :func:`decoder_step` on ``x`` ``(R, 1, D)`` with this cache, or None where it cannot run.

    Built once per cache: the pointers stay valid while the weights and the cache's buffers do (a cache that
    replaces its buffers drops its plan).
    """
    cfg = decoder.config
    attn = decoder.layers[0].self_attn
    dtype, rows = cache.self_k[0].dtype, x.shape[0]
    B, H, S, hd = cache.cross_k[0].shape
    if (cfg.activation_function not in ACTIVATIONS or rows > MAX_ROWS or rows != cache.self_k[0].shape[0]
            or rows % B or attn.backend != "sdpa" or x.dtype != dtype or hd % 8 or hd > MAX_HEAD_DIM
            or dtype not in (torch.float32, torch.bfloat16)):
        return None
    keep = cache.encoder_keep
    if keep is not None:
        if keep.shape != (B, 1, 1, S) or keep.dtype != torch.bool or not keep.is_contiguous():
            return None
        keep = keep.view(torch.uint8)
    specs, tensors = [], [] if keep is None else [keep]
    for i, layer in enumerate(decoder.layers):
        if layer.self_attn.q_proj.bias is not None or layer.encoder_attn.q_proj.bias is not None:
            return None
        own = [*_layer_tensors(layer), cache.self_k[i], cache.self_v[i], cache.cross_k[i], cache.cross_v[i]]
        if any(t is None or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() for t in own):
            return None
        tensors += own
        specs.append(_Layer(*(t.data_ptr() for t in own), None if keep is None else keep.data_ptr(), rows, B, H, hd,
                            cfg.decoder_ffn_dim, cache.max_len, S, int(dtype == torch.bfloat16),
                            ACTIVATIONS[cfg.activation_function], cfg.layer_norm_eps))
    return DecoderPlan((_Layer * len(specs))(*specs), tensors, rows, H * hd, cfg.decoder_ffn_dim, B, S)


def decoder_step(plan: DecoderPlan, x: Tensor, cache) -> Tensor:
    """Run every decoder layer on ``x`` ``(R, 1, D)`` for position ``cache.length``.

    Writes this position's self-attention keys/values into ``cache`` (the caller advances ``cache.length``).
    Activations stay fp32 between the layers' operations; the result is returned in ``x``'s dtype.
    """
    lib = library()
    threads = torch.get_num_threads()
    state = x.reshape(plan.rows, plan.d_model).to(torch.float32, copy=True)
    work = torch.empty(lib.px_decoder_work(plan.rows, plan.d_model, plan.ffn, plan.inputs, plan.keys, cache.length,
                                           threads))
    if lib.px_decoder(plan.layers, len(plan.layers), cache.length, state.data_ptr(), work.data_ptr(), threads):
        raise RuntimeError("px_decoder refused its arguments; decoder_plan should have caught this")
    return state.to(x.dtype).view(x.shape)
