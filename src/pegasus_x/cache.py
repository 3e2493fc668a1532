"""The decoder's key/value cache for incremental decoding.

Self-attention keys/values live in buffers that hold the positions written so far plus room to grow: they start at
:data:`FIRST_CHUNK` positions (or the whole limit when it is smaller) and double when a step would pass their end,
up to the limit, so memory follows the real output rather than ``max_new_tokens``. Between growths a step writes in
place (beam reordering copies the moved rows in place). Cross-attention keys/values are computed once per
*input* (not per beam) from the encoder states and never reordered: every beam of an input reads the same encoder
keys.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .native import hugepages
from .quantize import quantize_rows

FIRST_CHUNK = 256   # positions a growing buffer starts with: most summaries never need a second allocation
PROJECT_ELEMENTS = 1 << 18   # cross keys/values are projected this many elements (B x positions x d_model) at a time
# A cache smaller than this takes ordinary pages: glibc hands such blocks back from memory the last call freed, with no
# page to fault in, where a fresh 2 MB-page mapping faults in (and zeroes) every page on every call. glibc's mmap
# threshold tops out at 32 MB: past it both map fresh memory, and 2 MB pages fault 512 times less often.
HUGE_PAGES_FROM = 32 << 20


def next_capacity(needed: int, have: int, limit: int) -> int:
    """The size a growing buffer of ``have`` positions takes to hold ``needed`` (≤ ``limit``): at least double, so
    the copies cost O(1) per position overall, and never past ``limit``."""
    return min(limit, max(needed, 2 * have))


def _allocator(device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, ...]]) -> Callable[..., Tensor]:
    """``empty(shape)`` for tensors of these shapes: from one huge-page arena on a Linux CPU when they take at least
    :data:`HUGE_PAGES_FROM` bytes, else ``torch.empty``.

    Every decode step streams the cache as it does the weights, so large CPU caches take 2 MB pages (hugepages.py).
    """
    size = sum(hugepages.nbytes(shape, dtype) for shape in shapes)
    if device.type == "cpu" and hugepages.supported() and size >= HUGE_PAGES_FROM:
        arena = hugepages.Arena(size)
        return functools.partial(arena.empty, dtype=dtype)
    return functools.partial(torch.empty, dtype=dtype, device=device)


def _self_buffers(like: Tensor, shape: tuple[int, ...], count: int) -> Tensor:
    """``count`` empty self-attention buffers of ``shape`` as one tensor ``(count, *shape)``, with ``like``'s dtype
    and device.

    An arena of their own: the old buffers' pages are freed once they are replaced (the cross-attention part
    keeps its own arena alive).
    """
    return _allocator(like.device, like.dtype, [(count, *shape)])((count, *shape))


@dataclass
class DecoderCache:
    """Per-layer caches. ``R`` decoder rows (inputs × beams), ``B`` inputs, ``H`` heads, ``S`` encoder length.

    ``self_k``/``self_v`` are each layer's view of ``keys``/``values``, so that moving rows (beam search) is one
    copy for all layers.
    """

    keys: Tensor                # (layers, R, H, max_len, hd) self-attention keys; max_len grows up to `limit`
    values: Tensor
    cross_k: list[Tensor]       # each (B, H, S, hd)
    cross_v: list[Tensor]
    encoder_keep: Tensor | None  # (B, 1, 1, S) bool, False at padded encoder positions; None: no padding
    limit: int                  # the most positions that may be written
    length: int = 0             # tokens already written
    positions: Tensor | None = None  # fp32 sinusoidal positions 0 … max_len-1, made by the decoder's first step
    # native.decoder_plan's pointers into these buffers (made at the first native step; False: not native).
    # Anything that replaces a buffer must reset it to None.
    native_plan: Any = None
    # int8 cross keys/values (quantize.py's kv_dtype): each row's fp32 scale, (B, H, S) per layer; else None.
    cross_k_scale: list[Tensor] | None = None
    cross_v_scale: list[Tensor] | None = None

    def __post_init__(self) -> None:
        self._views()

    def _views(self) -> None:
        """Each layer's buffers: views of ``keys``/``values``."""
        self.self_k, self.self_v = list(self.keys.unbind(0)), list(self.values.unbind(0))

    @property
    def max_len(self) -> int:
        """Positions the self-attention buffers hold now (their stride; :meth:`reserve` grows them)."""
        return self.self_k[0].shape[2]

    def reserve(self, new: int) -> None:
        """Make room for ``new`` more positions, growing every self-attention buffer if needed.

        Raises:
            RuntimeError: more than ``limit`` positions in all (a caller's bug: generation sizes the limit).
        """
        end = self.length + new
        if end <= self.max_len:
            return
        if end > self.limit:
            raise RuntimeError(f"decoder cache holds {self.limit} positions, {end} requested")
        self._grow(next_capacity(end, self.max_len, self.limit))

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new keys/values ``(R, H, T, hd)`` at ``length`` and return views over everything so far."""
        self.reserve(k.shape[2])
        end = self.length + k.shape[2]
        self.self_k[layer][:, :, self.length:end] = k
        self.self_v[layer][:, :, self.length:end] = v
        return self.self_k[layer][:, :, :end], self.self_v[layer][:, :, :end]

    def rollback(self, length: int) -> None:
        """Forget every position from ``length`` on (draft tokens a lookahead pass rejected).

        Nothing is copied or freed: the next step writes its keys/values over the forgotten ones, and attention
        only reads positions below ``length``.

        Raises:
            RuntimeError: ``length`` outside ``0 … self.length`` (a caller's bug).
        """
        if not 0 <= length <= self.length:
            raise RuntimeError(f"cannot roll the decoder cache back to {length} positions; it holds {self.length}")
        self.length = length

    def reorder(self, rows: Tensor) -> None:
        """Keep decoder rows ``rows`` (beam search): row i of the new cache is old row ``rows[i]``.

        Only the filled part is copied; the cross-attention cache is untouched by design. On the CPU only the rows
        that take another row's place are copied, each by a plain slice copy (:func:`_moves` orders them so that
        no row is overwritten while another still needs it; an indexed gather and scatter of the same rows ran
        several times slower, ``benchmarks/cache.py``); on an accelerator finding them would stall the queue, so
        every row is gathered.
        """
        n = self.length
        if rows.device.type != "cpu":
            for buf in (self.keys, self.values):
                buf[:, :, :, :n] = buf[:, rows, :, :n]       # the right side is a copy: overlaps are safe
            return
        for buf in (self.keys, self.values):
            saved: dict[int, Tensor] = {}
            for dst, src in _moves(rows.tolist()):
                if dst == src:                               # src's row is needed after it is overwritten
                    saved[src] = buf[:, src, :, :n].clone()
                else:
                    buf[:, dst, :, :n].copy_(saved[src] if src in saved else buf[:, src, :, :n])

    def keep_inputs(self, inputs: Tensor) -> None:
        """Keep only inputs ``inputs`` (sorted indices into the B inputs) and their decoder rows.

        Generation calls this when inputs finish, so their rows stop costing compute. The kept inputs move down in
        place, in order (input ``inputs[j]`` to ``j``, never onto one still to move), and the buffers are then
        viewed to their first rows: nothing is allocated, only the inputs after the first finished one are copied,
        and the cross keys/values are never held twice. The finished rows' memory returns with the cache.
        """
        B = self.cross_k[0].shape[0]
        group = self.self_k[0].shape[0] // B
        kept = inputs.tolist()
        moves = [(j, i) for j, i in enumerate(kept) if i != j]
        n = self.length
        for buf in (self.keys, self.values):
            for j, i in moves:
                buf[:, j * group:(j + 1) * group, :, :n] = buf[:, i * group:(i + 1) * group, :, :n]
        cross = (self.cross_k, self.cross_v, self.cross_k_scale or [], self.cross_v_scale or [])
        for buf in (t for part in cross for t in part):
            for j, i in moves:
                buf[j] = buf[i]
        self.native_plan = None                              # its row count went with the old shapes
        self.keys, self.values = self.keys[:, :len(kept) * group], self.values[:, :len(kept) * group]
        self._views()
        self.cross_k, self.cross_v, k_scale, v_scale = ([t[:len(kept)] for t in part] for part in cross)
        if self.cross_k_scale is not None:
            self.cross_k_scale, self.cross_v_scale = k_scale, v_scale
        if self.encoder_keep is not None:
            self.encoder_keep = self.encoder_keep.index_select(0, inputs)

    def cross(self, layer: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Layer ``layer``'s cross-attention keys, values and, when they are int8, their row scales (else None)."""
        if self.cross_k_scale is None:
            return self.cross_k[layer], self.cross_v[layer], None, None
        return self.cross_k[layer], self.cross_v[layer], self.cross_k_scale[layer], self.cross_v_scale[layer]

    def _grow(self, capacity: int) -> None:
        """Replace the self-attention buffers by ones of ``capacity`` positions holding their filled part."""
        n = self.length

        def copy(old: Tensor) -> Tensor:
            layers, R, H, _, hd = old.shape
            new = _self_buffers(old, (R, H, capacity, hd), layers)
            new[:, :, :, :n] = old[:, :, :, :n]
            return new

        self.native_plan = None                              # its pointers go with the old buffers
        self.positions = None                                # made for the old length
        # Keys first, then values: the old keys are freed before the new values are allocated.
        self.self_k = self.self_v = []                       # the layers' views would keep the old buffers
        self.keys = copy(self.keys)
        self.values = copy(self.values)
        self._views()


def _moves(rows: list[int]) -> list[tuple[int, int]]:
    """Row copies ``(dst, src)`` that make row i hold old row ``rows[i]`` in place, each row overwritten only once no
    later copy reads it; where only cycles are left (rows swapping places), ``(r, r)`` asks to save row r first, and
    later copies from r read the saved row."""
    pending = {dst: src for dst, src in enumerate(rows) if dst != src}
    readers: dict[int, int] = {}
    for src in pending.values():
        readers[src] = readers.get(src, 0) + 1
    moves: list[tuple[int, int]] = []
    while pending:
        ready = [dst for dst in pending if not readers.get(dst)]
        if not ready:                                        # every row left is still read: break a cycle
            first = next(iter(pending))
            moves.append((first, first))
            readers[first] = 0
            continue
        for dst in ready:
            src = pending.pop(dst)
            moves.append((dst, src))
            readers[src] -= 1
    return moves


def new_cache(model, encoder_states: Tensor, encoder_keep: Tensor, rows: int, max_len: int) -> DecoderCache:
    """Allocate a cache for ``rows`` decoder rows and fill the cross-attention part from the encoder output.

    Args:
        model: a :class:`~pegasus_x.model.PegasusXForConditionalGeneration` (or base model).
        encoder_states: ``(B, S, D)`` encoder output.
        encoder_keep: ``(B, S)`` bool mask of real encoder tokens.
        rows: decoder rows (a multiple of B: the beams of input i are rows i·rows/B …).
        max_len: the most decoder positions that will be written (the buffers start smaller and grow).
    """
    decoder = model.get_decoder()
    layers = decoder.layers
    attn = layers[0].self_attn
    B, S, D = encoder_states.shape
    # quantize.py may ask for narrower cross keys/values (``kv_dtype``): they are read by every decode step.
    kv_dtype = getattr(decoder, "cross_kv_dtype", None) or encoder_states.dtype
    empty = _allocator(encoder_states.device, kv_dtype, [(B, S, D)] * 2 * len(layers))
    H = attn.num_heads
    int8 = kv_dtype == torch.int8
    scales = functools.partial(torch.empty, (B, H, S), dtype=torch.float32, device=encoder_states.device)
    k_scale = [scales() for _ in layers] if int8 else None
    v_scale = [scales() for _ in layers] if int8 else None
    # Projected a slice of positions at a time, straight into place: the slice's temporaries stay small enough
    # for the allocator to reuse, where whole-input ones (two per layer, every call) would be fresh memory that
    # the OS maps and zeroes page by page; and the cross keys/values are never held twice.
    span = max(1, PROJECT_ELEMENTS // (B * D))
    cross_k = [empty((B, H, S, D // H)) for _ in layers]
    cross_v = [empty((B, H, S, D // H)) for _ in layers]
    for i, layer in enumerate(layers):
        for s0 in range(0, S, span):
            k, v = layer.encoder_attn.project_kv(encoder_states[:, s0:s0 + span])
            if int8:
                (k, ks), (v, vs) = quantize_rows(k), quantize_rows(v)
                k_scale[i][:, :, s0:s0 + span] = ks
                v_scale[i][:, :, s0:s0 + span] = vs
            cross_k[i][:, :, s0:s0 + span].copy_(k)
            cross_v[i][:, :, s0:s0 + span].copy_(v)
    shape = (rows, H, min(max_len, FIRST_CHUNK), attn.head_dim)
    return DecoderCache(
        keys=_self_buffers(encoder_states, shape, len(layers)),
        values=_self_buffers(encoder_states, shape, len(layers)),
        cross_k=cross_k,
        cross_v=cross_v,
        # Without padding the cross-attention needs no mask, and the kernels run faster without one.
        encoder_keep=None if bool(encoder_keep.all()) else encoder_keep[:, None, None, :],
        limit=max_len,
        cross_k_scale=k_scale,
        cross_v_scale=v_scale,
    )
