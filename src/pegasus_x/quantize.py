"""Weight-only int8 for decoding: every decoder linear and the LM head, one fp32 scale per output row.

A decode step streams every decoder weight and the LM head once for one to a few rows, so its time is the bytes of
those weights; int8 reads a quarter of fp32's. Quantization is symmetric per output row (channel):
``scale[o] = max_i |W[o, i]| / 127``, ``Q[o, i] = round(W[o, i] / scale[o])`` in [-127, 127]. Activations stay in
the model's dtype; the encoder, embeddings and LayerNorms stay as they are. ``benchmarks/int8_accuracy.py`` measures
what this costs (logits against fp32, ROUGE of the demo model) and why per-row scales suffice.

:class:`Int8Linear` holds the int8 weight and its scales. Its forward is the reference (dequantize, then
``F.linear`` in fp32); few-row CPU products and the fused decoder step (``native/kernels.c``) widen the int8 weights
in registers instead. The one switch of :mod:`pegasus_x.native` (``PEGASUS_X_NATIVE=0``, ``model.set_native(False)``)
selects the reference here too; ``tests/test_quantize.py`` holds the two equal.

Quantizing at load (``from_pretrained(..., quantize="int8")``, :func:`quantize_as_loaded`) takes each weight as
it is read, so the fp32 decoder and LM-head weights are never all in memory: the process peaks below an fp32 load
(``benchmarks/peers.py`` prints the peak RSS and load time of each). :func:`quantize_model` quantizes a model already
in memory; each fp32 weight it replaces is freed unless something else holds it (a model loaded in fp32 keeps its
weights in one block until every tensor in it is gone).

A quantized model is not saved: :func:`check_savable` refuses with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .errors import CheckpointError, ConfigError
from .native import hugepages, kernels

MODES = ("int8",)
QMAX = 127              # symmetric: -127..127, so -W quantizes to -Q
CHUNK_ROWS = 2048       # rows quantized at a time: the fp32 temporaries stay a few MB even for the LM head


def check_mode(quantize: str | None) -> str | None:
    """``quantize`` as given (None or one of :data:`MODES`).

    Raises:
        ConfigError: any other value.
    """
    if quantize is not None and quantize not in MODES:
        raise ConfigError(f"quantize={quantize!r} is not supported; use one of {list(MODES)} or None")
    return quantize


def quantize_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row of the last dimension: ``(Q int8, scale fp32)``, ``Q · scale[..., None] ≈ rows``, the
    scale of each row its largest magnitude / :data:`QMAX`; an all-zero row gets scale 1."""
    w = rows.detach().float()
    s = w.abs().amax(dim=-1) / QMAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(w / s[..., None]).clamp_(-QMAX, QMAX).to(torch.int8), s    # whole numbers: exact in int8


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    """The fp32 rows int8 ``q`` and its row scales stand for (:func:`quantize_rows` undone, up to rounding)."""
    return q.float() * scale[..., None]


def quantize_weight(weight: Tensor, arena: hugepages.Arena | None = None) -> tuple[Tensor, Tensor]:
    """``(Q int8 (out, in), scale fp32 (out,))``, ``Q · scale[:, None] ≈ weight``; an all-zero row gets scale 1.

    Computed :data:`CHUNK_ROWS` rows at a time (the result does not depend on it), so the temporaries stay small
    beside a large weight. ``arena``: where ``Q`` and the scales go (2 MB pages, which decode steps stream faster),
    else ordinary memory.
    """
    rows, cols = weight.shape
    if arena is not None:
        q, scale = arena.empty((rows, cols), torch.int8), arena.empty((rows,), torch.float32)
    else:
        q, scale = torch.empty(rows, cols, dtype=torch.int8), torch.empty(rows, dtype=torch.float32)
    for start in range(0, rows, CHUNK_ROWS):
        q[start:start + CHUNK_ROWS], scale[start:start + CHUNK_ROWS] = quantize_rows(weight[start:start + CHUNK_ROWS])
    return q, scale


class Int8Linear(nn.Module):
    """A linear layer with int8 weights ``qweight`` ``(out, in)`` and fp32 row scales ``scale`` ``(out,)``.

    The bias (if any) stays in the model's dtype. Inference only: the weights are buffers, not parameters.
    """

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantize(self) -> Tensor:
        """The fp32 weight these int8 values and scales stand for, ``(out, in)``."""
        return dequantize_rows(self.qweight, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(..., in)`` → ``(..., out)`` in ``x``'s dtype, computed in fp32."""
        if (not torch.is_grad_enabled() and native.available(self)
                and kernels.linear_int8_fits(x, self.qweight, self.scale, self.bias)):
            return kernels.linear_int8(x, self.qweight, self.scale, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.dequantize(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _targets(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Weight name (as in ``model.state_dict()``) → (parent, attribute) of every linear layer of the decoder, then of
    the LM head."""
    names = {id(module): name for name, module in model.named_modules()}
    found = {}
    for parent in model.get_decoder().modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found[".".join(filter(None, (names[id(parent)], attr, "weight")))] = (parent, attr)
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        found["lm_head.weight"] = (model, "lm_head")
    return found


KV_DTYPES = {"bf16": torch.bfloat16, torch.bfloat16: torch.bfloat16, "int8": torch.int8, torch.int8: torch.int8}
KV_CHOICES = ("bf16", "int8")   # the names the command line takes


def check_kv_dtype(kv_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The cross-attention keys/values' dtype ``kv_dtype`` names (None: the model's own).

    Raises:
        ConfigError: anything but None, bf16 or int8.
    """
    if kv_dtype is not None and not (isinstance(kv_dtype, (str, torch.dtype)) and kv_dtype in KV_DTYPES):
        raise ConfigError(f"kv_dtype={kv_dtype!r} is not supported; use 'bf16', 'int8' or None (the model's dtype)")
    return None if kv_dtype is None else KV_DTYPES[kv_dtype]


def check_on_cpu(device: torch.device, **options: Any) -> None:
    """Refuse the CPU decoding options given (``quantize=``, ``kv_dtype=``: not None) for another ``device``.

    Raises:
        ConfigError: naming the first such option.
    """
    for name, value in options.items():
        if value is not None and device.type != "cpu":
            raise ConfigError(f"{name}={value!r} is for CPU decoding; drop it or pass device='cpu' (not {device})")


def set_kv_dtype(model: nn.Module, kv_dtype: torch.dtype | str | None) -> None:
    """Keep generation's cross-attention keys/values of ``model`` in ``kv_dtype`` (every decode step reads them: at
    long inputs they outweigh the int8 weights): ``torch.bfloat16`` / ``"bf16"``; ``torch.int8`` / ``"int8"``, a
    quarter of fp32's bytes, each key and value row (one head at one position) quantized symmetrically with its
    own fp32 scale (:func:`quantize_rows`); or None (the model's dtype). For CPU decoding, whose kernels read them
    as they are.

    Raises:
        ConfigError: any other ``kv_dtype``, or a bf16/int8 one for a model that is not on the CPU.
    """
    dtype = check_kv_dtype(kv_dtype)
    if dtype is not None and model.device.type != "cpu":
        raise ConfigError(f"kv_dtype={kv_dtype!r} is for CPU decoding; this model is on {model.device}: drop it or "
                          "load the model with device='cpu'")
    model.get_decoder().cross_kv_dtype = dtype


def quantize_as_loaded(model: nn.Module, mode: str = "int8") -> dict[str, Callable[[Tensor], None]]:
    """Replace every decoder linear and the LM head of ``model`` by an :class:`Int8Linear` still without weights.

    For a model whose weights are about to be read (built on the ``meta`` device, as ``from_pretrained`` does), so
    that each weight is quantized as soon as it is read and the fp32 ones are never all in memory. The biases stay
    under their names, to be loaded as before. Returns, for each replaced weight's name (as it was in
    ``model.state_dict()``, e.g. ``model.decoder.layers.0.fc1.weight``, ``lm_head.weight``), the function that
    quantizes that weight into its layer; every one must be called once before the model runs. The int8 weights and
    scales of all of them share one block of 2 MB pages.

    Raises:
        ConfigError: an unknown ``mode``, or a model already quantized.
    """
    if check_mode(mode) is None:
        raise ConfigError("quantizing needs a mode: 'int8'")
    if quantized(model):
        raise ConfigError("this model is already quantized")
    found = _targets(model)
    arena = None
    if hugepages.supported():
        shapes = [tuple(getattr(parent, attr).weight.shape) for parent, attr in found.values()]
        arena = hugepages.Arena(sum(hugepages.nbytes(s, torch.int8) + hugepages.nbytes(s[:1], torch.float32)
                                    for s in shapes))
    use_native = getattr(model, "use_native", True)
    fills = {}
    for name, (parent, attr) in found.items():
        linear = getattr(parent, attr)
        layer = Int8Linear(torch.empty(linear.weight.shape, dtype=torch.int8, device="meta"),
                           torch.empty(linear.out_features, device="meta"), linear.bias)
        layer.use_native = use_native
        setattr(parent, attr, layer)

        def fill(weight: Tensor, layer: Int8Linear = layer) -> None:
            layer.qweight, layer.scale = quantize_weight(weight, arena)
        fills[name] = fill
    return fills


def quantize_model(model: nn.Module, mode: str = "int8", kv_dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every decoder linear and the LM head of ``model`` by an :class:`Int8Linear`, in place.

    The LM head gets its own int8 copy of the (tied) embedding; the embedding itself stays for the lookups. Each
    fp32 weight replaced is let go as soon as it is quantized. ``kv_dtype``: see :func:`set_kv_dtype`.
    Returns ``model``, in eval mode.

    Raises:
        ConfigError: an unknown ``mode`` or ``kv_dtype``, a model already quantized, or weights not on the CPU (the
            int8 kernels and this module's reference are for CPU decoding).
    """
    check_mode(mode)
    check_kv_dtype(kv_dtype)
    if model.device.type != "cpu":
        raise ConfigError(f"int8 quantization runs on the CPU; this model is on {model.device}: load it with "
                          "device='cpu'")
    weights = {name: getattr(parent, attr).weight for name, (parent, attr) in _targets(model).items()}
    fills = quantize_as_loaded(model, mode)
    with torch.no_grad():
        for name in list(weights):
            fills.pop(name)(weights.pop(name))
    set_kv_dtype(model, kv_dtype)
    return model.eval()


def quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is an :class:`Int8Linear`."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


def check_savable(model: nn.Module) -> None:
    """Refuse to save a quantized model (its int8 weights are not the checkpoint layout others read).

    Raises:
        CheckpointError: naming the way that works: save the unquantized model and quantize at load.
    """
    if quantized(model):
        raise CheckpointError("a model quantized to int8 is not saved (its weights would no longer be a PEGASUS-X "
                              "checkpoint); save the model before quantize_model() and load it with "
                              "quantize='int8', which quantizes in a fraction of the load time")
