"""The native boundary: everything that runs outside torch's own kernels, and the one switch that turns it off.

**What it computes.** ``kernels.c`` (built by :mod:`.loader`, called through :mod:`.kernels`) does a CPU decode
step: every decoder layer in one call (``decoder_step``: pre-LN self-attention over the cache, this position's
keys/values written into it, cross-attention, feed-forward; ``decoder_rows``: the same for several new positions
per row, causal among them, for lookahead's verification pass), few-query attention (``attention``) and few-row
products (``kernels.linear``), fp32 and bf16 with fp32 accumulation, and int8 weights with fp32 row scales
(``kernels.linear_int8`` and the one-position step, for :mod:`pegasus_x.quantize`), widened to fp32 in registers,
and a beam-search step's log-softmax and top-k over the vocabulary (``log_softmax``, ``topk``; greedy's ``argmax``).
Past the decode step, fp32 products of many rows (the encoder's linears) as register-tiled GEMM (``kernels.gemm``)
and the encoder's attention (its blocks' and its globals' queries) on the same tiles (``encoder_attention``), where
the CPU is the one they are tiled for (AVX2 + FMA without AVX-512).
:mod:`.linear`'s ``Linear`` sends CPU products to those kernels, else (fp32, few rows, no compiler) to one
``torch.bmm`` over row slabs of the weight.
:mod:`.hugepages` puts the weights and large decoder caches in 2 MB pages (same numbers, faster streaming).

**Its reference path.** The torch layers of ``model.py``/``attention.py`` and ``F.linear`` (for int8:
``quantize.Int8Linear``'s dequantize-then-``F.linear``). :func:`enabled` is the
one switch every fast path checks: ``PEGASUS_X_NATIVE=0`` in the environment, or ``model.set_native(False)``
(:func:`set_enabled`) for one model, runs the reference everywhere (huge pages stay: they change no number).
Without a C compiler, on Windows, or when the build fails or its cache folder is unsafe, only the kernels are off.

**The tests that hold them equal.** ``tests/test_native.py``: each kernel against torch (``F.linear``, SDPA, the
torch decoder layers) at fp32 and bf16 and under non-fp32 default dtypes, generation with the switch on and off,
and generation against transformers; ``tests/test_quantize.py`` for the int8 kernels against their reference;
``tests/test_linear.py`` for the slab route; ``tests/test_hugepages.py``;
``tests/test_native_loader.py`` for the build, its cache and the interface check.
Results agree up to the order of floating-point summation.
"""

from . import hugepages
from .kernels import (DecoderPlan, argmax, attention, attention_fits, encoder_attention, encoder_attention_fits,
                      decoder_plan, decoder_rows, decoder_rows_fit, decoder_step, describe, log_softmax, topk)
from .linear import Linear
from .loader import available, enabled, library, set_enabled

__all__ = ["DecoderPlan", "Linear", "argmax", "attention", "attention_fits", "available", "encoder_attention",
           "encoder_attention_fits", "decoder_plan", "decoder_rows", "decoder_rows_fit", "decoder_step", "describe",
           "enabled", "hugepages", "library", "log_softmax", "set_enabled", "topk"]
