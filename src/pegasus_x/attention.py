"""Attention: the encoder's block-local + global attention and the decoder's self/cross attention.

Both layers reduce to one kernel, :func:`attend`, over tensors shaped ``(batch, heads, length, head_dim)``.
The kernel has two back-ends behind one switch (``module.backend``): ``"sdpa"`` (the default,
``torch.nn.functional.scaled_dot_product_attention``: flash / memory-efficient kernels, never materialises the
score matrix of a whole sequence) and ``"eager"`` (explicit matmul + fp32 softmax, the readable reference the
tests compare against). The block bookkeeping around the kernel is shared by both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .native.linear import Linear

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

    def forward(self, x: Tensor, g: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """Attend.

        Args:
            x: token states ``(B, P, D)`` with P a multiple of block_size (already staggered if this layer is).
            g: global states ``(B, G, D)``.
            keep: ``(B, P)`` bool, False at padded token positions.
        Returns:
            ``(token_out (B, P, D), global_out (B, G, D))`` after the output projection.
        """
        # One projection call per weight for both streams: the globals ride in front of the tokens, which also
        # lays out the global queries' keys [globals ‖ tokens] without a concatenation later.
        h = torch.cat([g, x], dim=1)                                          # (B, G+P, D)
        x_out, g_out = self.attend_projected(self.q_proj(h), self.k_proj(h), self.v_proj(h), g.shape[1], keep)
        return self.out_proj(x_out), self.out_proj(g_out)

    def attend_projected(self, q: Tensor, k: Tensor, v: Tensor, G: int, keep: Tensor) -> tuple[Tensor, Tensor]:
        """The attention between the projections: q, k, v ``(B, G+P, D)`` with the G globals in front, keep
        ``(B, P)`` → ``(token_out (B, P, D), global_out (B, G, D))`` before the output projection."""
        B, L, D = q.shape
        P, H, hd, K = L - G, self.num_heads, self.head_dim, self.block_size
        N = P // K
        q, k, v = q.view(B, L, H, hd), k.view(B, L, H, hd), v.view(B, L, H, hd)
        p_drop = self.dropout if self.training else 0.0

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

    def forward(self, x: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
        """Attend from ``x`` ``(R, T, D)`` to keys/values ``(B, H, S, hd)``.

        ``R`` may be a multiple of ``B``: rows ``i·R/B … (i+1)·R/B − 1`` (the beams of input ``i``) then share
        input ``i``'s keys. They are folded into the query length instead of copying the keys per beam.

        Args:
            keep: bool broadcastable to ``(B, 1, R/B·T, S)``, or None.
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
                and not torch.is_grad_enabled() and native.available(self) and native.attention_fits(q, k, v, keep)):
            # A decode step on the CPU: the native kernel streams the keys and values once for all query rows.
            out = native.attention(q, k, v, keep)
        else:
            if q.is_cuda and q.dtype == torch.float32 and group * T <= EAGER_GPU_ROWS and native.enabled(self):
                # An fp32 decode step on a GPU: SDPA has no flash kernel for fp32, and its memory-efficient kernel
                # splits the work by query block, so a few query rows over 16K keys leave most of the GPU idle;
                # matmuls spread the key axis. bf16 keeps SDPA's flash kernel: matmuls did no better there.
                # benchmarks/gpu.py measures both (greedy fp32, beam bf16 at 16K tokens; benchmarks/RESULTS.md).
                backend = "eager"
            if k.dtype != q.dtype:          # narrower cached keys/values (quantize.py's kv_dtype)
                k, v = k.to(q.dtype), v.to(q.dtype)
            out = attend(q, k, v, keep, p_drop, backend)
        out = out.view(B, H, group, T, hd).permute(0, 2, 3, 1, 4).reshape(R, T, D)
        return self.out_proj(out)
