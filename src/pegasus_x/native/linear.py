"""Linear layers, with faster routes for the few-row products of decoding on a CPU.

A decode step multiplies one to a few rows (one per beam) by every decoder weight and the LM head: it is bound by
how fast the weights stream from memory. For such products MKL's fp32 matrix-vector kernels on the CPU run on one
thread and reach only part of the machine's bandwidth. Two routes do better, in this order:

- the native kernels (:mod:`.kernels`, fp32 and bf16), when a C compiler was there to build them: each
  thread streams its share of the weight's rows once, at about the rate of a plain ``sum``;
- else, for fp32, one ``torch.bmm`` over one slab of the weight's output rows per thread (a view, no copy).

``benchmarks/generate.py`` measures the routes end to end: as installed (native), with ``CC=false`` (no C
compiler: the slab route) and with ``PEGASUS_X_NATIVE=0`` (``F.linear`` everywhere); ``benchmarks/RESULTS.md``
logs the results.

In a decode step the native route runs whole decoder layers at once (``kernels.decoder_step``); this module's
route serves the LM head and any layer the fused kernel does not take. The native kernels take up to
``MAX_DRAFT_ROWS`` rows (lookahead's passes), streaming the weight once for all of them. Beyond that the product is
compute-bound (the encoder's linears, a prefill's cross keys/values): fp32 takes ``px_gemm`` where the library's
build target prefers it (AVX2 + FMA without AVX-512, :func:`.kernels.gemm_preferred`; ``benchmarks/encoder.py``
measures it), else ``F.linear``. With the fast paths switched off (``loader.enabled``) every product is
``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels, loader

SMALL_ROWS = 4          # up to this many rows the product is bandwidth-bound and the slab route wins
MIN_SLAB_OUTPUTS = 64   # output features per thread below which one slab per thread is too little work


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, module: nn.Module | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; few-row products on the CPU without autograd stream the weight faster.

    Route, in order: the native kernels (fp32 or bf16 up to ``MAX_DRAFT_ROWS`` rows, fp32 ``px_gemm`` beyond, when
    a C compiler is there), the slab route (fp32), torch.
    The result equals ``F.linear``'s up to the order of floating-point summation. ``module``: whose fast-path
    switch applies (:func:`loader.enabled`).
    """
    if torch.is_grad_enabled() or not loader.enabled(module):
        return F.linear(x, weight, bias)
    fits = kernels.linear_fits(x, weight, bias) or kernels.many_rows_fit(x, weight, bias)
    if fits and loader.library() is not None:
        return kernels.linear(x, weight, bias)
    if kernels.gemm_fits(x, weight, bias) and kernels.gemm_preferred():
        return kernels.gemm(x, weight, bias)
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    parts = torch.get_num_threads()
    if (rows == 0 or rows > SMALL_ROWS or x.dtype != torch.float32 or weight.dtype != torch.float32
            or not kernels.on_cpu(x, weight, bias) or not weight.is_contiguous() or parts < 2
            or out_features < MIN_SLAB_OUTPUTS * parts):
        return F.linear(x, weight, bias)
    return _slabs(x, weight, bias, rows, parts)


def _slabs(x: Tensor, weight: Tensor, bias: Tensor | None, rows: int, parts: int) -> Tensor:
    """The slab route: one ``torch.bmm`` over ``parts`` row slabs of the weight (a view, no copy)."""
    out_features, in_features = weight.shape
    even = out_features - out_features % parts
    # xᵀ as a column-major (in, rows) operand: MKL streams the slabs at full speed with this layout only (a
    # row-major one runs several times slower).
    xt = x.reshape(rows, in_features).contiguous().t()
    slabs = (weight if even == out_features else weight[:even]).view(parts, even // parts, in_features)
    y = torch.bmm(slabs, xt.expand(parts, in_features, rows))                 # (parts, even/parts, rows)
    # Row-major (rows, even) again: the next layer's input and attention kernels need it.
    y = y.view(1, even) if rows == 1 else y.view(even, rows).t().contiguous()
    if even < out_features:                                                   # < parts leftover output rows
        y = torch.cat([y, F.linear(xt.t(), weight[even:])], dim=1)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_features)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state_dict keys) whose forward is :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self)
