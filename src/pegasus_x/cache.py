"""The decoder's key/value cache for incremental decoding.

Self-attention keys/values live in buffers preallocated for the maximum length (no reallocation per step; beam
reordering is an in-place ``index_select`` copy). Cross-attention keys/values are computed once per *input*
(not per beam) from the encoder states and never reordered: every beam of an input reads the same encoder keys.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .native import hugepages


@dataclass
class DecoderCache:
    """Per-layer caches. ``R`` decoder rows (inputs × beams), ``B`` inputs, ``H`` heads, ``S`` encoder length."""

    self_k: list[Tensor]        # each (R, H, max_len, hd)
    self_v: list[Tensor]
    cross_k: list[Tensor]       # each (B, H, S, hd)
    cross_v: list[Tensor]
    encoder_keep: Tensor | None  # (B, 1, 1, S) bool, False at padded encoder positions; None: no padding
    length: int = 0             # tokens already written
    positions: Tensor | None = None  # fp32 sinusoidal positions 0 … max_len-1, made by the decoder's first step
    # native.decoder_plan's pointers into these buffers (made at the first native step; False: not native).
    # Anything that replaces a buffer must reset it to None.
    native_plan: Any = None

    @property
    def max_len(self) -> int:
        return self.self_k[0].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new keys/values ``(R, H, T, hd)`` at ``length`` and return views over everything so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"decoder cache holds {self.max_len} positions, {end} requested")
        self.self_k[layer][:, :, self.length:end] = k
        self.self_v[layer][:, :, self.length:end] = v
        return self.self_k[layer][:, :, :end], self.self_v[layer][:, :, :end]

    def reorder(self, rows: Tensor) -> None:
        """Keep decoder rows ``rows`` (beam search): row i of the new cache is old row ``rows[i]``.

        Only the filled part is copied; the cross-attention cache is untouched by design. On the CPU only the rows
        that take another row's place are copied (most beams usually extend their own hypothesis); on an
        accelerator finding them would stall the queue, so every row is.
        """
        n = self.length
        dst: Tensor | slice = slice(None)
        if rows.device.type == "cpu":
            dst = (rows != torch.arange(rows.numel())).nonzero().squeeze(1)
            if dst.numel() == 0:
                return
            rows = rows[dst]
        for buf in (*self.self_k, *self.self_v):
            buf[dst, :, :n] = buf[rows, :, :n]              # the right side is a copy: overlaps are safe

    def keep_inputs(self, inputs: Tensor) -> None:
        """Keep only inputs ``inputs`` (sorted indices into the B inputs) and their decoder rows.

        Generation calls this when inputs finish, so their rows stop costing compute and memory. The new self-attention
        buffers keep the full ``max_len``; only the filled part is copied.
        """
        group = self.self_k[0].shape[0] // self.cross_k[0].shape[0]
        rows = (inputs[:, None] * group + torch.arange(group, device=inputs.device)).flatten()
        n = self.length

        def take(buf: Tensor) -> Tensor:
            kept = buf.new_empty((rows.numel(), *buf.shape[1:]))
            kept[:, :, :n] = buf[:, :, :n].index_select(0, rows)
            return kept

        self.native_plan = None
        self.self_k = [take(buf) for buf in self.self_k]
        self.self_v = [take(buf) for buf in self.self_v]
        self.cross_k = [k.index_select(0, inputs) for k in self.cross_k]
        self.cross_v = [v.index_select(0, inputs) for v in self.cross_v]
        if self.encoder_keep is not None:
            self.encoder_keep = self.encoder_keep.index_select(0, inputs)


def new_cache(model, encoder_states: Tensor, encoder_keep: Tensor, rows: int, max_len: int) -> DecoderCache:
    """Allocate a cache for ``rows`` decoder rows and fill the cross-attention part from the encoder output.

    Args:
        model: a :class:`~pegasus_x.model.PegasusXForConditionalGeneration` (or base model).
        encoder_states: ``(B, S, D)`` encoder output.
        encoder_keep: ``(B, S)`` bool mask of real encoder tokens.
        rows: decoder rows (a multiple of B: the beams of input i are rows i·rows/B …).
        max_len: the most decoder positions that will be written.
    """
    decoder = model.get_decoder()
    layers = decoder.layers
    attn = layers[0].self_attn
    shape = (rows, attn.num_heads, max_len, attn.head_dim)
    dtype, device = encoder_states.dtype, encoder_states.device
    B, S, D = encoder_states.shape
    empty = functools.partial(torch.empty, dtype=dtype, device=device)
    if device.type == "cpu" and hugepages.supported():
        # Every decode step streams these buffers, as it does the weights: 2 MB pages (hugepages.py).
        per_layer = hugepages.nbytes(shape, dtype) + hugepages.nbytes((B, S, D), dtype)
        arena = hugepages.Arena(2 * len(layers) * per_layer)
        empty = functools.partial(arena.empty, dtype=dtype)
    cross_k, cross_v = [], []
    for layer in layers:
        # Copied layer by layer: projecting every layer first and copying after would hold the cross keys/values
        # twice at once (+1.2 GB at 16K tokens, base, fp32).
        k, v = layer.encoder_attn.project_kv(encoder_states)
        cross_k.append(empty(tuple(k.shape)).copy_(k))
        cross_v.append(empty(tuple(v.shape)).copy_(v))
    return DecoderCache(
        self_k=[empty(shape) for _ in layers],
        self_v=[empty(shape) for _ in layers],
        cross_k=cross_k,
        cross_v=cross_v,
        # Without padding the cross-attention needs no mask, and the kernels run faster without one.
        encoder_keep=None if bool(encoder_keep.all()) else encoder_keep[:, None, None, :],
    )
