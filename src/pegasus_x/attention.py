"""Attention: the encoder's block-local + global attention and the decoder's self/cross attention.

Both layers reduce to one kernel, :func:`attend`, over tensors shaped ``(batch, heads, length, head_dim)``.
The kernel has two back-ends behind one switch (``module.backend``): ``"sdpa"`` (the default,
``torch.nn.functional.scaled_dot_product_attention``: flash / memory-efficient kernels, never materialises the
score matrix of a whole sequence) and ``"eager"`` (explicit matmul + fp32 softmax, the readable reference the
tests compare against). The block bookkeeping around the kernel is shared by both. At inference on a CPU the native
kernels (:mod:`pegasus_x.native`, under its one switch) take the decode steps' few-query attention and the
encoder's attention; ``tests/test_native.py`` holds them equal to these torch paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .native.linear import Linear
from .quantize import dequantize_rows

BACKENDS = ("sdpa", "eager")
DECODE_ROWS = 8      # up to this many query rows per input, decoder attention takes the decode-step kernels
EAGER_GPU_ROWS = 8   # up to this many query rows per input, fp32 decoder attention on a GPU uses matmuls, not SDPA


def attend(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, dropout_p: float = 0.0,
           backend: str = "sdpa") -> Tensor:
    """softmax(q kᵀ / sqrt(head_dim) + mask) v.

    Args:
        q: ``(..., Lq, hd)``; k, v: ``(..., Lk, hd)`` (leading dims equal).
        keep: bool, broadcastable to ``(..., Lq, Lk)``, True where a key may be attended; None = all keys.
        dropout_p: attention-probability dropout (pass 0.0 in eval mode).
        backend: ``"sdpa"`` or ``"eager"``.
    Returns:
        ``(..., Lq, hd)`` in the dtype of ``q``.
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)).float()
    if keep is not None:
        # The most negative finite value, like the reference: exp() of it is exactly 0, and a row can never
        # turn into NaN the way an all -inf row does.
        scores = scores.masked_fill(~keep, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


class GlobalLocalAttention(nn.Module):
    """PEGASUS-X encoder attention over a token stream and a global-token stream.

    Token queries of block b attend, in ONE softmax, to [all G global keys ‖ the K keys of block b]; global queries
    attend to [all G global keys ‖ all token keys]. Both streams share the bias-free q/k/v/out projections.
    """

    def __init__(self, d_model: int, num_heads: int, block_size: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim, self.block_size = num_heads, d_model // num_heads, block_size
        self.dropout = dropout
        self.backend = "sdpa"
        self.q_proj = Linear(d_model, d_model, bias=False)
        self.k_proj = Linear(d_model, d_model, bias=False)
        self.v_proj = Linear(d_model, d_model, bias=False)
        self.out_proj = Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, g: Tensor, keep: Tensor, stagger: bool = False) -> tuple[Tensor, Tensor]:
        """Attend.

        Args:
            x: token states ``(B, P, D)`` with P a multiple of block_size.
            g: global states ``(B, G, D)``.
            keep: ``(B, P)`` bool, False at padded token positions.
            stagger: shift the block boundaries by half a block (odd layers): K/2 masked positions on both sides of
                the tokens, one block more.
        Returns:
            ``(token_out (B, P, D), global_out (B, G, D))`` after the output projection.
        """
        # One projection call per weight for both streams: the globals ride in front of the tokens, which also
        # lays out the global queries' keys [globals ‖ tokens] without a concatenation later.
        G = g.shape[1]
        h = torch.cat([g, x], dim=1)                                          # (B, G+P, D)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if stagger:
            # The positions staggering adds are masked as keys and their outputs are dropped, so whatever they
            # hold never counts: they join after the projections and leave before the output projection, and no
            # product runs on them.
            half = self.block_size // 2
            edge = q.new_zeros(q.shape[0], half, q.shape[2])

            def pad(t: Tensor) -> Tensor:                                     # [globals ‖ edge ‖ tokens ‖ edge]
                return torch.cat([t[:, :G], edge, t[:, G:], edge], dim=1)
            q, k, v, keep = pad(q), pad(k), pad(v), F.pad(keep, (half, half), value=False)
        x_out, g_out = self.attend_projected(q, k, v, G, keep)
        if stagger:
            x_out = x_out[:, half:-half]
        return self.out_proj(x_out), self.out_proj(g_out)

    def attend_projected(self, q: Tensor, k: Tensor, v: Tensor, G: int, keep: Tensor) -> tuple[Tensor, Tensor]:
        """The attention between the projections: q, k, v ``(B, G+P, D)`` with the G globals in front, keep
        ``(B, P)`` → ``(token_out (B, P, D), global_out (B, G, D))`` before the output projection."""
        B, L, D = q.shape
        P, H, hd, K = L - G, self.num_heads, self.head_dim, self.block_size
        N = P // K
        p_drop = self.dropout if self.training else 0.0
        if self._native(q, k, v, p_drop):
            # Rows of the flattened (B·L, D) projections: input b's globals are rows b·L + [0, G), its tokens
            # b·L + G + [0, P), block n of them b·L + G + n·K + [0, K).
            flat = [t.reshape(B * L, D) for t in (q, k, v)]
            starts = torch.arange(B) * L
            tokens, mine = starts[:, None] + G + torch.arange(P), torch.arange(B * G).view(B, G)
            g_out = native.encoder_attention(*flat, H, G, starts, starts[:, None] + torch.arange(G), tokens, keep,
                                             mine, B * G) if G else q.new_empty(0, D)
            blocks = tokens.view(B * N, K)
            x_out = native.encoder_attention(*flat, H, G, starts.repeat_interleave(N), blocks, blocks,
                                             keep.reshape(B * N, K), torch.arange(B * P).view(B * N, K), B * P)
            return x_out.view(B, P, D), g_out.view(B, G, D)
        q, k, v = q.view(B, L, H, hd), k.view(B, L, H, hd), v.view(B, L, H, hd)

        # Global queries: every global and every token key.
        keep_all = torch.cat([keep.new_ones(B, G), keep], dim=1)[:, None, None, :]       # (B, 1, 1, G+P)
        g_out = attend(q[:, :G].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), keep_all, p_drop,
                       self.backend)                                                      # (B, H, G, hd)

        # Token queries: each block sees the G global keys followed by its own K keys.
        def blocks(t: Tensor) -> Tensor:                                      # (B, P, H, hd) -> (B, N, H, K, hd)
            return t.view(B, N, K, H, hd).permute(0, 1, 3, 2, 4)

        def with_globals(t: Tensor) -> Tensor:                                # -> (B·N, H, G+K, hd)
            glob = t[:, :G].transpose(1, 2)[:, None].expand(B, N, H, G, hd)
            return torch.cat([glob, blocks(t[:, G:])], dim=3).reshape(B * N, H, G + K, hd)

        keep_blk = torch.cat([keep.new_ones(B, N, G), keep.view(B, N, K)], dim=2)       # (B, N, G+K)
        x_out = attend(blocks(q[:, G:]).reshape(B * N, H, K, hd), with_globals(k), with_globals(v),
                       keep_blk.view(B * N, 1, 1, G + K), p_drop, self.backend)         # (B·N, H, K, hd)

        x_out = x_out.view(B, N, H, K, hd).permute(0, 1, 3, 2, 4).reshape(B, P, D)
        return x_out, g_out.transpose(1, 2).reshape(B, G, D)

    def forward_packed(self, h: Tensor, packing: Packing, stagger: bool) -> Tensor:
        """:meth:`forward` over packed rows (inference): ``h`` ``(B·G + N, D)``, the globals then the N real tokens
        (see :class:`Packing`) → the output projection of their attention, same layout.

        Global queries attend to their input's globals and every position (padding masked), laid out as in
        :meth:`attend_projected`; token queries attend block by block, each block gathered down to its real tokens.
        """
        B, G, BG, (M, L) = packing.batch, packing.num_globals, packing.globals, packing.blocks(stagger)[0].shape
        D, H, hd = h.shape[-1], self.num_heads, self.head_dim
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        rows, real, owner, at = packing.blocks(stagger)
        if self._native(q, k, v, 0.0):
            starts = torch.arange(B) * G                                      # input b's globals: rows b·G + [0, G)
            mine = starts[:, None] + torch.arange(G)
            tokens, present = packing.tokens()
            g_out = (native.encoder_attention(q, k, v, H, G, starts, mine, tokens + BG, present, mine, BG) if G
                     else q.new_empty(0, D))
            x_out = native.encoder_attention(q, k, v, H, G, owner * G, rows + BG, rows + BG, real,
                                             rows.masked_fill(~real, -1), h.shape[0] - BG)
            return self.out_proj(torch.cat([g_out, x_out]))
        keep_all = torch.cat([packing.keep.new_ones(B, G), packing.keep], dim=1)[:, None, None, :]

        def heads(t: Tensor) -> Tensor:                                       # (X, L, D) → (X, H, L, hd)
            return t.view(t.shape[0], -1, H, hd).transpose(1, 2)

        g_out = attend(heads(q[:BG].view(B, G, D)), heads(packing.spread(k)), heads(packing.spread(v)), keep_all,
                       0.0, self.backend)                                                 # (B, H, G, hd)

        def gathered(t: Tensor) -> Tensor:                                    # (M, L, D)
            return t[BG:][rows]

        def with_globals(t: Tensor) -> Tensor:                                # (M, H, G + L, hd)
            return heads(torch.cat([t[:BG].view(B, G, D)[owner], gathered(t)], dim=1))

        keep_blk = torch.cat([real.new_ones(M, G), real], dim=1)[:, None, None, :]
        x_out = attend(heads(gathered(q)), with_globals(k), with_globals(v), keep_blk, 0.0, self.backend)
        x_out = x_out.transpose(1, 2).reshape(M * L, D).index_select(0, at)               # (N, D)
        return self.out_proj(torch.cat([g_out.transpose(1, 2).reshape(BG, D), x_out]))

    def _native(self, q: Tensor, k: Tensor, v: Tensor, p_drop: float) -> bool:
        """Whether the native kernel takes this attention: at inference on a CPU it reads the rows in place (no
        gathered copies) and keeps each chunk of keys and values in L2 while the queries meet them. q, k, v: the
        projections, any shape of D = heads · head_dim floats per row."""
        D = self.num_heads * self.head_dim
        return (self.backend == "sdpa" and p_drop == 0.0 and not torch.is_grad_enabled() and native.available(self)
                and native.encoder_attention_fits(q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, D),
                                                self.num_heads))


class Packing:
    """Where the real tokens of a right-padded encoder batch sit, for the packed encoder layers.

    Padding (the batch's shorter inputs and the last block's remainder) is masked out of every softmax as a key,
    and no real token or global reads its state, so the real tokens' states do not depend on it: the packed
    layers run the projections, LayerNorms and FFN on the real tokens only, and each block's attention on the
    block's real tokens only.

    Args:
        keep: ``(B, P)`` bool, P a block multiple, False at padding.
        num_globals: G.
        block_size: K.
    """

    def __init__(self, keep: Tensor, num_globals: int, block_size: int) -> None:
        B, P = keep.shape
        self.batch, self.num_globals, self.globals, self.keep = B, num_globals, B * num_globals, keep
        device = keep.device
        b, t = keep.nonzero(as_tuple=True)
        rows = torch.arange(B, device=device)[:, None] * (num_globals + P)
        globals_at = (rows + torch.arange(num_globals, device=device)).reshape(-1)
        self._spread_at = torch.cat([globals_at, b * (num_globals + P) + num_globals + t])
        self._blocks = {stagger: self._gather(b, t, P, block_size, block_size // 2 if stagger else 0)
                        for stagger in (False, True)}

    @staticmethod
    def _gather(b: Tensor, t: Tensor, P: int, K: int, off: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n = b.numel()
        block = b * ((P + 2 * off) // K) + (t + off) // K       # the (padded, maybe staggered) block of each token
        # Tokens come in order (input, position), so each block's tokens are consecutive.
        _, which, count = torch.unique_consecutive(block, return_inverse=True, return_counts=True)
        starts = torch.cumsum(count, 0) - count
        slot = torch.arange(n, device=b.device) - starts[which]
        L = int(count.max())
        # A block's empty slots read token 0: masked as keys, their query rows never read back.
        rows = torch.zeros((count.numel(), L), dtype=torch.long, device=b.device)
        rows[which, slot] = torch.arange(n, device=b.device)
        real = torch.zeros_like(rows, dtype=torch.bool)
        real[which, slot] = True
        return rows, real, b[starts], which * L + slot

    def blocks(self, stagger: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For a (non-)staggered layer, the M blocks holding real tokens, each cut to L = the most any holds:
        ``rows`` ``(M, L)`` the real tokens' indices (0 in the slots of a block with fewer), ``real`` ``(M, L)``
        which slots hold one, ``owner`` ``(M,)`` each block's input, ``at`` ``(N,)`` each token's slot in the
        ``(M·L)`` layout."""
        return self._blocks[stagger]

    def tokens(self) -> tuple[Tensor, Tensor]:
        """Each input's real tokens as a row: ``(B, Lk)`` their indices (Lk: the most any input has; 0 past an
        input's last) and ``(B, Lk)`` which slots hold one."""
        count = self.keep.sum(1)
        first = torch.cumsum(count, 0) - count
        slots = torch.arange(int(count.max()), device=count.device)
        present = slots < count[:, None]
        return (first[:, None] + slots).masked_fill(~present, 0), present

    def spread(self, rows: Tensor) -> Tensor:
        """Packed ``(B·G + N, D)`` → the padded layout ``(B, G + P, D)``, zero at padding."""
        out = rows.new_zeros(self.batch * (self.num_globals + self.keep.shape[1]), rows.shape[-1])
        return out.index_copy_(0, self._spread_at, rows).view(self.batch, -1, rows.shape[-1])


class Attention(nn.Module):
    """Multi-head attention for the decoder: causal self-attention and cross-attention share this class.

    Keys/values are produced by :meth:`project_kv` and passed in, so the caller decides whether they come from
    a cache (generation) or are computed fresh (training).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.dropout = dropout
        self.backend = "sdpa"
        self.q_proj = Linear(d_model, d_model, bias=False)
        self.k_proj = Linear(d_model, d_model, bias=False)
        self.v_proj = Linear(d_model, d_model, bias=False)
        self.out_proj = Linear(d_model, d_model, bias=False)

    def project_kv(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, S, D)`` → keys and values ``(B, H, S, hd)``."""
        B, S, _ = source.shape
        k = self.k_proj(source).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(source).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, k_scale: Tensor | None = None,
                v_scale: Tensor | None = None) -> Tensor:
        """Attend from ``x`` ``(R, T, D)`` to keys/values ``(B, H, S, hd)``.

        ``R`` may be a multiple of ``B``: rows ``i·R/B … (i+1)·R/B − 1`` (the beams of input ``i``) then share
        input ``i``'s keys. They are folded into the query length instead of copying the keys per beam.

        Args:
            keep: bool broadcastable to ``(B, 1, R/B·T, S)``, or None.
            k_scale, v_scale: for int8 keys/values (quantize.py's kv_dtype), their row scales ``(B, H, S)``.
        Returns:
            ``(R, T, D)``.
        """
        R, T, D = x.shape
        B, H, hd = k.shape[0], self.num_heads, self.head_dim
        group = R // B
        q = self.q_proj(x).view(B, group, T, H, hd).permute(0, 3, 1, 2, 4).reshape(B, H, group * T, hd)
        backend = self.backend
        p_drop = self.dropout if self.training else 0.0
        if (backend == "sdpa" and q.device.type == "cpu" and group * T <= DECODE_ROWS and p_drop == 0.0
                and not torch.is_grad_enabled() and native.available(self)
                and native.attention_fits(q, k, v, keep, k_scale, v_scale)):
            # A decode step on the CPU: the native kernel streams the keys and values once for all query rows.
            out = native.attention(q, k, v, keep, k_scale, v_scale)
        else:
            if q.is_cuda and q.dtype == torch.float32 and group * T <= EAGER_GPU_ROWS and native.enabled(self):
                # An fp32 decode step on a GPU: SDPA has no flash kernel for fp32, and its memory-efficient kernel
                # splits the work by query block, so a few query rows over 16K keys leave most of the GPU idle;
                # matmuls spread the key axis. bf16 keeps SDPA's flash kernel: matmuls did no better there.
                # benchmarks/gpu.py measures both (greedy fp32, beam bf16 at 16K tokens; benchmarks/RESULTS.md).
                backend = "eager"
            if k_scale is not None:         # int8 cached keys/values (quantize.py's kv_dtype)
                k, v = dequantize_rows(k, k_scale).to(q.dtype), dequantize_rows(v, v_scale).to(q.dtype)
            elif k.dtype != q.dtype:        # narrower cached keys/values (quantize.py's kv_dtype)
                k, v = k.to(q.dtype), v.to(q.dtype)
            out = attend(q, k, v, keep, p_drop, backend)
        out = out.view(B, H, group, T, hd).permute(0, 2, 3, 1, 4).reshape(R, T, D)
        return self.out_proj(out)
