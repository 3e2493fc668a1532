"""Parity of the model with the reference (transformers pegasus_x) on identical random weights, invariants, and
the encoder beyond the reference: bf16 accuracy, fp16 refusal, torch.compile, long inputs."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_batch, reference_twin, sources_containing, tiny_kwargs
from pegasus_x import ConfigError, PegasusXConfig, PegasusXForConditionalGeneration, PegasusXModel
from pegasus_x.model import shift_tokens_right, sinusoidal_positions

K = 8  # block size of the tiny config
LENGTHS = [1, 7, K - 1, K, K + 1, int(3.5 * K)]
VARIANTS = {
    "stagger-relu-g5": {},
    "nostagger-gelu-g16": dict(stagger_local_blocks=False, activation_function="gelu", num_global_tokens=16),
    "stagger-g1": dict(num_global_tokens=1),
}


def _compare(ref, ours, ids, mask, dec, backend="sdpa"):
    ours.set_attention_backend(backend)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        o = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    enc = (o.encoder_last_hidden_state - r.encoder_last_hidden_state).abs().max().item()
    logits = (o.logits - r.logits).abs().max().item()
    return enc, logits, r.logits.abs().max().item()


# The default shape in the fast tier; the other variants with the slow tests.
@pytest.mark.parametrize("variant", [v if v == "stagger-relu-g5" else pytest.param(v, marks=pytest.mark.slow)
                                     for v in VARIANTS])


def test_logits_and_encoder_match_reference(tmp_path, variant):
    ref, ours, _ = reference_twin(tmp_path, **VARIANTS[variant])
    for n in LENGTHS:
        ids, mask, dec = random_batch([n], ref.config.vocab_size, seed=n)
        for backend in ("sdpa", "eager"):
            enc, logits, scale = _compare(ref, ours, ids, mask, dec, backend)
            assert scale > 0.1, "random logits too small for the test to mean anything"
            assert enc <= 1e-4 and logits <= 1e-4, (variant, n, backend, enc, logits)


def test_right_padded_batch_matches_reference_and_single_runs(tmp_path):
    ref, ours, _ = reference_twin(tmp_path, seed=3)
    lengths = [int(3.5 * K), 5, K + 1]
    ids, mask, dec = random_batch(lengths, ref.config.vocab_size, seed=1)
    enc, logits, _ = _compare(ref, ours, ids, mask, dec)
    assert enc <= 1e-4 and logits <= 1e-4
    # Padding must not change an example's result: each row alone gives the same logits.
    with torch.no_grad():
        batch = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        for i, n in enumerate(lengths):
            alone = ours(input_ids=ids[i:i + 1, :n], decoder_input_ids=dec[i:i + 1]).logits
            torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_sdpa_equals_eager_in_training_shapes(tmp_path):
    _, ours, _ = reference_twin(tmp_path, seed=4, num_global_tokens=3)
    ids, mask, dec = random_batch([30, 17], ours.config.vocab_size, seed=2)
    outs = {}
    for backend in ("eager", "sdpa"):
        ours.set_attention_backend(backend)
        with torch.no_grad():
            outs[backend] = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(outs["sdpa"], outs["eager"], atol=1e-5, rtol=1e-5)


def test_loss_and_every_gradient_match_reference(tmp_path):
    ref, ours, _ = reference_twin(tmp_path, seed=5)
    ids, mask, _ = random_batch([20, 13], ref.config.vocab_size, seed=3)
    labels = torch.randint(2, ref.config.vocab_size, (2, 6))
    labels[1, 4:] = -100
    dec_mask = torch.ones(2, 6, dtype=torch.long)
    dec_mask[1, 5:] = 0
    r = ref(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dec_mask)
    o = ours(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dec_mask)
    torch.testing.assert_close(o.loss, r.loss, atol=1e-5, rtol=1e-5)
    r.loss.backward()
    o.loss.backward()
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        g_ref = ref_params[name].grad
        assert p.grad is not None and g_ref is not None, name
        rel = (p.grad - g_ref).norm() / g_ref.norm().clamp_min(1e-12)
        assert rel <= 1e-4, (name, rel.item())
        checked += 1
    assert checked == len(ref_params)


def test_labels_are_shifted_right_with_start_token():
    labels = torch.tensor([[5, 6, 1, -100]])
    assert shift_tokens_right(labels, 0, 0).tolist() == [[0, 5, 6, 1]]


def test_positions_formula():
    pe = sinusoidal_positions(3, 2, 8)
    half = 4
    for row, pos in enumerate((3, 4)):
        for i in range(half):
            freq = math.exp(-i * math.log(10000.0) / (half - 1))
            assert abs(pe[row, i].item() - math.sin(pos * freq)) < 1e-6
            assert abs(pe[row, half + i].item() - math.cos(pos * freq)) < 1e-6


def test_any_length_and_long_inputs_warn_once():
    torch.manual_seed(0)
    model = PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs(max_position_embeddings=16))).eval()
    dec = torch.zeros(1, 1, dtype=torch.long)
    with pytest.warns(UserWarning, match="longer than max_position_embeddings"):
        out = model(input_ids=torch.randint(2, 96, (1, 40)), decoder_input_ids=dec)
    assert torch.isfinite(out.logits).all()


def test_parameter_counts_equal_reference_for_released_shapes():
    from transformers import PegasusXConfig as RefConfig
    from transformers import PegasusXForConditionalGeneration as RefModel

    expected = {"base": 272_292_096, "large": 568_667_136}  # REFERENCE.md, tied embedding counted once
    for name in ("base", "large"):
        cfg = getattr(PegasusXConfig, name)()
        with torch.device("meta"):
            ours = PegasusXForConditionalGeneration(cfg, init=False)
            ref = RefModel(RefConfig(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"}))
        assert ours.num_parameters() == sum(p.numel() for p in ref.parameters()) == expected[name]
        assert set(ours.state_dict()) == set(ref.state_dict())


def test_base_model_matches_reference_base_model(tmp_path):
    from transformers import PegasusXConfig as RefConfig
    from transformers import PegasusXModel as RefBase

    torch.manual_seed(7)
    ref = RefBase(RefConfig(**tiny_kwargs())).eval()
    ref.save_pretrained(tmp_path)
    ours = PegasusXModel.from_pretrained(tmp_path)
    ids, mask, dec = random_batch([11, 9], 96, seed=4)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        o = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    torch.testing.assert_close(o.last_hidden_state, r.last_hidden_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(o.encoder_last_hidden_state, r.encoder_last_hidden_state, atol=1e-4, rtol=0)


def test_gradient_checkpointing_gives_same_gradients(tmp_path):
    _, ours, _ = reference_twin(tmp_path, seed=8)
    ids, mask, dec = random_batch([19, 12], 96, seed=5)
    labels = torch.randint(2, 96, (2, 6))
    grads = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.train()
        (ours.gradient_checkpointing_enable if ckpt else ours.gradient_checkpointing_disable)()
        ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_chunked_ffn_at_inference_equals_one_pass(tmp_path, monkeypatch):
    import pegasus_x.model as model_module

    _, ours, _ = reference_twin(tmp_path, seed=9)
    ids, mask, dec = random_batch([37, 20], 96, seed=6)
    with torch.enable_grad():
        whole = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.detach()
    monkeypatch.setattr(model_module, "FFN_CHUNK", 5)
    with torch.no_grad():
        chunked = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_skip_padding_computes_real_tokens_only_and_equals_the_reference_there(tmp_path, variant, monkeypatch):
    from pegasus_x.model import PegasusXEncoderLayer

    _, ours, _ = reference_twin(tmp_path, seed=11, **VARIANTS[variant])
    packed_calls = []
    original = PegasusXEncoderLayer.forward_packed
    monkeypatch.setattr(PegasusXEncoderLayer, "forward_packed",
                        lambda self, *a: packed_calls.append(self) or original(self, *a))
    layers = ours.config.encoder_layers
    # Shorter rows, a one-token row, a whole block, a block and one, no padding but a partial last block,
    # nothing padded at all, too little padding to repay packing (no fast path).
    for lengths, packs in (([29, 5, K, 1, 2 * K], True), ([K + 1], True), ([2 * K, 2 * K], False),
                           ([8 * K - 1], False)):
        ids, mask, _ = random_batch(lengths, ours.config.vocab_size, seed=len(lengths))
        keep = mask.bool()[..., None]
        packed_calls.clear()
        with torch.inference_mode():
            reference = ours.encode(ids, mask).last_hidden_state
            fast = ours.encode(ids, mask, skip_padding=True)
            ours.set_native(False)
            slow = ours.encode(ids, mask, skip_padding=True).last_hidden_state
            slow_reference = ours.encode(ids, mask).last_hidden_state
            ours.set_native(True)
        assert len(packed_calls) == (layers if packs else 0), lengths
        assert fast.attention_mask.equal(mask.bool())
        torch.testing.assert_close(fast.last_hidden_state, reference.masked_fill(~keep, 0), atol=1e-5, rtol=1e-5)
        assert not fast.last_hidden_state.masked_fill(keep, 0).any() and not slow.masked_fill(keep, 0).any()
        assert slow.equal(slow_reference.masked_fill(~keep, 0))  # the reference path, padding zeroed
        torch.testing.assert_close(fast.last_hidden_state, slow, atol=1e-5, rtol=1e-5)   # native kernels = torch
    # With autograd (training) the layers run whole: the packed path is for inference.
    ids, mask, _ = random_batch([20, 3], ours.config.vocab_size, seed=1)
    packed_calls.clear()
    with torch.enable_grad():
        ours.encode(ids, mask, skip_padding=True)
    assert not packed_calls


def test_generation_encodes_real_tokens_only(monkeypatch, tmp_path):
    import pegasus_x.model as model_module

    _, ours, _ = reference_twin(tmp_path, seed=12)
    ids, mask, _ = random_batch([19, 4], ours.config.vocab_size, seed=3)
    made, packing = [], model_module.Packing
    monkeypatch.setattr(model_module, "Packing", lambda *a: made.append(a) or packing(*a))
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2)
    assert len(made) == 1
    for i, n in enumerate((19, 4)):
        alone = ours.generate(ids[i:i + 1, :n], max_new_tokens=4, num_beams=2)
        assert out[i, :alone.shape[1]].tolist() == alone[0].tolist()


def _saved_activation_bytes(model, ids, labels) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward after one training forward.

    Inside a checkpointed layer torch's own hooks take over (nothing is kept, it is recomputed), so this counts
    what lives across layers: the checkpointed layers' inputs and anything computed outside them.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()    # saved tensors stay alive: addresses are not reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=labels).loss
    assert loss.requires_grad
    return sum(kept.values())


def test_checkpointed_decoder_keeps_no_cross_keys_per_layer():
    # Issue #16: the cross-attention keys/values of every decoder layer used to be projected before the layer loop,
    # outside checkpointing, so training memory grew by 2·S·D per decoder layer. Projected inside each layer they
    # are recomputed in the backward pass: a layer then keeps only its (R, T_dec, D) input.
    B, S, T_dec, D = 1, 256, 4, 32
    ids = torch.randint(2, 96, (B, S), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(2, 96, (B, T_dec), generator=torch.Generator().manual_seed(1))
    saved = {}
    for layers in (2, 6):
        torch.manual_seed(0)
        model = PegasusXForConditionalGeneration(
            PegasusXConfig(**tiny_kwargs(encoder_layers=1, decoder_layers=layers))).train()
        model.gradient_checkpointing_enable()
        saved[layers] = _saved_activation_bytes(model, ids, labels)
    cross_kv_per_layer = 2 * B * S * D * 4                   # keys + values, fp32
    per_layer = (saved[6] - saved[2]) / 4
    assert saved[2] > cross_kv_per_layer / 2, saved          # the count sees the encoder's activations at least
    assert per_layer <= 0.05 * cross_kv_per_layer, (per_layer, cross_kv_per_layer, saved)


def test_ignore_index_has_one_owner_that_the_data_pads_with():
    from pegasus_x import model
    from pegasus_x.training import data

    assert data.IGNORE_INDEX is model.IGNORE_INDEX
    assert sources_containing("IGNORE_INDEX =") == ["model.py"]
    batch = data.collate(data.TokenizedPairs([[5, 1], [6, 7, 1]], [[8, 9, 1], [4, 1]]), [0, 1])
    assert batch["labels"].tolist() == [[8, 9, 1], [4, 1, model.IGNORE_INDEX]]
    # The model's loss skips exactly those positions: the padded row scores as it does alone.
    torch.manual_seed(0)
    net = PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs())).eval()
    alone = net(input_ids=torch.tensor([[6, 7, 1]]), labels=torch.tensor([[4, 1]])).loss
    padded = net(input_ids=batch["input_ids"][1:], attention_mask=batch["attention_mask"][1:],
                 labels=batch["labels"][1:]).loss
    torch.testing.assert_close(padded, alone)
# ---------------------------------------------------------------------------------------------------- encoder
def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.slow
def test_bf16_encoder_close_to_fp32_where_reference_bf16_is_not(tmp_path):
    ref, ours, folder = reference_twin(tmp_path, seed=11, d_model=64, encoder_attention_heads=4,
                                       decoder_attention_heads=4, block_size=16, init_std=0.05)
    ids = torch.randint(2, 96, (1, 3000), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours32 = ours.encode(ids).last_hidden_state
        ours16 = PegasusXForConditionalGeneration.from_pretrained(folder, dtype="bf16").encode(ids).last_hidden_state
        ref16 = ref.to(torch.bfloat16).get_encoder()(input_ids=ids).last_hidden_state
    assert ours16.dtype == torch.bfloat16 and torch.isfinite(ours16).all()
    ours_err, ref_err = _rel(ours16, ours32), _rel(ref16, ours32)
    assert ours_err <= 2e-2, ours_err
    # The reference computes positions in bf16 (angles off by whole radians late in the sequence).
    assert ref_err > 2 * ours_err, (ours_err, ref_err)


def test_fp16_is_refused_with_a_clear_message():
    model = PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs())).to(torch.float16)
    with pytest.raises(ConfigError, match="bfloat16"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long), decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.slow
def test_torch_compile_encoder_matches_eager():
    """The compiled encoder runs the torch path (its graphs cannot call the native kernels), and tracing it first
    in a process does not leave the kernels unloaded for the eager calls after."""
    from pegasus_x.native import loader

    torch.manual_seed(0)
    model = PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs())).eval()
    encoder = model.get_encoder()
    compiled = torch.compile(encoder.states, dynamic=False)
    ids, mask, _ = random_batch([21, 15], 96, seed=2)
    loader.library.cache_clear()
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask.bool()), encoder.states(ids, mask.bool()),
                                   atol=1e-5, rtol=1e-5)
    after = loader.library() is not None
    loader.library.cache_clear()
    assert (loader.library() is not None) == after


@pytest.mark.slow
def test_long_input_backward_with_checkpointing_is_finite():
    torch.manual_seed(0)
    model = PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs(max_position_embeddings=64)))
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(2, 96, (1, 2000))
    with pytest.warns(UserWarning, match="extrapolate"):
        loss = model(input_ids=ids, labels=torch.randint(2, 96, (1, 8))).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
