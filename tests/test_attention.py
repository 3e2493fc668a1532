"""The attention layers (pegasus_x.attention) on their own, against loops written from REFERENCE.md: encoder
block-local + global attention, decoder attention with beams folded into the queries, both back-ends."""

from __future__ import annotations

import pytest
import torch

from pegasus_x.attention import Attention, GlobalLocalAttention, attend

B, H, D, K, G = 2, 2, 16, 4, 3


def _heads(t: torch.Tensor) -> torch.Tensor:
    """(L, D) -> (H, L, hd)."""
    return t.view(t.shape[0], H, D // H).transpose(0, 1)


def _softmax_attend(q, k, v, keep):
    """One softmax over the keys where ``keep``; q (H, Lq, hd), k/v (H, Lk, hd), keep (Lk,)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return probs @ v


def global_local_oracle(layer: GlobalLocalAttention, x, g, keep):
    """Per input and per block: token queries of block b over [globals ‖ block b's keys], global queries over
    [globals ‖ every token], padded keys masked; then the shared output projection."""
    P = x.shape[1]
    x_out, g_out = torch.empty_like(x), torch.empty_like(g)
    for i in range(x.shape[0]):
        q_x, k_x, v_x = (_heads(p(x[i])) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
        q_g, k_g, v_g = (_heads(p(g[i])) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
        every = torch.cat([torch.ones(G, dtype=torch.bool), keep[i]])
        out = _softmax_attend(q_g, torch.cat([k_g, k_x], 1), torch.cat([v_g, v_x], 1), every)
        g_out[i] = layer.out_proj(out.transpose(0, 1).reshape(G, D))
        for start in range(0, P, K):
            block = slice(start, start + K)
            seen = torch.cat([torch.ones(G, dtype=torch.bool), keep[i, block]])
            out = _softmax_attend(q_x[:, block], torch.cat([k_g, k_x[:, block]], 1),
                                  torch.cat([v_g, v_x[:, block]], 1), seen)
            x_out[i, block] = layer.out_proj(out.transpose(0, 1).reshape(K, D))
    return x_out, g_out


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_global_local_attention_equals_the_block_loop(backend):
    torch.manual_seed(0)
    layer = GlobalLocalAttention(D, H, K).eval()
    layer.backend = backend
    P = 3 * K
    x, g = torch.randn(B, P, D), torch.randn(B, G, D)
    keep = torch.ones(B, P, dtype=torch.bool)
    keep[1, P - K - 1:] = False                    # the second input ends inside block 1: block 2 is all padding
    with torch.no_grad():
        x_out, g_out = layer(x, g, keep)
        x_ref, g_ref = global_local_oracle(layer, x, g, keep)
    torch.testing.assert_close(x_out, x_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-5)
    # Padded keys have no weight: changing them changes no unpadded output and no global output.
    x2 = x.clone()
    x2[~keep] = torch.randn(int((~keep).sum()), D)
    with torch.no_grad():
        x_out2, g_out2 = layer(x2, g, keep)
    torch.testing.assert_close(x_out2[keep], x_out[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_out2, g_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_decoder_attention_folds_beams_into_queries(backend):
    """R = 2·B rows (two beams per input) share their input's keys: equal to each row attending on its own."""
    torch.manual_seed(1)
    layer = Attention(D, H).eval()
    layer.backend = backend
    source, x = torch.randn(B, 7, D), torch.randn(2 * B, 3, D)
    keep = torch.ones(B, 1, 1, 7, dtype=torch.bool)
    keep[1, ..., 5:] = False
    with torch.no_grad():
        k, v = layer.project_kv(source)
        folded = layer(x, k, v, keep.expand(B, 1, 2 * 3, 7))
        for r in range(2 * B):
            i = r // 2
            alone = layer(x[r:r + 1], k[i:i + 1], v[i:i + 1], keep[i:i + 1])
            torch.testing.assert_close(folded[r:r + 1], alone, rtol=1e-5, atol=1e-5)


def test_attend_backends_agree_and_masked_keys_get_no_weight():
    torch.manual_seed(2)
    q, k, v = torch.randn(2, H, 5, 8), torch.randn(2, H, 9, 8), torch.randn(2, H, 9, 8)
    keep = torch.rand(2, 1, 5, 9) > 0.4
    keep[..., 0] = True                            # no fully masked row
    eager, sdpa = attend(q, k, v, keep, backend="eager"), attend(q, k, v, keep, backend="sdpa")
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)
    v2 = v + 100.0 * (~keep[:, :, :1, :]).transpose(-1, -2)         # change only keys the first query never sees
    torch.testing.assert_close(attend(q, k, v2, keep, backend="eager")[:, :, :1], eager[:, :, :1],
                               rtol=1e-5, atol=1e-5)
