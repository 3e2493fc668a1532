"""PEGASUS-X: a block-local/global-token encoder and a pre-LayerNorm decoder.

Module and parameter names equal the Hugging Face checkpoint keys (``model.shared``, ``model.encoder.layers.{i}
.self_attn.q_proj``, ``global_self_attn_layer_norm``, ``encoder_attn``, ``fc1``/``fc2``, ``lm_head``), so loading
is an identity mapping plus the tied-embedding rule (see ``checkpoint.py``).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import native
from .attention import BACKENDS, Attention, GlobalLocalAttention, Packing
from .cache import DecoderCache
from .config import PegasusXConfig, check_fits_in_memory
from .devices import refuse_float16
from .errors import ConfigError, InputError
from .generation_config import GenerationConfig, as_generation_config
from .hub import HUB_KWARGS
from .native.linear import Linear
from .outputs import EncoderOutput, Seq2SeqLMOutput, Seq2SeqOutput, encoder_inputs

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------- helpers
def sinusoidal_positions(start: int, length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Positions ``start … start+length-1`` as ``(length, dim)`` fp32: sin half then cos half (not interleaved).

    Frequency i is exp(-i·ln(10000)/(dim/2 − 1)). Always fp32: in bf16 the angles of late positions are off by
    whole radians (the reference's bf16 is wrong by up to 2.0 here).
    """
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None] * freq
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


_ACTIVATIONS = {
    "relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu, "swish": F.silu, "tanh": torch.tanh,
}
# The same, overwriting their input: without autograd the FFN's intermediate is nobody else's, and writing it in place
# spares allocating (and faulting in) a second (tokens, ffn_dim) tensor per layer (benchmarks/encoder.py).
_ACTIVATIONS_INPLACE = {F.relu: torch.relu_, F.silu: lambda x: F.silu(x, inplace=True), torch.tanh: torch.tanh_}


def shift_tokens_right(labels: Tensor, pad_token_id: int, decoder_start_token_id: int) -> Tensor:
    """Decoder inputs for teacher forcing: ``[start, labels[:-1]]`` with -100 replaced by pad."""
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


def check_ids(name: str, ids: Any, vocab_size: int) -> Tensor:
    """Validate a ``(B, T)`` integer id tensor in ``[0, vocab_size)``; raises :class:`InputError` otherwise."""
    if not isinstance(ids, Tensor):
        raise InputError(f"{name} must be a torch.LongTensor of shape (batch, length), got {type(ids).__name__}; "
                         "use the tokenizer with return_tensors='pt'")
    if ids.device.type == "meta":
        raise InputError(f"{name} is on the meta device (a shape without values); make it with the tokenizer or "
                         "on the model's device")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InputError(f"{name} must hold integer token ids, got dtype {ids.dtype}; convert with .long()")
    if ids.dim() != 2:
        raise InputError(f"{name} must have shape (batch, length), got {tuple(ids.shape)}; add a batch "
                         "dimension with ids[None]" if ids.dim() == 1 else
                         f"{name} must have shape (batch, length), got {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {tuple(ids.shape)}); give at least one sequence of one token")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size}); was it made by "
                         "another tokenizer?")
    return ids.long()


def check_mask(name: str, mask: Any, ids: Tensor) -> Tensor:
    """Validate a 0/1 mask (bool, integer or float) of the shape of ``ids`` with no all-zero row; returns bool."""
    if not isinstance(mask, Tensor):
        raise InputError(f"{name} must be a tensor of shape {tuple(ids.shape)}, got {type(mask).__name__}")
    if mask.shape != ids.shape:
        raise InputError(f"{name} has shape {tuple(mask.shape)} but the ids have shape {tuple(ids.shape)}; "
                         "they must match")
    if mask.device != ids.device:
        raise InputError(f"{name} is on {mask.device} but the ids are on {ids.device}; move both to one device")
    if mask.dtype != torch.bool:
        # Anything but exactly 0 or 1 (NaN, 2, -1, 0.5) is not a mask: a typo or a tensor passed in the wrong place.
        binary = (mask == 0) | (mask == 1)
        if not bool(binary.all()):
            bad = mask[~binary][0].item()
            raise InputError(f"{name} holds {bad}; it must hold only 1 (real token) and 0 (padding)")
    keep = mask.bool() if mask.dtype == torch.bool else mask != 0
    if not bool(keep.any(dim=1).all()):
        raise InputError(f"{name} has a row of all zeros: every sequence needs at least one real token")
    return keep


# ---------------------------------------------------------------------------------------------------- layers
FFN_CHUNK = 4096  # tokens per FFN call at inference: bounds the (T, ffn_dim) intermediate on 16K+ inputs
PACK_BELOW = 0.9  # skip_padding packs the encoder when real tokens are at most this share of the padded positions


def _ffn(layer: nn.Module, x: Tensor) -> Tensor:
    """fc2(dropout(act(fc1(x)))) then dropout — shared by encoder and decoder layers."""
    if not torch.is_grad_enabled() and x.shape[1] > FFN_CHUNK:
        # Without autograd nothing needs the intermediate later: run it a slice of tokens at a time.
        return torch.cat([_ffn(layer, part) for part in x.split(FFN_CHUNK, dim=1)], dim=1)
    h = layer.fc1(x)
    inplace = None if torch.is_grad_enabled() else _ACTIVATIONS_INPLACE.get(layer.activation)
    h = inplace(h) if inplace else layer.activation(h)
    h = F.dropout(h, layer.activation_dropout, layer.training)
    return F.dropout(layer.fc2(h), layer.dropout, layer.training)


class PegasusXEncoderLayer(nn.Module):
    """Pre-LN layer over two streams: tokens (block-local attention) and globals (attend to everything)."""

    def __init__(self, config: PegasusXConfig, stagger: bool):
        super().__init__()
        d = config.d_model
        self.stagger = stagger
        self.self_attn = GlobalLocalAttention(d, config.encoder_attention_heads, config.block_size,
                                              config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.global_self_attn_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.fc1 = Linear(d, config.encoder_ffn_dim)
        self.fc2 = Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.activation = _ACTIVATIONS[config.activation_function]
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout

    def forward(self, x: Tensor, g: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """x ``(B, P, D)`` (P a block multiple), g ``(B, G, D)``, keep ``(B, P)`` → updated (x, g)."""
        a, ag = self.self_attn(self.self_attn_layer_norm(x), self.global_self_attn_layer_norm(g), keep, self.stagger)
        x = x + F.dropout(a, self.dropout, self.training)
        g = g + F.dropout(ag, self.dropout, self.training)
        # One final LayerNorm and FFN serve both streams.
        x = x + _ffn(self, self.final_layer_norm(x))
        g = g + _ffn(self, self.final_layer_norm(g))
        return x, g

    def forward_packed(self, s: Tensor, packing: Packing) -> Tensor:
        """The layer over the real tokens only (inference; see :class:`~pegasus_x.attention.Packing`): ``s``
        ``(B·G + N, D)`` holds the B·G global states, then the N real tokens' states → updated ``s``."""
        BG = packing.globals
        h = torch.cat([self.global_self_attn_layer_norm(s[:BG]), self.self_attn_layer_norm(s[BG:])])
        s = s + self.self_attn.forward_packed(h, packing, self.stagger)
        # One final LayerNorm and FFN serve both streams, as in forward().
        return s + _ffn(self, self.final_layer_norm(s)[None])[0]


class PegasusXDecoderLayer(nn.Module):
    """Pre-LN: causal self-attention, cross-attention to the encoder tokens, FFN."""

    def __init__(self, config: PegasusXConfig):
        super().__init__()
        d, heads = config.d_model, config.decoder_attention_heads
        self.self_attn = Attention(d, heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.encoder_attn = Attention(d, heads, config.attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.fc1 = Linear(d, config.decoder_ffn_dim)
        self.fc2 = Linear(config.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.activation = _ACTIVATIONS[config.activation_function]
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout

    def forward(self, x: Tensor, self_keep: Tensor | None, encoder_states: Tensor | None,
                cross_keep: Tensor | None, cache: DecoderCache | None, index: int) -> Tensor:
        """x ``(R, T, D)`` → ``(R, T, D)``; this is layer ``index`` of the decoder.

        The cross-attention keys/values come from ``cache`` when there is one (generation: projected once per input
        and shared by its beams), else they are projected here from ``encoder_states`` ``(B, S, D)``. Inside the
        layer, gradient checkpointing recomputes them in the backward pass instead of keeping every layer's.
        """
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.project_kv(h)
        if cache is not None:
            k, v = cache.update(index, k, v)
            cross_k, cross_v, k_scale, v_scale = cache.cross(index)
        else:
            (cross_k, cross_v), k_scale, v_scale = self.encoder_attn.project_kv(encoder_states), None, None
        x = x + F.dropout(self.self_attn(h, k, v, self_keep), self.dropout, self.training)
        h = self.encoder_attn_layer_norm(x)
        x = x + F.dropout(self.encoder_attn(h, cross_k, cross_v, cross_keep, k_scale, v_scale), self.dropout,
                          self.training)
        return x + _ffn(self, self.final_layer_norm(x))


# ---------------------------------------------------------------------------------------------------- stacks
class PegasusXEncoder(nn.Module):
    """Token embedding (shared) + sinusoidal positions + global tokens → layers → final LayerNorm on tokens."""

    def __init__(self, config: PegasusXConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens     # the shared embedding; appears in state_dict as an alias, like the reference
        self.embed_global = _embedding(config.num_global_tokens, config.d_model)
        self.layers = nn.ModuleList(
            PegasusXEncoderLayer(config, stagger=config.stagger_local_blocks and i % 2 == 1)
            for i in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self._warned_length = False

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                skip_padding: bool = False) -> EncoderOutput:
        """transformers' call: ``enc(input_ids=..., attention_mask=...)`` → :class:`EncoderOutput`.

        Args:
            input_ids: ``(B, T)`` any T ≥ 1, right padded.
            attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding (None: all real).
            skip_padding: see :meth:`states`.
        Raises:
            ConfigError: float16 weights.
            InputError: malformed ids or mask, or ids on another device.
        """
        refuse_float16(self.embed_tokens.weight.dtype)
        input_ids = check_ids("input_ids", input_ids, self.config.vocab_size)
        device = self.embed_tokens.weight.device
        if input_ids.device != device:
            raise InputError(f"input_ids are on {input_ids.device} but the model is on {device}; "
                             "move them with .to(model.device)")
        keep = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else check_mask("attention_mask", attention_mask, input_ids))
        return EncoderOutput(self.states(input_ids, keep, skip_padding), keep)

    def states(self, input_ids: Tensor, keep: Tensor, skip_padding: bool = False) -> Tensor:
        """Unchecked inputs: input_ids ``(B, T)``, keep ``(B, T)`` bool → token states ``(B, T, D)``.

        ``skip_padding``: the states at padding are zero (not the reference's values, which nothing reads when the
        mask is applied downstream), and without autograd the fast path (:class:`Packing`) computes the real
        tokens only; the reference path computes all, then zeroes padding (``native.enabled`` chooses).
        """
        cfg = self.config
        B, T = input_ids.shape
        if T > cfg.max_position_embeddings and not self._warned_length:
            warnings.warn(f"input of {T} tokens is longer than max_position_embeddings="
                          f"{cfg.max_position_embeddings}; sinusoidal positions extrapolate, quality may drop",
                          stacklevel=3)
            self._warned_length = True
        x = _embed(self.embed_tokens, input_ids, cfg, sinusoidal_positions(0, input_ids.shape[1], cfg.d_model,
                                                                            input_ids.device))
        x = F.dropout(x, cfg.dropout, self.training)
        K = cfg.block_size
        pad = -T % K                                       # pad once, on the right, to a block multiple
        # The packed layers' gathers cost a few percent of a layer, which a little padding does not repay
        # (benchmarks/RESULTS.md, encoding the real tokens only).
        if (skip_padding and int(keep.sum()) <= PACK_BELOW * B * (T + pad) and not torch.is_grad_enabled()
                and not self.training and native.enabled(self)):
            return self._packed_states(x, keep)
        x = F.pad(x, (0, 0, 0, pad))
        keep = F.pad(keep, (0, pad), value=False)
        g = self.embed_global.weight[None].expand(B, -1, -1).to(x.dtype)
        for layer in self.layers:
            if self.training and cfg.encoder_layerdrop > 0 and torch.rand(()) < cfg.encoder_layerdrop:
                continue
            if self.gradient_checkpointing and self.training:
                x, g = checkpoint(layer, x, g, keep, use_reentrant=False)
            else:
                x, g = layer(x, g, keep)
        x = self.layer_norm(x[:, :T])
        return x.masked_fill(~keep[:, :T, None], 0.0) if skip_padding else x

    def _packed_states(self, x: Tensor, keep: Tensor) -> Tensor:
        """:meth:`states` over the real tokens only: x ``(B, T, D)`` embedded, keep ``(B, T)``."""
        B, T, D = x.shape
        K, G = self.config.block_size, self.config.num_global_tokens
        packing = Packing(F.pad(keep, (0, -T % K), value=False), G, K)
        s = torch.cat([self.embed_global.weight.to(x.dtype).repeat(B, 1), x[keep]])    # (B·G + N, D)
        for layer in self.layers:
            s = layer.forward_packed(s, packing)
        return x.new_zeros(B, T, D).index_put_((keep,), self.layer_norm(s[B * G:]))


class PegasusXDecoder(nn.Module):
    """Shared embedding + positions → pre-LN layers → final LayerNorm."""

    def __init__(self, config: PegasusXConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(PegasusXDecoderLayer(config) for _ in range(config.decoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, input_ids: Tensor, encoder_states: Tensor | None, encoder_keep: Tensor | None,
                keep: Tensor | None = None, cache: DecoderCache | None = None) -> Tensor:
        """Decode.

        Args:
            input_ids: ``(R, T)`` decoder tokens (R = rows; with a cache, the new tokens only).
            encoder_states: ``(B, S, D)``; each layer projects its cross-attention keys/values from it. Unused
                with a cache, which holds them.
            encoder_keep: ``(B, S)`` bool; unused with a cache.
            keep: ``(R, T)`` bool decoder padding mask (training only), or None.
            cache: incremental-decoding cache; positions continue from ``cache.length``.
        Returns:
            ``(R, T, D)`` final decoder states.
        """
        cfg = self.config
        R, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if cache is not None:
            cache.reserve(T)               # grows the buffers when this step would pass their end
            if cache.positions is None:    # once per buffer size: a step then only slices it, no sin/cos
                cache.positions = sinusoidal_positions(0, cache.max_len, cfg.d_model, input_ids.device)
            positions = cache.positions[start:start + T]
        else:
            positions = sinusoidal_positions(0, T, cfg.d_model, input_ids.device)
        x = F.dropout(_embed(self.embed_tokens, input_ids, cfg, positions), cfg.dropout, self.training)
        # Self-attention mask: query i (absolute start+i) sees keys j <= start+i.
        self_keep = None
        if T > 1 or keep is not None:
            j = torch.arange(start + T, device=x.device)
            self_keep = (j[None, :] <= j[start:, None])[None, None]                    # (1, 1, T, start+T)
            if keep is not None:
                self_keep = self_keep & keep[:, None, None, :]
        cross_keep = cache.encoder_keep if cache is not None else encoder_keep[:, None, None, :]
        plan = None
        if (cache is not None and keep is None and not self.training and not torch.is_grad_enabled()
                and x.device.type == "cpu" and native.available(self)):
            # A decode step (or lookahead's pass over a draft) on the CPU: every layer in native code, each weight
            # streamed once (native/). The plan is made at the cache's first step (False: these layers or this
            # cache do not fit the kernels).
            if cache.native_plan is None:
                cache.native_plan = native.decoder_plan(self, cache, x) or False
            plan = cache.native_plan or None
            if plan is not None and T > 1 and not native.decoder_rows_fit(plan, x):
                plan = None
        if plan is not None:
            x = native.decoder_step(plan, x, cache) if T == 1 else native.decoder_rows(plan, x, cache)
        else:
            for i, layer in enumerate(self.layers):
                if self.training and cfg.decoder_layerdrop > 0 and torch.rand(()) < cfg.decoder_layerdrop:
                    continue
                args = (x, self_keep, encoder_states, cross_keep, cache, i)
                if self.gradient_checkpointing and self.training and cache is None:
                    x = checkpoint(layer, *args, use_reentrant=False)
                else:
                    x = layer(*args)
        if cache is not None:
            cache.length += T
        return self.layer_norm(x)


def _embedding(rows: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    """An uninitialised embedding (``init_weights`` or the checkpoint fills it).

    Passing ``_weight`` skips nn.Embedding's own random init: on the ``meta`` device that init alone costs ~1.3 s
    per process (it imports torch._dynamo), which every ``from_pretrained`` would pay.
    """
    return nn.Embedding(rows, dim, padding_idx=padding_idx, _weight=torch.empty(rows, dim))


def _embed(table: nn.Embedding, ids: Tensor, cfg: PegasusXConfig, positions: Tensor) -> Tensor:
    """Token embeddings (scaled) plus the fp32 sinusoidal ``positions`` ``(T, D)``, in the table's dtype."""
    x = table(ids)
    if cfg.scale_embedding:
        x = x * math.sqrt(cfg.d_model)
    return x + positions.to(x.dtype)


# ---------------------------------------------------------------------------------------------------- models
class PegasusXPreTrainedModel(nn.Module):
    """What both public models share: checkpoint I/O, init, gradient checkpointing, the attention switch.

    Building a model first checks that its parameters and largest run-time tensor fit this machine's memory
    (:func:`pegasus_x.config.check_fits_in_memory`; a ``ConfigError`` saying how much it needs otherwise).
    """

    def __init__(self, config: PegasusXConfig):
        super().__init__()
        if not isinstance(config, PegasusXConfig):
            raise ConfigError(f"expected a PegasusXConfig, got {type(config).__name__}")
        if torch.get_default_device().type != "meta":   # a meta build allocates nothing; its loader checks
            check_fits_in_memory(config, torch.get_default_dtype().itemsize)
        self.config = config
        # Like transformers: the model config's generation options until a checkpoint's own replace them.
        self.generation_config = GenerationConfig.from_model_config(config)

    @property
    def generation_config(self) -> GenerationConfig:
        """Default generation options (see :mod:`pegasus_x.generation_config`); a dict assigned here is
        converted."""
        return self._generation_config

    @generation_config.setter
    def generation_config(self, value: GenerationConfig | dict[str, Any] | None) -> None:
        self._generation_config = as_generation_config(value)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, strict: bool = False,
                        torch_dtype: torch.dtype | str | None = None, quantize: str | None = None,
                        kv_dtype: torch.dtype | str | None = None, **hub_kwargs: Any):
        """Load a checkpoint folder (or hub id) in the Hugging Face layout.

        Args:
            path: folder with ``config.json`` and ``model.safetensors`` / a sharded index / ``pytorch_model.bin``,
                or a hub id such as ``google/pegasus-x-base`` (needs ``huggingface_hub`` and network).
            dtype: ``torch.float32`` / ``torch.bfloat16`` (or "fp32"/"bf16"); default ("auto" too): as stored,
                fp16 → fp32.
            device: where the weights go (default CPU).
            strict: turn the warning about NaN/inf weights into an error.
            torch_dtype: transformers' older name for ``dtype``.
            quantize: ``"int8"``: int8 weights for the decoder and the LM head (:mod:`pegasus_x.quantize`; CPU
                only), each quantized as it is read.
            kv_dtype: ``"bf16"`` or ``"int8"``: keep generation's cross-attention keys/values narrower
                (:func:`pegasus_x.quantize.set_kv_dtype`; CPU only).
            **hub_kwargs: for a hub id: ``revision``, ``cache_dir``, ``local_files_only``, ``token``,
                ``force_download``.
        Raises:
            CheckpointError: files missing/unsafe, or keys/shapes not matching the config (all named at once).
            ConfigError: an argument this method does not take, an unknown ``quantize`` or ``kv_dtype`` (or either
                off the CPU), ``dtype`` and ``torch_dtype`` disagreeing, or a dtype other than fp32 / bf16.
            InputError: a device that is unknown or not available here, or a path that is not a str / PathLike.
        """
        from .checkpoint import load_pretrained
        from .quantize import check_mode

        check_mode(quantize)
        unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
        if unknown:
            raise ConfigError(f"from_pretrained() got unsupported argument(s) {unknown}; it takes dtype, device, "
                              f"strict and, for a hub id, {', '.join(HUB_KWARGS)}")
        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ConfigError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass only dtype")
        dtype = dtype if dtype is not None else torch_dtype
        return load_pretrained(cls, path, dtype=None if dtype == "auto" else dtype, device=device, strict=strict,
                               quantize=quantize, kv_dtype=kv_dtype, **hub_kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json``, ``model.safetensors`` (and ``generation_config.json``) atomically.

        Raises:
            CheckpointError: also for a quantized model (:func:`pegasus_x.quantize.check_savable`).
        """
        from .checkpoint import save_pretrained
        from .quantize import check_savable

        check_savable(self)
        save_pretrained(self, directory)

    def init_weights(self) -> None:
        """Reference initialisation: N(0, init_std) for linear and embedding weights, zero biases, pad row zero."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer's activations in the backward pass (memory ∝ layers, not layers × length)."""
        for module in self.modules():
            if isinstance(module, (PegasusXEncoder, PegasusXDecoder)):
                module.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, (PegasusXEncoder, PegasusXDecoder)):
                module.gradient_checkpointing = False

    def set_attention_backend(self, backend: str) -> None:
        """``"sdpa"`` (fused kernels, default) or ``"eager"`` (explicit softmax; the readable reference)."""
        if backend not in BACKENDS:
            raise ConfigError(f"attention backend {backend!r} is unknown; use one of {BACKENDS}")
        for module in self.modules():
            if isinstance(module, (Attention, GlobalLocalAttention)):
                module.backend = backend

    def set_native(self, on: bool) -> None:
        """Fast paths on (default) or off: off, every layer runs its torch reference path (``pegasus_x.native``)."""
        native.set_enabled(self, on)

    def num_parameters(self) -> int:
        """Parameter count with the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return self.shared_embedding().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.shared_embedding().weight.device

    def _encoder_inputs(self, input_ids: Tensor | None, attention_mask: Tensor | None,
                        encoder_outputs: Any) -> tuple[Tensor, Tensor]:
        """(encoder states, keep mask): run the encoder, or take precomputed ``encoder_outputs``."""
        if encoder_outputs is None:
            enc = self.encode(input_ids, attention_mask)
            return enc.last_hidden_state, enc.attention_mask
        return encoder_inputs(encoder_outputs, attention_mask)

    def _decoder_inputs(self, decoder_input_ids: Tensor | None, labels: Tensor | None,
                        decoder_attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        cfg = self.config
        if decoder_input_ids is None:
            if labels is None:
                raise InputError("give decoder_input_ids or labels (decoder inputs are made by shifting labels)")
            decoder_input_ids = shift_tokens_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id)
        decoder_input_ids = check_ids("decoder_input_ids", decoder_input_ids, cfg.vocab_size)
        keep = None
        if decoder_attention_mask is not None:
            keep = check_mask("decoder_attention_mask", decoder_attention_mask, decoder_input_ids)
            if not bool(keep[:, 0].all()):
                raise InputError("decoder_attention_mask masks the first decoder position (the start token); "
                                 "keep it 1 — a masked start leaves nothing to attend to")
        return decoder_input_ids, keep


class PegasusXModel(PegasusXPreTrainedModel):
    """Encoder + decoder without the LM head; keys are the reference's without the ``model.`` prefix."""

    def __init__(self, config: PegasusXConfig, init: bool = True):
        super().__init__(config)
        self.shared = _embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = PegasusXEncoder(config, self.shared)
        self.decoder = PegasusXDecoder(config, self.shared)
        if init:
            self.init_weights()

    def shared_embedding(self) -> nn.Embedding:
        return self.shared

    def get_encoder(self) -> PegasusXEncoder:
        return self.encoder

    def get_decoder(self) -> PegasusXDecoder:
        return self.decoder

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
               skip_padding: bool = False) -> EncoderOutput:
        """Run the encoder. ``input_ids`` ``(B, T)`` any T ≥ 1, right-padded with ``attention_mask``.

        ``skip_padding``: zero states at padding instead of the reference's, computed faster (for generation,
        where the mask hides them; see :meth:`PegasusXEncoder.states`).
        """
        return self.encoder(input_ids, attention_mask, skip_padding=skip_padding)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                encoder_outputs: Any = None) -> Seq2SeqOutput:
        """Encoder-decoder forward pass.

        Args:
            input_ids: ``(B, T)`` source ids (right padded); not needed when ``encoder_outputs`` is given.
            attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding.
            decoder_input_ids: ``(B, T_dec)``, starting with decoder_start_token_id.
            decoder_attention_mask: ``(B, T_dec)``; its first column must be 1.
            encoder_outputs: precomputed encoder outputs (an :class:`EncoderOutput`, anything with
                ``last_hidden_state``, or a tuple starting with the states); ``attention_mask`` defaults to theirs.
        Returns:
            :class:`Seq2SeqOutput`.
        Raises:
            InputError: malformed ids or masks.
        """
        states, keep = self._encoder_inputs(input_ids, attention_mask, encoder_outputs)
        dec_ids, dec_keep = self._decoder_inputs(decoder_input_ids, None, decoder_attention_mask)
        h = self.decoder(dec_ids, states, keep, dec_keep)
        return Seq2SeqOutput(h, states)


class PegasusXForConditionalGeneration(PegasusXPreTrainedModel):
    """PEGASUS-X with the tied LM head: logits, loss and :meth:`generate`."""

    def __init__(self, config: PegasusXConfig, init: bool = True):
        super().__init__(config)
        self.model = PegasusXModel(config, init=False)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.shared.weight
        if init:
            self.init_weights()

    def shared_embedding(self) -> nn.Embedding:
        return self.model.shared

    def get_encoder(self) -> PegasusXEncoder:
        return self.model.encoder

    def get_decoder(self) -> PegasusXDecoder:
        return self.model.decoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.shared

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def resize_token_embeddings(self, new_num_tokens: int, pad_to_multiple_of: int | None = None) -> nn.Embedding:
        """Give the vocabulary ``new_num_tokens`` rows (rounded up to ``pad_to_multiple_of``), e.g. after adding
        tokens to the tokenizer; updates ``config.vocab_size`` and returns the new embedding.

        Kept rows are copied; new rows (and an untied LM head's) start as the mean of the old rows, so new tokens
        begin close to the average token instead of at a random scale.

        Raises:
            ConfigError: a size that is not a positive integer, or one that drops a special token's row.
        """
        for name, value in (("new_num_tokens", new_num_tokens), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if pad_to_multiple_of:
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        cfg = self.config
        needed = 1 + max(cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id)
        if new_num_tokens < needed:
            raise ConfigError(f"new_num_tokens={new_num_tokens} would drop special token ids (up to {needed - 1}); "
                              f"keep at least {needed} rows")
        old = self.model.shared
        shared = _resized(old.weight, new_num_tokens)
        table = nn.Embedding(new_num_tokens, old.embedding_dim, padding_idx=old.padding_idx, _weight=shared)
        self.model.shared = self.model.encoder.embed_tokens = self.model.decoder.embed_tokens = table
        if cfg.tie_word_embeddings:
            self.lm_head.weight = table.weight
        else:
            self.lm_head.weight = nn.Parameter(_resized(self.lm_head.weight, new_num_tokens))
        self.lm_head.out_features = new_num_tokens
        cfg.vocab_size = new_num_tokens
        return table

    def tie_weights(self) -> None:
        """Point ``lm_head`` at the shared embedding again (after ``load_state_dict(assign=True)``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.shared.weight

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
               skip_padding: bool = False) -> EncoderOutput:
        """Run the encoder. ``input_ids`` ``(B, T)`` any T ≥ 1, right-padded with ``attention_mask``.

        ``skip_padding``: zero states at padding instead of the reference's, computed faster (for generation,
        where the mask hides them; see :meth:`PegasusXEncoder.states`).
        """
        return self.model.encoder(input_ids, attention_mask, skip_padding=skip_padding)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                labels: Tensor | None = None, encoder_outputs: Any = None) -> Seq2SeqLMOutput:
        """Logits (and loss with ``labels``).

        Args:
            input_ids, attention_mask: ``(B, T)`` source, right padded.
            decoder_input_ids: ``(B, T_dec)``; made from ``labels`` by shifting right when omitted.
            decoder_attention_mask: ``(B, T_dec)``; its first column must be 1.
            labels: ``(B, T_dec)`` target ids, -100 where ignored.
            encoder_outputs: precomputed encoder outputs (an :class:`EncoderOutput`, anything with
                ``last_hidden_state``, or a tuple starting with the states); ``attention_mask`` defaults to theirs.
        Returns:
            :class:`Seq2SeqLMOutput` with ``logits (B, T_dec, V)``.
        Raises:
            InputError: malformed ids, masks or labels.
        """
        states, keep = self._encoder_inputs(input_ids, attention_mask, encoder_outputs)
        if labels is not None:
            labels = _check_labels(labels, self.config.vocab_size)
        dec_ids, dec_keep = self._decoder_inputs(decoder_input_ids, labels, decoder_attention_mask)
        h = self.model.decoder(dec_ids, states, keep, dec_keep)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            if labels.shape != dec_ids.shape:
                raise InputError(f"labels have shape {tuple(labels.shape)} but decoder inputs have "
                                 f"{tuple(dec_ids.shape)}; they must match")
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                                   ignore_index=IGNORE_INDEX)
        return Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=states)

    def generate(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **options: Any):
        """Summarize: see :func:`pegasus_x.generate.generate` for the options (``encoder_outputs=`` and
        ``generation_config=`` included)."""
        from .generate import generate

        return generate(self, input_ids, attention_mask, **options)


def _resized(weight: Tensor, rows: int) -> Tensor:
    """``weight`` with ``rows`` rows: the first ones copied, new ones the mean of the old (same dtype/device)."""
    with torch.no_grad():
        out = weight.new_empty(rows, weight.shape[1])
        kept = min(rows, weight.shape[0])
        out[:kept] = weight[:kept]
        out[kept:] = weight.float().mean(0).to(weight.dtype)
    return out


def _check_labels(labels: Any, vocab_size: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dim() != 2:
        raise InputError(f"labels must be an integer tensor of shape (batch, length), {IGNORE_INDEX} where "
                         "ignored")
    real = labels[labels != IGNORE_INDEX]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
        raise InputError(f"labels hold ids outside [0, {vocab_size}) other than {IGNORE_INDEX} (the ignore index)")
    return labels.long()
