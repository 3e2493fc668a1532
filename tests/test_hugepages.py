"""Weights and decoder caches in 2 MB pages: the arena itself, and that loading and generation use it unchanged."""

from __future__ import annotations

import gc
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_kwargs
from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration
from pegasus_x.native import hugepages
import pegasus_x.cache as cache_module
from pegasus_x.cache import new_cache

linux = pytest.mark.skipif(sys.platform != "linux", reason="huge pages are advised on Linux only")


def _mapping(ptr: int) -> tuple[int, int, set[str]]:
    """(start, end, VmFlags) of the mapping of this process that holds address ``ptr``."""
    start = end = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                start, end = (lo, hi) if lo <= ptr < hi else (None, None)
            elif line.startswith("VmFlags:") and start is not None:
                return start, end, set(line.split()[1:])
    raise AssertionError(f"no mapping holds {ptr:#x}")


def test_arena_hands_out_aligned_consecutive_tensors():
    arena = hugepages.Arena(hugepages.nbytes((3, 5), torch.float32) + hugepages.nbytes((7,), torch.bfloat16))
    a = arena.empty((3, 5), torch.float32)
    b = arena.empty((7,), torch.bfloat16).copy_(torch.arange(7.0))
    assert a.shape == (3, 5) and a.dtype == torch.float32 and a.is_contiguous()
    assert b.dtype == torch.bfloat16 and torch.equal(b, torch.arange(7.0).to(torch.bfloat16))
    assert a.data_ptr() % hugepages.PAGE == 0                          # the block starts on a huge page
    assert b.data_ptr() == a.data_ptr() + hugepages.nbytes((3, 5), torch.float32)
    assert b.data_ptr() % hugepages.ALIGN == 0
    with pytest.raises(ValueError, match="full"):
        arena.empty((1,), torch.float32)


def test_arena_works_where_huge_pages_cannot_be_advised(monkeypatch, tmp_path):
    monkeypatch.setattr(hugepages, "supported", lambda: False)
    arena = hugepages.Arena(hugepages.nbytes((4, 4), torch.float32))
    t = arena.empty((4, 4), torch.float32).copy_(torch.eye(4))
    assert torch.equal(t, torch.eye(4)) and t.data_ptr() % hugepages.PAGE == 0
    saved = _saved(tmp_path)                                           # loading takes the plain path
    model = PegasusXForConditionalGeneration.from_pretrained(tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), saved.parameters()))


def test_tensors_keep_their_block_alive():
    t = hugepages.Arena(1 << 22).empty((1 << 20,), torch.float32)
    gc.collect()                                                       # the arena object itself is gone
    t.fill_(3.0)
    assert float(t.sum()) == 3.0 * (1 << 20)


@linux
def test_arena_is_advised_for_huge_pages():
    t = hugepages.Arena(1 << 22).empty((16,), torch.float32)
    assert "hg" in _mapping(t.data_ptr())[2]                           # MADV_HUGEPAGE took


def _saved(tmp_path, **overrides):
    torch.manual_seed(0)
    model = PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs(**overrides))).eval()
    model.save_pretrained(tmp_path)
    return model


@linux
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_weights_live_in_one_advised_block(tmp_path, dtype):
    saved = _saved(tmp_path)
    model = PegasusXForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype)
    start, end, flags = _mapping(model.lm_head.weight.data_ptr())
    assert "hg" in flags
    for name, p in model.named_parameters():
        assert start <= p.data_ptr() < end and p.data_ptr() % hugepages.ALIGN == 0, name
        assert p.dtype == dtype and torch.equal(p, dict(saved.named_parameters())[name].to(dtype)), name
    assert model.lm_head.weight is model.model.shared.weight                 # still tied


def test_fp16_checkpoint_loads_as_fp32_in_place(tmp_path):
    saved = _saved(tmp_path)
    state = {f"model.{k}": v.half() for k, v in saved.model.state_dict().items()
             if not k.endswith("embed_tokens.weight")}
    save_file(state, tmp_path / "model.safetensors")
    model = PegasusXForConditionalGeneration.from_pretrained(tmp_path)
    shared = model.model.shared.weight
    assert shared.dtype == torch.float32 and torch.equal(shared, saved.model.shared.weight.half().float())


@linux
def test_generation_cache_past_the_threshold_lives_in_advised_pages(monkeypatch):
    """(Below the threshold the cache is ordinary memory: test_cache.py checks that no arena is made. Its pages are
    not checked here: in the whole suite ordinary allocations were seen in advised pages, which a library's own
    advised buffers, freed back to malloc, would explain.)"""
    torch.manual_seed(0)
    model = PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs())).eval()
    states = torch.randn(2, 11, model.config.d_model)
    monkeypatch.setattr(cache_module, "HUGE_PAGES_FROM", 0)                        # as a large cache would
    cache = new_cache(model, states, torch.ones(2, 11, dtype=torch.bool), rows=4, max_len=9)
    for buf in (*cache.self_k, *cache.self_v, *cache.cross_k, *cache.cross_v):
        assert "hg" in _mapping(buf.data_ptr())[2] and buf.is_contiguous()
    k, v = model.get_decoder().layers[1].encoder_attn.project_kv(states)
    assert torch.equal(cache.cross_k[1], k) and torch.equal(cache.cross_v[1], v)
