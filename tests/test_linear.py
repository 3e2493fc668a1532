"""The few-row CPU routes of pegasus_x.native.linear (native kernels, else bmm slabs): same numbers as F.linear, each
taken exactly when it should be. The native kernels themselves are tested in test_native.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import pegasus_x.native.linear as lin
from conftest import random_batch, reference_twin
from pegasus_x.native import kernels, loader


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def no_native(monkeypatch):
    """As on a machine without a C compiler: the slab route is the few-row route."""
    monkeypatch.setattr(loader, "library", lambda: None)


@pytest.fixture
def bmm_calls(monkeypatch):
    """Counts torch.bmm calls: the slab route is the only bmm in a linear."""
    calls = []
    real = torch.bmm

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "bmm", spy)
    return calls


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("out_features", [384, 385, 1001])
@pytest.mark.parametrize("bias", [False, True])
def test_slab_route_equals_f_linear(no_native, threads, bmm_calls, parts, rows, out_features, bias):
    threads(parts)
    g = torch.Generator().manual_seed(rows * out_features + parts)
    w = torch.randn(out_features, 200, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    x = torch.randn(rows, 1, 200, generator=g) / 200 ** 0.5          # (R, T=1, D) as in a decode step; outputs O(1)
    with torch.inference_mode():
        got = lin.linear(x, w, b)
    expected = F.linear(x, w, b)
    assert len(bmm_calls) == 1 and bmm_calls[0][0] == parts           # the route was taken, one slab per thread
    assert got.shape == expected.shape == (rows, 1, out_features)
    assert got.is_contiguous()                                        # row-major, like F.linear: the next kernels need it
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["many rows", "one thread", "grad", "bf16", "small", "non-contiguous"])
def test_other_products_use_f_linear(no_native, threads, bmm_calls, case):
    threads(1 if case == "one thread" else 2)
    w = torch.randn(512, 64)
    x = torch.randn(lin.SMALL_ROWS + 1 if case == "many rows" else 1, 64)
    if case == "bf16":
        w, x = w.bfloat16(), x.bfloat16()
    if case == "small":
        w = w[:100]
    if case == "non-contiguous":
        w = torch.randn(64, 512).t()
    if case == "grad":
        w.requires_grad_(True)
        out = lin.linear(x, w)
        out.sum().backward()                                          # autograd works through the fallback
        assert w.grad is not None
    else:
        with torch.no_grad():
            out = lin.linear(x, w)
    assert not bmm_calls
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(), dict(num_beams=4, length_penalty=0.8)], ids=["greedy", "beam4"])
def test_generation_through_slabs_matches_reference(no_native, tmp_path, threads, bmm_calls, options):
    """A model wide enough for the slab route (and an odd vocabulary: a leftover row) still generates the
    reference's tokens."""
    threads(2)
    ref, ours, _ = reference_twin(tmp_path, seed=4, init_std=0.5, d_model=128, vocab_size=301,
                                  decoder_ffn_dim=256, encoder_ffn_dim=256)
    ours.eval()
    ids, mask, _ = random_batch([20, 11], ref.config.vocab_size, seed=2)
    if options:                                                       # 4 beams of one input: 4 rows
        ids, mask = ids[:1], mask[:1]
    options = dict(max_new_tokens=10, **options)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref.generate(ids, attention_mask=mask, **options)
    bmm_calls.clear()
    got = ours.generate(ids, attention_mask=mask, **options)
    assert bmm_calls, "the slab route was not taken"
    if options.get("num_beams", 1) > 1:                               # the reference pads beams with EOS (pad or eos)
        for row in expected:
            ends = (row[1:] == 1).nonzero()
            if len(ends):
                row[int(ends[0]) + 2:] = 0
    assert torch.equal(got, expected), f"\n{got}\n{expected}"


@pytest.fixture
def native_calls(monkeypatch):
    if loader.library() is None:
        pytest.skip("no C compiler here: the native kernels are not built; install cc or gcc to run it")
    calls = []
    for name in ("linear", "gemm"):
        real = getattr(kernels, name)

        def spy(*args, _name=name, _real=real, **kwargs):
            calls.append((_name, args[1].dtype))
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 8, 9, kernels.MAX_DRAFT_ROWS, kernels.MAX_DRAFT_ROWS + 1])
def test_native_route_taken_for_few_rows(native_calls, bmm_calls, dtype, rows):
    w, x = torch.randn(300, 64, dtype=dtype), torch.randn(rows, 64, dtype=dtype)
    with torch.no_grad():
        got = lin.linear(x, w)
    # Past MAX_ROWS and up to MAX_DRAFT_ROWS: px_linear_rows (lookahead's passes); beyond, px_gemm where the CPU
    # prefers it (fp32), else torch's GEMM.
    many = "gemm" if dtype == torch.float32 and kernels.gemm_preferred() else None
    assert native_calls == ([("linear", dtype)] if rows <= kernels.MAX_DRAFT_ROWS else [(many, dtype)] if many else [])
    assert not bmm_calls
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, F.linear(x, w), rtol=tol, atol=tol)


@pytest.mark.parametrize("parts", [2, 3])
def test_slab_route_starts_at_its_named_width(no_native, threads, bmm_calls, parts):
    """MIN_SLAB_OUTPUTS output features per thread is the narrowest weight the slab route takes."""
    threads(parts)
    x = torch.randn(1, 64)
    with torch.no_grad():
        lin.linear(x, torch.randn(lin.MIN_SLAB_OUTPUTS * parts - 1, 64))
        assert not bmm_calls
        lin.linear(x, torch.randn(lin.MIN_SLAB_OUTPUTS * parts, 64))
    assert len(bmm_calls) == 1 and bmm_calls[0][0] == parts
