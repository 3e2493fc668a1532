"""The decoder cache (pegasus_x.cache) on its own: growth policy, what a growth keeps, beam reorders, inputs leaving
the batch, and the cross-attention part. Generation through growing buffers: test_generate.py."""

from __future__ import annotations

import itertools

import pytest
import torch

import pegasus_x.cache as cache_module
from conftest import tiny_kwargs
from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration
from pegasus_x.cache import new_cache, next_capacity


def test_next_capacity_doubles_within_the_limit():
    assert next_capacity(5, 4, 100) == 8           # at least double
    assert next_capacity(20, 4, 100) == 20         # at least what is needed
    assert next_capacity(90, 64, 100) == 100       # never past the limit
    assert next_capacity(100, 100, 100) == 100


@pytest.fixture
def model():
    torch.manual_seed(0)
    return PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs())).eval()


def _write(cache, steps: int, seed: int):
    """Write ``steps`` positions of random keys/values into every layer, as decode steps do; returns them."""
    g = torch.Generator().manual_seed(seed)
    R, H, _, hd = cache.self_k[0].shape
    written = []
    for _ in range(steps):
        kv = [(torch.randn(R, H, 1, hd, generator=g), torch.randn(R, H, 1, hd, generator=g))
              for _ in cache.self_k]
        for layer, (k, v) in enumerate(kv):
            cache.update(layer, k, v)
        cache.length += 1
        written.append(kv)
    # (layers, R, H, steps, hd) for keys and for values
    keys = torch.stack([torch.cat([step[layer][0] for step in written], 2) for layer in range(len(cache.self_k))])
    values = torch.stack([torch.cat([step[layer][1] for step in written], 2) for layer in range(len(cache.self_k))])
    return keys, values


def _filled(cache):
    n = cache.length
    return torch.stack([k[:, :, :n] for k in cache.self_k]), torch.stack([v[:, :, :n] for v in cache.self_v])


@pytest.mark.parametrize("elements", [None, 2 * 4 * 32], ids=["whole", "slices-of-4-positions"])
def test_cross_part_is_computed_once_per_input(model, monkeypatch, elements):
    if elements:    # projected 4 positions at a time: 4 + 4 + 1
        monkeypatch.setattr(cache_module, "PROJECT_ELEMENTS", elements)
    states, keep = torch.randn(2, 9, 32), torch.ones(2, 9, dtype=torch.bool)
    cache = new_cache(model, states, keep, rows=6, max_len=20)          # 3 beams per input
    assert cache.encoder_keep is None                                   # no padding: no mask to apply
    for layer, k, v in zip(model.get_decoder().layers, cache.cross_k, cache.cross_v):
        expected_k, expected_v = layer.encoder_attn.project_kv(states)
        assert k.shape == expected_k.shape and k.shape[0] == 2
        torch.testing.assert_close(k, expected_k, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v, expected_v, atol=1e-6, rtol=1e-6)
    keep[1, 7:] = False
    assert torch.equal(new_cache(model, states, keep, 6, 20).encoder_keep[:, 0, 0], keep)


def test_growth_keeps_what_was_written_and_stops_at_the_limit(model, monkeypatch):
    monkeypatch.setattr(cache_module, "FIRST_CHUNK", 3)
    cache = new_cache(model, torch.randn(2, 9, 32), torch.ones(2, 9, dtype=torch.bool), rows=2, max_len=10)
    assert cache.max_len == 3
    keys, values = _write(cache, 7, seed=1)
    assert cache.max_len == 10 > 7                                      # 3 → 6 → 10 (the limit)
    filled_k, filled_v = _filled(cache)
    assert torch.equal(filled_k, keys) and torch.equal(filled_v, values)
    _write(cache, 3, seed=2)
    with pytest.raises(RuntimeError, match="holds 10 positions, 11 requested"):
        cache.reserve(1)


def test_reorder_and_keep_inputs_move_whole_rows_in_place(model, monkeypatch):
    monkeypatch.setattr(cache_module, "FIRST_CHUNK", 4)
    states, keep = torch.randn(3, 9, 32), torch.ones(3, 9, dtype=torch.bool)
    keep[2, 5:] = False
    cache = new_cache(model, states, keep, rows=6, max_len=12)          # 3 inputs × 2 beams
    keys, values = _write(cache, 3, seed=3)
    rows = torch.tensor([1, 1, 2, 3, 5, 4])
    cache.reorder(rows)
    keys, values = keys[:, rows], values[:, rows]
    filled_k, filled_v = _filled(cache)
    assert torch.equal(filled_k, keys) and torch.equal(filled_v, values)
    cross = [k.clone() for k in cache.cross_k + cache.cross_v]
    where = [k.data_ptr() for k in cache.cross_k + cache.cross_v] + [cache.keys.data_ptr()]
    cache.keep_inputs(torch.tensor([0, 2]))                             # input 1 finished: its 2 rows leave
    # Input 2 moved down in place: the same buffers, viewed to their first rows, nothing allocated.
    assert [k.data_ptr() for k in cache.cross_k + cache.cross_v] + [cache.keys.data_ptr()] == where
    kept = [0, 1, 4, 5]
    filled_k, filled_v = _filled(cache)
    assert torch.equal(filled_k, keys[:, kept]) and torch.equal(filled_v, values[:, kept])
    assert all(k.shape[0] == 2 and torch.equal(k, c[[0, 2]]) for k, c in zip(cache.cross_k + cache.cross_v, cross))
    assert torch.equal(cache.encoder_keep[:, 0, 0], keep[[0, 2]])
    assert cache.self_k[0].shape[0] == 4 and cache.self_k[0].is_contiguous() and cache.native_plan is None
    # Steps, a reorder and a growth past FIRST_CHUNK go on over the viewed buffers.
    more_k, more_v = _write(cache, 3, seed=6)                           # 6 positions: the buffers grow to 8
    assert cache.max_len == 8
    keys, values = torch.cat([keys[:, kept], more_k], 3), torch.cat([values[:, kept], more_v], 3)
    order = torch.tensor([1, 1, 3, 2])
    cache.reorder(order)
    filled_k, filled_v = _filled(cache)
    assert torch.equal(filled_k, keys[:, order]) and torch.equal(filled_v, values[:, order])


@pytest.mark.parametrize("R", [3, 4])
def test_reorder_equals_a_gather_for_every_map_of_rows(model, R):
    """Every map of R rows onto R rows (chains, fan-outs, swaps, cycles) leaves what indexing a copy gives."""
    states, keep = torch.randn(1, 5, 32), torch.ones(1, 5, dtype=torch.bool)
    cache = new_cache(model, states, keep, rows=R, max_len=6)
    _write(cache, 3, seed=4)
    start = cache.keys.clone(), cache.values.clone()
    for rows in itertools.product(range(R), repeat=R):
        cache.keys.copy_(start[0])
        cache.values.copy_(start[1])
        cache.reorder(torch.tensor(rows))
        n = cache.length
        assert torch.equal(cache.keys[:, :, :, :n], start[0][:, list(rows), :, :n]), rows
        assert torch.equal(cache.values[:, :, :, :n], start[1][:, list(rows), :, :n]), rows


def test_int8_cross_part_holds_each_row_within_half_a_step_and_leaves_with_its_input(model):
    model.get_decoder().cross_kv_dtype = torch.int8                     # quantize.py's kv_dtype="int8"
    states, keep = torch.randn(3, 9, 32), torch.ones(3, 9, dtype=torch.bool)
    cache = new_cache(model, states, keep, rows=3, max_len=12)
    for layer, k, v, ks, vs in zip(model.get_decoder().layers, cache.cross_k, cache.cross_v, cache.cross_k_scale,
                                   cache.cross_v_scale):
        assert k.dtype == v.dtype == torch.int8 and ks.shape == vs.shape == k.shape[:3] == (3, 4, 9)
        for q, scale, exact in zip((k, v), (ks, vs), layer.encoder_attn.project_kv(states)):
            err = (q.float() * scale[..., None] - exact).abs().amax(-1)
            assert bool((err <= scale / 2 * (1 + 1e-5)).all()) and int(q.abs().max()) == 127
    before = [t.clone() for t in cache.cross_k_scale + cache.cross_v_scale]
    where = [t.data_ptr() for t in cache.cross_k_scale + cache.cross_v_scale]
    cache.keep_inputs(torch.tensor([1, 2]))                             # input 0 finished: the others move down
    assert [t.data_ptr() for t in cache.cross_k_scale + cache.cross_v_scale] == where
    assert all(torch.equal(t, b[[1, 2]]) for t, b in zip(cache.cross_k_scale + cache.cross_v_scale, before))
    assert cache.cross(0)[2] is cache.cross_k_scale[0] and cache.cross(1)[3] is cache.cross_v_scale[1]


def test_only_caches_past_the_threshold_take_huge_pages(model, monkeypatch):
    """Small caches come from ordinary (recycled) memory; from HUGE_PAGES_FROM bytes on, one huge-page arena."""
    arenas = []

    class Spy:
        def __init__(self, size):
            arenas.append(size)

        def empty(self, shape, dtype):
            return torch.zeros(shape, dtype=dtype)

    monkeypatch.setattr(cache_module.hugepages, "supported", lambda: True)
    monkeypatch.setattr(cache_module.hugepages, "Arena", Spy)
    states, keep = torch.randn(2, 9, model.config.d_model), torch.ones(2, 9, dtype=torch.bool)
    cache = new_cache(model, states, keep, 4, 12)
    assert arenas == []
    assert cache.cross_k[0].shape == (2, model.config.decoder_attention_heads, 9,
                                      model.config.d_model // model.config.decoder_attention_heads)
    floats = cache_module.HUGE_PAGES_FROM // 4
    cache_module._allocator(torch.device("cpu"), torch.float32, [(floats - 16,)])((floats - 16,))
    assert arenas == []
    cache_module._allocator(torch.device("cpu"), torch.float32, [(floats,)])((floats,))
    assert arenas == [cache_module.HUGE_PAGES_FROM]
