"""The native decode-step kernels (pegasus_x.native): equal to torch's kernels up to summation order, under any default
dtype, taken by generation exactly when they apply and the switch is on, and generating the reference's tokens.
Building, caching and loading them: test_native_loader.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import random_batch, reference_twin, run_steps, small_model
from pegasus_x import native
from pegasus_x.cache import new_cache
from pegasus_x.generate import make_step
from pegasus_x.native import abi, kernels
from pegasus_x.quantize import quantize_model, quantize_rows

def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------------------- build
OPENMP_RUNTIMES = textwrap.dedent("""
    import json
    import torch

    def runtimes():
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if any(n in line for n in ("gomp", "libomp", "libiomp"))})

    torchs = runtimes()
    from pegasus_x import native
    assert native.library() is not None, "the kernels did not load"
    print(json.dumps({"torch": torchs, "with_kernels": runtimes()}))
""")


@pytest.mark.slow
def test_only_torchs_openmp_runtime_is_loaded(lib):
    """The kernels must share torch's OpenMP thread pool: a second runtime would compete for the cores.

    Checked in a fresh interpreter that imports torch, then loads the kernels: in this pytest process other
    packages (sentencepiece ships its own libgomp) may have loaded theirs, whatever our kernels link."""
    proc = subprocess.run([sys.executable, "-c", OPENMP_RUNTIMES], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["with_kernels"] == found["torch"] and len(found["torch"]) <= 1, found


# ---------------------------------------------------------------------------------------------------------- linear
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(384, 256), (385, 200), (7, 33), (1001, 72)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_linear_equals_f_linear(lib, dtype, rows, shape, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(rows * shape[0] + threads)
        w = torch.randn(*shape, generator=g).to(dtype)
        b = torch.randn(shape[0], generator=g).to(dtype)
        x = (torch.randn(rows, 1, shape[1], generator=g) / shape[1] ** 0.5).to(dtype)
        for bias in (None, b):
            got = kernels.linear(x, w, bias)
            expected = F.linear(x.float(), w.float(), None if bias is None else bias.float())
            assert got.dtype == dtype and got.shape == (rows, 1, shape[0]) and got.is_contiguous()
            torch.testing.assert_close(got.float(), expected, **tolerance(dtype))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [9, 17, 72])
@pytest.mark.parametrize("shape", [(384, 256), (1001, 72)])
def test_many_rows_linear_equals_f_linear(lib, monkeypatch, dtype, rows, shape):
    """Products of MAX_ROWS < rows <= MAX_DRAFT_ROWS (lookahead's LM head) take px_linear_rows through Linear;
    larger ones stay with torch."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(*shape, generator=g).to(dtype)
    b = torch.randn(shape[0], generator=g).to(dtype)
    x = (torch.randn(rows, shape[1], generator=g) / shape[1] ** 0.5).to(dtype)
    assert kernels.many_rows_fit(x, w, b) and not kernels.many_rows_fit(x.repeat(9, 1)[:73], w, b)
    calls = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda *a: calls.append(1) or real(*a))
    for bias in (None, b):
        with torch.no_grad():
            got = native.Linear(shape[1], shape[0], bias=bias is not None).to(dtype)
            got.weight.copy_(w)
            if bias is not None:
                got.bias.copy_(bias)
            y = got(x)
        expected = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        assert y.dtype == dtype and y.shape == (rows, shape[0])
        torch.testing.assert_close(y.float(), expected, **tolerance(dtype))
    assert len(calls) == 2                                        # both products took the kernel


@pytest.mark.parametrize("rows, shape", [
    *((rows, shape) for rows in (73, 79, 203) for shape in ((384, 256), (385, 200), (7, 33), (40, 800), (4113, 24))),
    (517, (1100, 3100)), (517, (40, 800)), (600, (7, 33))])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemm_equals_f_linear(lib, rows, shape, threads):
    """px_gemm over every edge: rows not a multiple of the 6-row tile and past its 96-row block, outputs not a
    multiple of 16 and past the 4,096 packed at once, inputs past the 384-input panel, threads splitting outputs or
    rows (small weights from 96 rows per thread, and 7 outputs on 3 threads); from 512 rows the deep blocks: inputs
    past their 3,072, outputs past the 512 packed at once at that depth."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(rows * shape[0] + threads)
        w = torch.randn(*shape, generator=g)
        b = torch.randn(shape[0], generator=g)
        x = torch.randn(rows, 1, shape[1], generator=g) / shape[1] ** 0.5
        assert kernels.gemm_fits(x, w, b)
        for bias in (None, b):
            got = kernels.gemm(x, w, bias)
            assert got.shape == (rows, 1, shape[0]) and got.is_contiguous()
            torch.testing.assert_close(got, F.linear(x, w, bias), **tolerance(torch.float32))
    finally:
        torch.set_num_threads(before)


def test_gemm_takes_many_fp32_rows_only(lib):
    w, b = torch.randn(300, 64), torch.randn(300)
    x = torch.randn(kernels.MAX_DRAFT_ROWS + 1, 64)
    assert kernels.gemm_fits(x, w, b) and kernels.gemm_fits(x, w, None)
    assert not kernels.gemm_fits(x[:-1], w, b)                                   # the row kernels' range
    assert not kernels.gemm_fits(x.bfloat16(), w.bfloat16(), None)
    assert not kernels.gemm_fits(x, w, b.bfloat16())
    assert not kernels.gemm_fits(x, w.t().contiguous().t(), None)                # column-major weight
    assert not kernels.gemm_fits(x, w.to("meta"), None)


@pytest.mark.parametrize("G, K, H, hd", [(3, 4, 2, 8), (16, 10, 3, 20), (0, 14, 1, 64), (128, 64, 2, 48),
                                         (5, 400, 1, 16)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_encoder_attention_equals_the_torch_layer(lib, monkeypatch, G, K, H, hd, threads):
    """The encoder's attention (every block over [globals ‖ its keys], the globals over every key, padded keys masked)
    against the torch path of GlobalLocalAttention, padded and packed layouts: tiles short of 6 queries or 16 keys,
    head dims short of 16, no globals, an input whose last block is all padding, staggered blocks, keys past one
    chunk (the globals of 3 blocks of 64 and more)."""
    if not kernels.gemm_preferred():
        pytest.skip("px_encoder_attention runs only where px_gemm is preferred (AVX2 + FMA without AVX-512)")
    from pegasus_x.attention import GlobalLocalAttention, Packing

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(G * 100 + K + threads)
        B, P, D = 2, 3 * K, H * hd
        layer = GlobalLocalAttention(D, H, K).eval()
        x, glob = torch.randn(B, P, D, generator=g), torch.randn(B, G, D, generator=g)
        keep = torch.ones(B, P, dtype=torch.bool)
        keep[1, P - K - 1:] = False
        calls = []
        real = native.encoder_attention
        monkeypatch.setattr(native, "encoder_attention", lambda *a: calls.append(1) or real(*a))
        for stagger in (False, True):
            with torch.no_grad():
                got = layer(x, glob, keep, stagger)
                native.set_enabled(layer, False)
                expected = layer(x, glob, keep, stagger)
                native.set_enabled(layer, True)
            # Queries at padding: nothing reads them (without globals, an all-padding block's have no key to see).
            torch.testing.assert_close(got[0][keep], expected[0][keep], **tolerance(torch.float32))
            torch.testing.assert_close(got[1], expected[1], **tolerance(torch.float32))
            # The packed layout (a batch's real tokens only, blocks gathered by index).
            packing = Packing(keep, G, K)
            h = torch.cat([glob.reshape(B * G, D), x[keep]])
            with torch.no_grad():
                got = layer.forward_packed(h, packing, stagger)
                native.set_enabled(layer, False)
                expected = layer.forward_packed(h, packing, stagger)
                native.set_enabled(layer, True)
            torch.testing.assert_close(got, expected, **tolerance(torch.float32))
        assert len(calls) == 4 * (2 if G else 1)          # the globals' queries and the blocks', each layout
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("G", [1, 2, 4, 5, 8, 11])
@pytest.mark.parametrize("S", [1, 7, 8, 9, 300])
@pytest.mark.parametrize("D", [64, 48, 40, 24, 16, 8])
def test_attention_equals_sdpa(lib, dtype, G, S, D):
    """int8 keys/values (with their row scales) against SDPA on the values they stand for."""
    g = torch.Generator().manual_seed(G * 1000 + S + D)
    B, H = 2, 3
    q_dtype = torch.float32 if dtype == torch.int8 else dtype
    q = (torch.randn(B, H, G, D, generator=g) * 2).to(q_dtype)
    # Views of a longer preallocated cache, as in decoding: strided batch/head dims.
    k = torch.randn(B, H, S + 11, D, generator=g)
    v = torch.randn(B, H, S + 11, D, generator=g)
    scales = {}
    if dtype == torch.int8:
        (k, k_scale), (v, v_scale) = quantize_rows(k), quantize_rows(v)
        scales = dict(k_scale=k_scale[:, :, :S], v_scale=v_scale[:, :, :S])
        kf, vf = (k.float() * k_scale[..., None])[:, :, :S], (v.float() * v_scale[..., None])[:, :, :S]
    k, v = k.to(dtype)[:, :, :S], v.to(dtype)[:, :, :S]
    if dtype != torch.int8:
        kf, vf = k.float(), v.float()
    keep = torch.rand(B, 1, 1, S, generator=g) > 0.4
    keep[..., 0] = True
    for mask in (None, keep):
        assert native.attention_fits(q, k, v, mask, **scales)
        got = native.attention(q, k, v, mask, **scales)
        expected = F.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=mask)
        assert got.dtype == q_dtype and got.shape == (B, H, G, D)
        torch.testing.assert_close(got.float(), expected, **tolerance(q_dtype))


def test_attention_extreme_scores_and_empty_rows(lib):
    q = torch.randn(2, 2, 3, 16) * 40                             # scores spanning hundreds: exp under/overflow
    k, v = torch.randn(2, 2, 50, 16), torch.randn(2, 2, 50, 16)
    keep = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    keep[1] = False                                              # input 1 has no key to attend
    got = native.attention(q, k, v, keep)
    expected = F.scaled_dot_product_attention(q[:1], k[:1], v[:1])
    torch.testing.assert_close(got[:1], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], torch.zeros_like(got[1]))         # documented: zeros, never NaN


def test_attention_refuses_what_it_cannot_take():
    q, k = torch.randn(1, 2, 1, 12), torch.randn(1, 2, 5, 12)
    assert not native.attention_fits(q, k, k, None)                                   # head_dim not a multiple of 8
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 5, 16)
    assert not native.attention_fits(q, k.half(), k.half(), None)                      # fp16
    for d in (abi.HEAD_DIM_MULTIPLE, abi.MAX_HEAD_DIM):                              # the named bounds themselves fit
        assert native.attention_fits(torch.randn(1, 2, 1, d), torch.randn(1, 2, 5, d), torch.randn(1, 2, 5, d), None)
    d = abi.MAX_HEAD_DIM + abi.HEAD_DIM_MULTIPLE
    assert not native.attention_fits(torch.randn(1, 2, 1, d), torch.randn(1, 2, 5, d), torch.randn(1, 2, 5, d), None)
    assert not native.attention_fits(q, k.transpose(2, 3).contiguous().transpose(2, 3), k, None)  # column-major
    assert not native.attention_fits(q, k, k, torch.ones(1, 1, 1, 5))                 # float mask
    k8, s8 = quantize_rows(torch.randn(1, 2, 5, 16))
    assert native.attention_fits(q, k8, k8, None, s8, s8)
    assert not native.attention_fits(q, k8, k8, None)                                  # int8 without scales
    assert not native.attention_fits(q, k, k, None, s8, s8)                            # scales for fp32
    assert not native.attention_fits(q, k8, k8, None, s8[:, :, :4], s8)                # scales of another shape
    assert not native.attention_fits(q, k8, k8, None, s8.double(), s8)
    assert not native.attention_fits(q, k8, k8, None, s8.transpose(1, 2).contiguous().transpose(1, 2), s8)


# ------------------------------------------------------------------------------------------------- decoder layers


# inputs x beams: (inputs, rows), on both sides of kernels.c's tiles_win (fp32 from 2 rows, bf16 from 4).
SHAPES = {"1x1": (1, 1), "2x1": (2, 2), "1x4": (1, 4), "2x2": (2, 4), "2x4": (2, 8), "4x4": (4, 16), "9x1": (9, 9)}
# Every shape with relu (the released checkpoints' activation) and every activation at 2x2 in the fast tier;
# the rest of the grid with the slow tests.
STEP_CASES = [pytest.param(activation, dtype, *SHAPES[shape], id=f"{shape}-{dtype_id}-{activation}",
                           marks=() if activation == "relu" or shape == "2x2" else pytest.mark.slow)
              for activation in ("relu", "gelu", "gelu_new", "silu", "tanh")
              for dtype_id, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)) for shape in SHAPES]


@pytest.mark.parametrize("activation, dtype, inputs, rows", STEP_CASES)
def test_decoder_step_equals_torch_layers(lib, monkeypatch, activation, dtype, inputs, rows):
    model = small_model(activation=activation, dtype=dtype)
    g = torch.Generator().manual_seed(rows)
    enc = torch.randn(inputs, 13, 64, generator=g).to(dtype)
    keep = torch.ones(inputs, 13, dtype=torch.bool)
    keep[-1, 9:] = False                                         # the last input is padded
    tokens = [torch.randint(3, 120, (rows, 1), generator=g) for _ in range(6)]
    calls = []
    real = native.decoder_step
    monkeypatch.setattr(native, "decoder_step", lambda *a: calls.append(1) or real(*a))
    got, got_cache = run_steps(model, enc, keep, rows, tokens)
    assert len(calls) == len(tokens)                             # every step took the native layers
    monkeypatch.setattr(native, "decoder_plan", lambda *a: None)
    expected, expected_cache = run_steps(model, enc, keep, rows, tokens)
    n = len(tokens)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        for mine, theirs in zip(got_cache.self_k + got_cache.self_v, expected_cache.self_k + expected_cache.self_v):
            torch.testing.assert_close(mine[:, :, :n], theirs[:, :, :n], rtol=1e-4, atol=1e-4)
    else:
        # bf16: ours keeps activations in fp32 between operations, torch rounds after each. Both are measured
        # against fp32 arithmetic on the same (bf16-valued) weights: ours must be no further from it.
        exact, _ = run_steps(model.float(), enc.float(), keep, rows, tokens)
        ours_err, torch_err = (got - exact).abs().max(), (expected - exact).abs().max()
        assert ours_err <= 1.25 * torch_err + 1e-3, (ours_err, torch_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8", "int8-kv8"])
@pytest.mark.parametrize("inputs,rows,T", [(1, 1, 5), (1, 1, 9), (2, 2, 4), (2, 4, 3)], ids=["1x5", "1x9", "2x4", "2x2x3"])
def test_decoder_rows_equal_torch_layers(lib, monkeypatch, dtype, inputs, rows, T):
    """Lookahead's pass: T new positions per row in one native call, causal among them, equal to the torch layers
    (which also fill the cache the same way); a step after it sees the same cache. "int8": int8 weights and bf16
    cross keys/values under fp32 layers; "int8-kv8": int8 cross keys/values too."""
    if dtype in ("int8", "int8-kv8"):
        kv = "bf16" if dtype == "int8" else "int8"
        model, dtype = quantize_model(small_model(), "int8", kv_dtype=kv), torch.float32
    else:
        model = small_model(dtype=dtype)
    g = torch.Generator().manual_seed(T)
    enc = torch.randn(inputs, 13, 64, generator=g).to(dtype)
    keep = torch.ones(inputs, 13, dtype=torch.bool)
    keep[-1, 9:] = False
    tokens = [torch.randint(3, 120, (rows, n), generator=g) for n in (1, 2, T, 1)]

    def run(model=model, enc=enc):
        cache = new_cache(model, enc, keep, rows, 2 * T + 4)
        step = make_step(model, cache)
        with torch.no_grad():
            return torch.cat([step(t, every=True) for t in tokens], 1), cache
    calls = []
    real = native.decoder_rows
    monkeypatch.setattr(native, "decoder_rows", lambda *a: calls.append(1) or real(*a))
    got, got_cache = run()
    assert len(calls) == 2                                        # the passes of 2 and T positions
    monkeypatch.setattr(native, "decoder_plan", lambda *a: None)
    expected, expected_cache = run()
    n = got_cache.length
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        for mine, theirs in zip(got_cache.self_k + got_cache.self_v, expected_cache.self_k + expected_cache.self_v):
            torch.testing.assert_close(mine[:, :, :n], theirs[:, :, :n], rtol=1e-4, atol=1e-4)
    else:
        # As for decoder_step: both against fp32 arithmetic on the same weights; ours no further from it.
        exact, _ = run(model.float(), enc.float())
        ours_err, torch_err = (got - exact).abs().max(), (expected - exact).abs().max()
        assert ours_err <= 1.25 * torch_err + 1e-3, (ours_err, torch_err)


def test_decoder_plan_only_what_it_can_run(lib):
    model = small_model()
    enc, keep = torch.randn(1, 9, 64), torch.ones(1, 9, dtype=torch.bool)
    decoder = model.get_decoder()
    cache = new_cache(model, enc, keep, 4, 8)
    x = torch.randn(4, 1, 64)
    assert native.decoder_plan(decoder, cache, x) is not None
    rows = abi.MAX_DRAFT_ROWS
    assert native.decoder_plan(decoder, new_cache(model, enc, keep, rows, 8), torch.randn(rows, 1, 64)) is not None
    assert native.decoder_plan(decoder, new_cache(model, enc, keep, rows + 1, 8), torch.randn(rows + 1, 1, 64)) is None
    assert native.decoder_plan(decoder, cache, x.bfloat16()) is None                                      # mixed dtypes
    model.set_attention_backend("eager")                         # the readable reference path is honoured
    assert native.decoder_plan(decoder, cache, x) is None
    model.set_attention_backend("sdpa")
    model.get_decoder().config.activation_function = "mish"     # an activation the kernels do not know
    assert native.decoder_plan(decoder, cache, x) is None


def test_full_cache_still_raises_the_clear_error(lib):
    model = small_model()
    cache = new_cache(model, torch.randn(1, 9, 64), torch.ones(1, 9, dtype=torch.bool), 1, 2)
    step = make_step(model, cache)
    with torch.no_grad():
        step(torch.ones(1, 1, dtype=torch.long))
        step(torch.ones(1, 1, dtype=torch.long))
        assert cache.native_plan                                 # the native layers ran
        with pytest.raises(RuntimeError, match="decoder cache holds 2 positions"):
            step(torch.ones(1, 1, dtype=torch.long))


def test_dropping_inputs_rebuilds_the_plan(lib):
    model = small_model()
    enc, keep = torch.randn(3, 9, 64), torch.ones(3, 9, dtype=torch.bool)
    cache = new_cache(model, enc, keep, 6, 8)
    step = make_step(model, cache)
    tokens = torch.randint(3, 120, (6, 1))
    with torch.no_grad():
        step(tokens)
        first = cache.native_plan
        cache.keep_inputs(torch.tensor([0, 2]))
        assert cache.native_plan is None                         # its pointers went with the old buffers
        got = step(tokens[[0, 1, 4, 5]])
    assert cache.native_plan and cache.native_plan is not first and cache.native_plan.rows == 4
    reference = new_cache(model, enc[[0, 2]], keep[[0, 2]], 4, 8)
    ref_step = make_step(model, reference)
    with torch.no_grad():
        ref_step(tokens[[0, 1, 4, 5]])                           # the kept rows' first step
        expected = ref_step(tokens[[0, 1, 4, 5]])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [dict(), dict(num_beams=4, length_penalty=0.8),
                                     dict(num_beams=2, num_return_sequences=2, no_repeat_ngram_size=3)],
                         ids=["greedy", "beam4", "beam2-nrs2"])
def test_generation_through_native_layers_matches_reference(lib, tmp_path, monkeypatch, options):
    ref, ours, _ = reference_twin(tmp_path, seed=5, init_std=0.5)
    ids, mask, _ = random_batch([20, 11], ref.config.vocab_size, seed=3)
    options = dict(max_new_tokens=12, **options)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref.generate(ids, attention_mask=mask, **options)
    calls = []
    real = native.decoder_step
    monkeypatch.setattr(native, "decoder_step", lambda *a: calls.append(1) or real(*a))
    got = ours.generate(ids, attention_mask=mask, **options)
    assert calls, "the native decoder layers were not used"
    if options.get("num_beams", 1) > 1:                          # the reference pads finished beams with EOS
        for row in expected:
            ends = (row[1:] == 1).nonzero()
            if len(ends):
                row[int(ends[0]) + 2:] = 0
    assert torch.equal(got, expected), f"\n{got}\n{expected}"


# ---------------------------------------------------------------------------------------- beam-search kernels
@pytest.mark.parametrize("rows, V", [(1, 1), (1, 7), (3, 8), (4, 96103), (9, 1001)])
def test_log_softmax_equals_torch(lib, rows, V):
    g = torch.Generator().manual_seed(rows * V)
    x = torch.randn(rows, V, generator=g) * 8 - 30          # far from 0: the maximum must be subtracted
    got = kernels.log_softmax(x)
    torch.testing.assert_close(got, F.log_softmax(x, dim=-1), rtol=1e-6, atol=4e-6)
    assert torch.allclose(got.exp().sum(-1).double(), torch.ones(rows, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("special", [float("nan"), float("inf"), float("-inf")])
def test_log_softmax_leaves_non_finite_logits_to_torch(lib, special):
    x = torch.randn(3, 40)
    x[1, 17] = special
    assert torch.equal(kernels.log_softmax(x).isnan(), F.log_softmax(x, dim=-1).isnan())
    torch.testing.assert_close(kernels.log_softmax(x), F.log_softmax(x, dim=-1), equal_nan=True)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows, n, k", [(1, 384412, 8), (2, 96103, 16), (3, 37, 5), (1, 5, 5), (2, 9, 4),
                                        (1, 2, 1), (4, 1000, 1)])
def test_px_topk_equals_a_stable_sort_and_argmax_the_first_maximum(lib, rows, n, k, threads):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randint(-20, 20, (rows, n), generator=g).float() / 4   # many ties
    x[:, ::7] = float("-inf")                                       # as the logits processors set them
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values, indices = kernels._native_topk(x, k)
        first = kernels.argmax(x)
        got = kernels.topk(x, k)
    finally:
        torch.set_num_threads(before)
    order = torch.sort(x, dim=-1, descending=True, stable=True)     # ties: the lowest index first
    assert torch.equal(indices, order.indices[:, :k]) and torch.equal(values, order.values[:, :k])
    assert indices.dtype == torch.long and values.dtype == torch.float32
    assert torch.equal(first, x.argmax(-1))                         # argmax: the first maximum, documented
    expected = torch.topk(x, k)                                     # ties: torch's own order (topk leaves them to it)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_topk_equals_torch_on_distinct_scores_and_leaves_ties_and_nan_to_torch(lib, monkeypatch):
    x = torch.randn(2, 5000, generator=torch.Generator().manual_seed(9))
    calls = []
    real = torch.topk
    monkeypatch.setattr(torch, "topk", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert all(torch.equal(a, b) for a, b in zip(kernels.topk(x, 8), real(x, 8)))
    assert not calls                                                # distinct scores: the kernel
    x[0, 7] = x[0, 8] = 10.0                                        # a tie among the best: torch
    assert all(torch.equal(a, b) for a, b in zip(kernels.topk(x, 8), real(x, 8))) and calls
    monkeypatch.undo()
    x[1, 4321] = float("nan")
    got, expected = kernels.topk(x, 8), torch.topk(x, 8)
    assert torch.equal(got[1], expected[1]) and int(got[1][1, 0]) == 4321    # torch ranks NaN first


def test_beam_search_kernels_refuse_what_they_cannot_take():
    x = torch.randn(2, 30)
    for value in (x.double(), x.t().contiguous().t(), x.to("meta")):     # dtype, layout, device: torch runs
        kind = value.device.type
        if kind != "meta":
            torch.testing.assert_close(kernels.log_softmax(value), torch.log_softmax(value, dim=-1))
        assert kernels.topk(value, 3)[1].device.type == kind
    assert torch.equal(kernels.topk(x, 30)[1], torch.sort(x, descending=True, stable=True).indices)
    with pytest.raises(RuntimeError):                                # k past n: torch's own error
        kernels.topk(x, 31)


# ------------------------------------------------------------------------------- buffers under any default dtype
@pytest.fixture
def guarded_empty(monkeypatch):
    """torch.empty whose every buffer is followed by a guard as long as itself, filled with a byte pattern; returns
    a check that every guard is untouched (a kernel writing past a buffer's end changes it)."""
    real, guards = torch.empty, []

    def empty(*size, dtype=None, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        count = math.prod(shape)
        block = real(2 * count + 64, dtype=dtype or torch.get_default_dtype(), **kwargs)
        guards.append(block[count:].view(torch.uint8).fill_(0xA5))
        return block[:count].view(shape)

    monkeypatch.setattr(torch, "empty", empty)
    yield lambda: guards and all(bool((g == 0xA5).all()) for g in guards)
    monkeypatch.undo()


@pytest.fixture(params=[torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def default_dtype(request):
    before = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_write_only_their_buffers_under_any_default_dtype(lib, default_dtype, guarded_empty, dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 72, generator=g, dtype=torch.float32).to(dtype)
    x = torch.randn(3, 72, generator=g, dtype=torch.float32).to(dtype)
    q = torch.randn(2, 3, 4, 16, generator=g, dtype=torch.float32).to(dtype)
    k, v = (torch.randn(2, 3, 9, 16, generator=g, dtype=torch.float32).to(dtype) for _ in range(2))
    got_linear, got_attention = kernels.linear(x, w, None), kernels.attention(q, k, v, None)
    logits = torch.randn(3, 1001, generator=g, dtype=torch.float32)
    got_log_softmax, (_, got_top) = kernels.log_softmax(logits), kernels.topk(logits, 9)
    assert guarded_empty(), "a kernel wrote past the end of a buffer"
    torch.testing.assert_close(got_log_softmax, F.log_softmax(logits, dim=-1))
    assert torch.equal(got_top, torch.topk(logits, 9).indices)
    torch.testing.assert_close(got_linear.float(), F.linear(x.float(), w.float()), **tolerance(dtype))
    torch.testing.assert_close(got_attention.float(), F.scaled_dot_product_attention(q.float(), k.float(), v.float()),
                               **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_step_writes_only_its_buffers_under_any_default_dtype(lib, default_dtype, guarded_empty, dtype):
    model = small_model(activation="gelu", dtype=dtype)
    g = torch.Generator().manual_seed(2)
    enc = torch.randn(2, 11, 64, generator=g, dtype=torch.float32).to(dtype)
    keep = torch.ones(2, 11, dtype=torch.bool)
    tokens = [torch.randint(3, 120, (4, 1), generator=g) for _ in range(3)]
    got, cache = run_steps(model, enc, keep, 4, tokens)
    assert cache.native_plan, "the native layers did not run"
    assert guarded_empty(), "px_decoder_rows wrote past the end of a buffer"
    model.set_native(False)
    expected, _ = run_steps(model, enc, keep, 4, tokens)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    else:                                   # as in test_decoder_step_equals_torch_layers: no further from fp32
        exact, _ = run_steps(model.float(), enc.float(), keep, 4, tokens)
        ours_err, torch_err = (got - exact).abs().max(), (expected - exact).abs().max()
        assert ours_err <= 1.25 * torch_err + 1e-3, (ours_err, torch_err)


# ------------------------------------------------------------------------------------------------- the one switch
@pytest.fixture
def fast_path_calls(monkeypatch):
    """Counts every fast path taken: the decoder kernel, the attention and linear kernels, the slab route, the
    beam-search kernels."""
    calls = []
    for owner, name in ((native, "decoder_step"), (native, "attention"), (kernels, "linear"), (torch, "bmm"),
                        (native, "log_softmax"), (native, "topk")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


@pytest.mark.parametrize("how", ["model", "environment"])
def test_one_switch_selects_the_reference_everywhere(lib, monkeypatch, fast_path_calls, how):
    model = small_model(activation="gelu")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 120, (2, 15), generator=g)
    enc, keep = torch.randn(1, 13, 64, generator=g), torch.ones(1, 13, dtype=torch.bool)
    tokens = [torch.randint(3, 120, (2, 1), generator=g) for _ in range(4)]
    fast_tokens = model.generate(ids, num_beams=2, max_new_tokens=6)
    fast_logits, _ = run_steps(model, enc, keep, 2, tokens)
    assert {"decoder_step", "log_softmax", "topk"} <= set(fast_path_calls)
    with torch.no_grad():
        model.lm_head(torch.randn(1, 64))                             # a few-row linear outside the fused kernel
    assert "linear" in fast_path_calls
    fast_path_calls.clear()
    if how == "model":
        model.set_native(False)
    else:
        monkeypatch.setenv("PEGASUS_X_NATIVE", "0")
    assert not native.enabled(model.lm_head)
    ref_tokens = model.generate(ids, num_beams=2, max_new_tokens=6)
    ref_logits, ref_cache = run_steps(model, enc, keep, 2, tokens)
    with torch.no_grad():
        model.lm_head(torch.randn(1, 64))
    assert fast_path_calls == [] and not ref_cache.native_plan        # nothing but the torch reference ran
    assert torch.equal(fast_tokens, ref_tokens)
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-4, atol=1e-4)
    model.set_native(True)
    monkeypatch.delenv("PEGASUS_X_NATIVE", raising=False)
    run_steps(model, enc, keep, 2, tokens)
    assert "decoder_step" in fast_path_calls                         # switched back on


# ---------------------------------------------------------------------------------------------- devices and fits
def test_kernels_refuse_tensors_off_the_cpu():
    x, w = torch.randn(2, 64), torch.randn(300, 64)
    assert kernels.linear_fits(x, w, None) and kernels.linear_fits(x, w, torch.randn(300))
    assert not kernels.linear_fits(x, w.to("meta"), None)                # the weight's device, not only x's
    assert not kernels.linear_fits(x, w, torch.randn(300, device="meta"))
    assert not kernels.linear_fits(x, w.t().contiguous().t(), None)      # column-major weight
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 5, 16)
    assert kernels.attention_fits(q, k, k, None)
    assert not kernels.attention_fits(q, k.to("meta"), k.to("meta"), None)
    assert not kernels.attention_fits(q, k, k, torch.ones(1, 1, 1, 5, dtype=torch.bool, device="meta"))
