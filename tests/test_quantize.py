"""Weight-only int8 (pegasus_x.quantize): the reference's error against fp32, the native int8 kernels against the
reference, the switch, save refusal, and the entry points (from_pretrained, Summarizer, CLI)."""

from __future__ import annotations

import ctypes
import dataclasses
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F

from conftest import run_steps, small_model
from pegasus_x import PegasusXForConditionalGeneration, native
from pegasus_x.cache import DecoderCache
from pegasus_x.errors import CheckpointError, ConfigError
from pegasus_x.native import abi, hugepages, kernels
from pegasus_x.quantize import (KV_DTYPES, Int8Linear, quantize_as_loaded, quantize_model, quantize_weight,
                                quantized, set_kv_dtype)



# ------------------------------------------------------------------------------------------------- reference
def test_quantize_weight_bounds_the_error_by_half_a_step_per_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 77, generator=g) * torch.logspace(-3, 1, 50)[:, None]     # rows of very different sizes
    w[7] = 0                                                                          # an all-zero row
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape and scale.shape == (50,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    err = (q.float() * scale[:, None] - w).abs().amax(dim=1)
    assert bool((err <= scale / 2 * (1 + 1e-5)).all())
    assert bool((q[7] == 0).all())


def test_quantize_weight_in_row_chunks_equals_whole(monkeypatch):
    w = torch.randn(37, 24, generator=torch.Generator().manual_seed(1))
    whole = quantize_weight(w)
    monkeypatch.setattr("pegasus_x.quantize.CHUNK_ROWS", 5)                            # 8 chunks, the last short
    arena = hugepages.Arena(hugepages.nbytes((37, 24), torch.int8) + hugepages.nbytes((37,), torch.float32))
    q, scale = quantize_weight(w, arena)
    assert torch.equal(q, whole[0]) and torch.equal(scale, whole[1])
    with pytest.raises(ValueError, match="full"):                                      # it used the arena
        arena.empty((1,), torch.int8)


def test_quantize_model_replaces_decoder_linears_and_head_only():
    model = small_model()
    head = model.lm_head.weight.detach().clone()
    encoder_fc1 = model.model.encoder.layers[0].fc1
    quantize_model(model, "int8")
    int8 = {name for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    per_layer = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 "encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj", "encoder_attn.out_proj",
                 "fc1", "fc2"}
    assert int8 == {f"model.decoder.layers.{i}.{n}" for i in range(3) for n in per_layer} | {"lm_head"}
    assert model.model.encoder.layers[0].fc1 is encoder_fc1                          # the encoder stays
    assert torch.equal(model.model.shared.weight, head)                              # lookups stay exact
    torch.testing.assert_close(model.lm_head.dequantize(), head, rtol=0, atol=float(model.lm_head.scale.max()) / 2)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model, "int8")
    with pytest.raises(ConfigError, match="int4"):
        quantize_model(small_model(), "int4")


def test_reference_logits_stay_close_to_fp32():
    model = small_model(seed=1)
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(3, 120, (2, 17), generator=g), torch.randint(3, 120, (2, 9), generator=g)
    with torch.no_grad():
        exact = model(ids, labels=labels).logits
        model.set_native(False)
        quantize_model(model, "int8")
        got = model(ids, labels=labels).logits
    rel = (got - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert float(rel.max()) < 0.05, float(rel.max())
    assert float((got.argmax(-1) == exact.argmax(-1)).float().mean()) >= 0.9
    assert not torch.equal(got, exact)                                                 # it did quantize


# ---------------------------------------------------------------------------------------------- native kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
# (37, 2051): four rows of 2,051 inputs outgrow L1, so weight rows go in pairs (and one alone: 37 is odd).
@pytest.mark.parametrize("shape", [(384, 256), (385, 200), (7, 33), (1001, 72), (37, 2051)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_int8_linear_kernel_equals_reference(lib, dtype, rows, shape, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(rows * shape[0] + threads)
        layer = Int8Linear(*quantize_weight(torch.randn(*shape, generator=g)),
                           torch.randn(shape[0], generator=g).to(dtype))
        x = (torch.randn(rows, 1, shape[1], generator=g) / shape[1] ** 0.5).to(dtype)
        for bias in (None, layer.bias):
            assert kernels.linear_int8_fits(x, layer.qweight, layer.scale, bias)
            got = kernels.linear_int8(x, layer.qweight, layer.scale, bias)
            expected = F.linear(x.float(), layer.dequantize(), None if bias is None else bias.float())
            assert got.dtype == dtype and got.shape == (rows, 1, shape[0])
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(got.float(), expected, **tol)
    finally:
        torch.set_num_threads(before)


def test_int8_linear_kernel_refuses_what_it_cannot_take(lib):
    q, s = quantize_weight(torch.randn(16, 8))
    x = torch.randn(1, 8)
    assert kernels.linear_int8_fits(torch.randn(kernels.MAX_DRAFT_ROWS, 8), q, s, None)
    assert not kernels.linear_int8_fits(torch.randn(kernels.MAX_DRAFT_ROWS + 1, 8), q, s, None)
    assert not kernels.linear_int8_fits(x, q.t(), s, None)                             # wrong shape
    assert not kernels.linear_int8_fits(x, q[:, ::2].repeat(1, 2), s[:8], None)        # scales of another size
    assert not kernels.linear_int8_fits(x, q, s.double(), None)
    assert not kernels.linear_int8_fits(x.double(), q, s, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inputs,rows", [(1, 1), (2, 2), (1, 4), (2, 8), (4, 16)],
                         ids=["1x1", "2x1", "1x4", "2x4", "4x4"])
def test_int8_decoder_step_equals_reference(lib, monkeypatch, dtype, inputs, rows):
    model = quantize_model(small_model(seed=2, dtype=dtype, activation="gelu"))
    g = torch.Generator().manual_seed(rows)
    enc = torch.randn(inputs, 13, 64, generator=g).to(dtype)
    keep = torch.ones(inputs, 13, dtype=torch.bool)
    keep[-1, 9:] = False
    tokens = [torch.randint(3, 120, (rows, 1), generator=g) for _ in range(6)]
    calls = []
    real = native.decoder_step
    monkeypatch.setattr(native, "decoder_step", lambda *a: calls.append(1) or real(*a))
    got, _ = run_steps(model, enc, keep, rows, tokens)
    assert len(calls) == len(tokens)                                                   # the fused int8 step ran
    model.set_native(False)
    expected, _ = run_steps(model, enc, keep, rows, tokens)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    else:
        # Ours keeps activations in fp32 between the operations, the reference rounds after each. Both are measured
        # against fp32 arithmetic on the same weights: ours must be no further from it.
        exact, _ = run_steps(model.float(), enc.float(), keep, rows, tokens)
        ours_err, torch_err = (got - exact).abs().max(), (expected - exact).abs().max()
        assert ours_err <= 1.25 * torch_err + 1e-3, (ours_err, torch_err)


@pytest.mark.parametrize("how", ["model", "environment"])
def test_one_switch_selects_the_int8_reference(lib, monkeypatch, how):
    model = quantize_model(small_model(seed=3))
    calls = []
    for owner, name in ((native, "decoder_step"), (kernels, "linear_int8")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    ids = torch.randint(3, 120, (1, 15), generator=torch.Generator().manual_seed(4))
    fast = model.generate(ids, num_beams=2, max_new_tokens=6)
    assert {"decoder_step", "linear_int8"} <= set(calls)
    calls.clear()
    if how == "model":
        model.set_native(False)
    else:
        monkeypatch.setenv("PEGASUS_X_NATIVE", "0")
    assert torch.equal(model.generate(ids, num_beams=2, max_new_tokens=6), fast)
    assert calls == []


def test_abi_handshake_covers_the_int8_scales(lib):
    expected = abi.expected()
    assert expected["abi"] == abi.VERSION >= 3
    for name in abi.SCALES.values():
        assert f"px_layer.{name}" in expected
    abi.check(lib)                                                                     # the loaded library agrees
    assert isinstance(lib.px_linear_int8, ctypes._CFuncPtr)


# ---------------------------------------------------------------------------------------------- entry points
def test_save_refused_and_from_pretrained_quantizes(tmp_path):
    model = small_model(seed=5)
    model.save_pretrained(tmp_path / "fp32")
    loaded = PegasusXForConditionalGeneration.from_pretrained(tmp_path / "fp32", quantize="int8")
    assert quantized(loaded) and not quantized(PegasusXForConditionalGeneration.from_pretrained(tmp_path / "fp32"))
    torch.testing.assert_close(loaded.lm_head.dequantize(), model.lm_head.weight,
                               rtol=0, atol=float(loaded.lm_head.scale.max()) / 2)
    with pytest.raises(CheckpointError, match="quantize='int8'"):
        loaded.save_pretrained(tmp_path / "int8")
    assert not (tmp_path / "int8").exists()
    with pytest.raises(ConfigError, match="quantize"):
        PegasusXForConditionalGeneration.from_pretrained(tmp_path / "fp32", quantize="int4")


def _untied(model):
    """A model like ``model`` whose LM head has weights of its own."""
    torch.manual_seed(9)
    cfg = dataclasses.replace(model.config, tie_word_embeddings=False)
    return PegasusXForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_quantizing_at_load_equals_quantizing_the_loaded_model(tmp_path, tied, dtype, fmt):
    model = small_model(seed=8) if tied else _untied(small_model())
    model.save_pretrained(tmp_path)
    if fmt == "bin":                                              # read whole, then quantized
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("embed_tokens.weight")}
        torch.save(state, tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    got = PegasusXForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype, quantize="int8")
    expected = quantize_model(PegasusXForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype))
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert list(got_state) == list(expected_state) and "lm_head.qweight" in got_state
    for name, t in expected_state.items():
        assert got_state[name].dtype == t.dtype and torch.equal(got_state[name], t), name
    assert all(p.device.type == "cpu" for p in got.state_dict().values())         # nothing left on meta
    assert (got.lm_head.bias is None) and (got.model.shared.weight.dtype == got.dtype)
    ids = torch.randint(3, 120, (1, 11), generator=torch.Generator().manual_seed(0))
    assert torch.equal(got.generate(ids, max_new_tokens=5), expected.generate(ids, max_new_tokens=5))


def _held_bytes(model) -> int:
    """Bytes of every distinct block of memory the model's tensors keep alive."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*model.parameters(), *model.buffers())}
    return sum(storages.values())


@pytest.mark.skipif(not hugepages.supported() or sys.platform != "linux",
                    reason="weights load into huge pages on Linux only")
def test_quantizing_at_load_keeps_no_fp32_copy_of_the_quantized_weights(tmp_path):
    """The loaded int8 model holds its tensors' bytes and nothing more: one block for what stays in the model's
    dtype, one for the int8 weights and scales (each a huge page of slack for alignment) — no fp32 decoder or
    LM-head weight stays behind in the load's block."""
    small_model(seed=8).save_pretrained(tmp_path)
    exact = PegasusXForConditionalGeneration.from_pretrained(tmp_path)
    int8 = PegasusXForConditionalGeneration.from_pretrained(tmp_path, quantize="int8")

    def tensor_bytes(model):
        return sum(hugepages.nbytes(tuple(t.shape), t.dtype) for t in (*model.parameters(), *model.buffers()))

    assert _held_bytes(exact) == tensor_bytes(exact) + hugepages.PAGE                # one block, as loaded
    assert _held_bytes(int8) == tensor_bytes(int8) + 2 * hugepages.PAGE
    layers = {name: m for name, m in int8.named_modules() if isinstance(m, Int8Linear)}
    replaced = sum(hugepages.nbytes(tuple(m.qweight.shape), torch.float32) for name, m in layers.items()
                   if name != "lm_head")                       # the tied head's fp32 weight is the embedding, kept
    added = sum(hugepages.nbytes(tuple(m.qweight.shape), torch.int8) + hugepages.nbytes(tuple(m.scale.shape),
                                                                                      torch.float32)
                for m in layers.values())
    assert tensor_bytes(exact) - tensor_bytes(int8) == replaced - added > 0


def test_quantize_model_lets_each_replaced_weight_go():
    model = small_model()
    fc1 = weakref.ref(model.get_decoder().layers[0].fc1.weight)
    quantize_model(model, "int8")
    assert fc1() is None


def test_summarizer_and_cli_take_quantize(tmp_path, capsys, monkeypatch):
    from pegasus_x import Summarizer
    from pegasus_x.cli import main
    from pegasus_x.summarize import demo_model_path

    if demo_model_path() is None:
        pytest.skip("this install has no bundled demo model")
    seen = []
    real = quantize_as_loaded
    monkeypatch.setattr("pegasus_x.quantize.quantize_as_loaded", lambda *a: seen.append(a[1]) or real(*a))
    summarizer = Summarizer(None, device="cpu", quantize="int8", max_new_tokens=6)
    assert quantized(summarizer.model) and seen == ["int8"]
    text = "join lines of two files on a common field " * 20
    assert isinstance(summarizer(text), str)
    exact = Summarizer(None, device="cpu", max_new_tokens=6).model
    assert not quantized(exact)
    again = Summarizer(exact, summarizer.tokenizer, quantize="int8")
    assert again.model is exact and quantized(exact)                                  # a model object, in place
    with pytest.raises(ConfigError, match="int4"):
        Summarizer(None, device="cpu", quantize="int4")
    page = tmp_path / "page.txt"
    page.write_text(text)
    seen.clear()
    assert main(["summarize", str(page), "--quantize", "int8", "--device", "cpu", "--max-new-tokens", "6"]) == 0
    assert seen == ["int8"] and capsys.readouterr().out.strip()
    assert main(["summarize", str(page), "--quantize", "int4"]) == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_evaluate_takes_quantize(tmp_path, monkeypatch):
    from pegasus_x.cli import main
    from pegasus_x.training import commands

    model = small_model(seed=6)
    model.save_pretrained(tmp_path / "model")
    loads = []
    monkeypatch.setattr(commands.PegasusXForConditionalGeneration, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(k) or (_ for _ in ()).throw(SystemExit(0))))
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"source": "a b c", "target": "a"}\n')
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(data), "--quantize", "int8",
              "--device", "cpu"])
    assert loads and loads[0]["quantize"] == "int8"
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(data), "--quantize", "int8",
                 "--device", "meta"]) == 2


def test_from_pretrained_summarizer_and_cli_take_kv_dtype(tmp_path, capsys, monkeypatch):
    from pegasus_x import Summarizer
    from pegasus_x.cli import main
    from pegasus_x.summarize import demo_model_path
    from pegasus_x.training import commands

    small_model(seed=6).save_pretrained(tmp_path / "model")
    model = PegasusXForConditionalGeneration.from_pretrained(tmp_path / "model", kv_dtype="int8")
    assert model.get_decoder().cross_kv_dtype == torch.int8 and not quantized(model)
    with pytest.raises(ConfigError, match="'fp16'"):
        PegasusXForConditionalGeneration.from_pretrained(tmp_path / "model", kv_dtype="fp16")
    with pytest.raises(ConfigError, match="CPU decoding"):
        set_kv_dtype(small_model().to("meta"), "bf16")
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"source": "a b c", "target": "a"}\n')
    monkeypatch.setattr(commands, "resolve_device", lambda _: torch.device("cuda"))     # a GPU, as far as it knows
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(data), "--kv-dtype", "int8"]) == 2
    assert "--kv-dtype int8 is for CPU decoding" in capsys.readouterr().err
    monkeypatch.undo()
    if demo_model_path() is None:
        pytest.skip("this install has no bundled demo model")
    summarizer = Summarizer(None, device="cpu", kv_dtype="bf16", max_new_tokens=4)
    assert summarizer.model.get_decoder().cross_kv_dtype == torch.bfloat16
    plain = Summarizer(None, device="cpu").model
    assert getattr(plain.get_decoder(), "cross_kv_dtype", None) is None
    again = Summarizer(plain, summarizer.tokenizer, kv_dtype="int8")
    assert again.model is plain and plain.get_decoder().cross_kv_dtype == torch.int8        # a model object
    with pytest.raises(ConfigError, match="int4"):
        Summarizer(None, device="cpu", kv_dtype="int4")
    loads = []
    real = PegasusXForConditionalGeneration.from_pretrained.__func__
    monkeypatch.setattr(PegasusXForConditionalGeneration, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(k) or real(cls, *a, **k)))
    page = tmp_path / "page.txt"
    page.write_text("join lines of two files on a common field " * 5)
    assert main(["summarize", str(page), "--kv-dtype", "int8", "--device", "cpu", "--max-new-tokens", "4"]) == 0
    assert loads[-1]["kv_dtype"] == "int8" and capsys.readouterr().out.strip()
    assert main(["summarize", str(page), "--kv-dtype", "fp16"]) == 2
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ dtype auto
def test_auto_dtype_follows_the_cpu_flags(monkeypatch):
    from pegasus_x import devices

    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    dtype, why = devices.auto_dtype("cpu")
    assert dtype == torch.float32 and "no AVX512-BF16 or AMX" in why
    for flag in ("avx512_bf16", "amx_bf16"):
        # bf16 hardware: still fp32 (bf16 logits are off by more than the automatic choice allows), and it says so
        monkeypatch.setattr(devices, "cpu_flags", lambda flag=flag: frozenset({"avx2", flag}))
        dtype, why = devices.auto_dtype("cpu")
        assert dtype == torch.float32 and flag in why and "--dtype bf16" in why
        assert "benchmarks/int8_accuracy.py" in why                     # the script that measures it, no figure


def test_info_says_which_dtype_auto_picks(tmp_path, capsys):
    from pegasus_x import devices
    from pegasus_x.cli import main

    small_model().save_pretrained(tmp_path / "model")
    assert main(["info", str(tmp_path / "model")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("dtype auto"))
    assert devices.auto_dtype("cpu")[1] in line and line.split()[2].startswith("fp32")


# ----------------------------------------------------------------------------- bf16 and int8 cross keys/values
@pytest.mark.parametrize("kv_dtype", ["bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 4, 16])          # 16: past MAX_ROWS, px_decoder_rows
def test_narrow_cross_keys_native_equals_reference_and_stays_close(lib, rows, kv_dtype):
    model = quantize_model(small_model(seed=7), "int8", kv_dtype=kv_dtype)
    g = torch.Generator().manual_seed(rows)
    enc, keep = torch.randn(1, 13, 64, generator=g), torch.ones(1, 13, dtype=torch.bool)
    keep[0, 10:] = False
    tokens = [torch.randint(3, 120, (rows, 1), generator=g) for _ in range(5)]
    got, cache = run_steps(model, enc, keep, rows, tokens)
    assert cache.cross_k[0].dtype == KV_DTYPES[kv_dtype] and cache.native_plan     # the fused step took them
    assert (cache.cross_k_scale is None) == (kv_dtype != "int8")
    model.set_native(False)
    expected, _ = run_steps(model, enc, keep, rows, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    model.get_decoder().cross_kv_dtype = None                                       # fp32 keys/values
    exact, _ = run_steps(model, enc, keep, rows, tokens)
    assert float((got - exact).abs().max()) < 0.05 * float(exact.abs().max())
    assert not torch.equal(got, exact)
    with pytest.raises(ConfigError, match="kv_dtype"):
        quantize_model(small_model(), "int8", kv_dtype="fp16")


@pytest.mark.parametrize("kv_dtype", ["bf16", "int8"])
def test_narrow_cross_keys_beam_search_equals_the_reference_as_inputs_leave(lib, monkeypatch, kv_dtype):
    """A padded batch of 3 × 3 beams (9 rows: the many-row fused step) whose inputs finish at different steps (the
    cache moves the kept ones down, with their scales, then runs the few-row step): the same tokens as the torch
    reference path."""
    moves = []
    real = DecoderCache.keep_inputs
    monkeypatch.setattr(DecoderCache, "keep_inputs", lambda self, inputs: moves.append(inputs.tolist())
                        or real(self, inputs))
    model = small_model(seed=8)
    with torch.no_grad():
        model.get_input_embeddings().weight[1] *= 3.0                  # EOS competitive: inputs end early
    quantize_model(model, "int8", kv_dtype=kv_dtype)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 120, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 25:] = mask[2, 11:] = 0
    options = dict(attention_mask=mask, num_beams=3, max_new_tokens=30, length_penalty=0.8)
    with torch.no_grad():
        fast = model.generate(ids, **options)
        assert any(i != j for kept in moves for j, i in enumerate(kept))    # an input moved down
        model.set_native(False)
        assert torch.equal(model.generate(ids, **options), fast)


# ------------------------------------------------------------------------------------------------ with lookahead
@pytest.mark.parametrize("kv_dtype", [None, "bf16", "int8"])
def test_lookahead_on_an_int8_model_gives_plain_greedys_tokens(lib, monkeypatch, kv_dtype):
    """Lookahead's multi-position pass runs the fused kernel on int8 weights (and narrower cross keys/values) and
    still gives plain greedy's tokens."""
    calls = []
    real = native.decoder_rows
    monkeypatch.setattr(native, "decoder_rows", lambda *a: calls.append(1) or real(*a))
    model = quantize_model(small_model(seed=3), "int8", kv_dtype=kv_dtype)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 120, (2, 30), generator=g)
    ids[:, 10:20] = ids[:, :10]                                     # repeats: drafts found in the source
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=24, num_beams=1)
        out = model.generate(ids, max_new_tokens=24, num_beams=1, prompt_lookup_num_tokens=4,
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert out.decoder_passes <= plain.shape[1] - 1
    assert calls                                                    # the passes took the fused kernel
