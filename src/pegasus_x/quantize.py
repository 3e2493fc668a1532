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

A quantized model is not saved: :func:`check_savable` refuses with the reason. Quantizing at load is a fraction of
the load itself (``benchmarks/int8_accuracy.py`` prints the time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .errors import CheckpointError, ConfigError
from .native import hugepages, kernels

MODES = ("int8",)
QMAX = 127              # symmetric: -127..127, so -W quantizes to -Q


def check_mode(quantize: str | None) -> str | None:
    """``quantize`` as given (None or one of :data:`MODES`).

    Raises:
        ConfigError: any other value.
    """
    if quantize is not None and quantize not in MODES:
        raise ConfigError(f"quantize={quantize!r} is not supported; use one of {list(MODES)} or None")
    return quantize


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(Q int8 (out, in), scale fp32 (out,))``, ``Q · scale[:, None] ≈ weight``; an all-zero row gets scale 1."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


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

    @classmethod
    def from_linear(cls, linear: nn.Linear, arena: hugepages.Arena | None = None) -> Int8Linear:
        """Quantize ``linear``'s weight (per output row); the bias is copied. ``arena``: where the int8 weight and
        its scales go (2 MB pages, which decode steps stream faster), else ordinary memory."""
        q, scale = quantize_weight(linear.weight)
        if arena is not None:
            q, scale = arena.empty(q.shape, q.dtype).copy_(q), arena.empty(scale.shape, scale.dtype).copy_(scale)
        return cls(q, scale, linear.bias)

    def dequantize(self) -> Tensor:
        """The fp32 weight these int8 values and scales stand for, ``(out, in)``."""
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(..., in)`` → ``(..., out)`` in ``x``'s dtype, computed in fp32."""
        if (not torch.is_grad_enabled() and native.available(self)
                and kernels.linear_int8_fits(x, self.qweight, self.scale, self.bias)):
            return kernels.linear_int8(x, self.qweight, self.scale, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.dequantize(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _decoder_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every linear layer of the decoder, then of the LM head."""
    decoder = model.get_decoder()
    found = [(parent, name) for parent in decoder.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear)]
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        found.append((model, "lm_head"))
    return found


def quantize_model(model: nn.Module, mode: str = "int8", kv_dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every decoder linear and the LM head of ``model`` by an :class:`Int8Linear`, in place.

    The LM head gets its own int8 copy of the (tied) embedding; the embedding itself stays for the lookups.
    ``kv_dtype``: ``torch.bfloat16`` / ``"bf16"`` keeps the cross-attention keys/values of generation in bf16 (every
    decode step reads them: at long inputs they outweigh the int8 weights); None: the model's dtype.
    Returns ``model``, in eval mode.

    Raises:
        ConfigError: an unknown ``mode`` or ``kv_dtype``, a model already quantized, or weights not on the CPU (the
            int8 kernels and this module's reference are for CPU decoding).
    """
    check_mode(mode)
    if kv_dtype not in (None, torch.bfloat16, "bf16"):
        raise ConfigError(f"kv_dtype={kv_dtype!r} is not supported; use 'bf16' or None (the model's dtype)")
    if mode is None:
        raise ConfigError("quantize_model needs a mode: 'int8'")
    if quantized(model):
        raise ConfigError("this model is already quantized")
    if model.device.type != "cpu":
        raise ConfigError(f"int8 quantization runs on the CPU; this model is on {model.device}: load it with "
                          "device='cpu'")
    use_native = getattr(model, "use_native", True)
    linears = _decoder_linears(model)
    arena = None
    if hugepages.supported():
        shapes = [getattr(parent, name).weight.shape for parent, name in linears]
        arena = hugepages.Arena(sum(hugepages.nbytes(tuple(s), torch.int8) + hugepages.nbytes((s[0],), torch.float32)
                                    for s in shapes))
    with torch.no_grad():
        for parent, name in linears:
            layer = Int8Linear.from_linear(getattr(parent, name), arena)
            layer.use_native = use_native
            setattr(parent, name, layer)
    model.get_decoder().cross_kv_dtype = None if kv_dtype is None else torch.bfloat16
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
