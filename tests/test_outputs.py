"""Model outputs (pegasus_x.outputs) index like transformers' ModelOutput; encoder outputs, ours or the
reference's, feed generate and forward."""

from __future__ import annotations

import pytest
import torch

from conftest import random_batch, reference_twin


def test_model_outputs_index_like_transformers(tmp_path):
    ref, ours, _ = reference_twin(tmp_path)
    ids, mask, dec = random_batch([9, 6], ref.config.vocab_size, seed=1)
    with torch.no_grad():
        for kwargs in (dict(decoder_input_ids=dec), dict(labels=dec)):
            r, o = ref(input_ids=ids, attention_mask=mask, **kwargs), ours(input_ids=ids, attention_mask=mask,
                                                                            **kwargs)
            torch.testing.assert_close(o[0], r[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(o["logits"], r["logits"], atol=1e-4, rtol=1e-4)
            assert ("loss" in o) == ("loss" in r) and ("logits" in o)
            assert list(o) == o.keys() == [k for k in r.keys() if k in {"loss", "logits", "encoder_last_hidden_state"}]
            assert len(o.to_tuple()) == len(o) and o.to_tuple()[0] is o[0]
            loss_or_logits, *_ = o.to_tuple()
            assert loss_or_logits is o[0]
        with pytest.raises(KeyError):
            ours(input_ids=ids, decoder_input_ids=dec)["loss"]


def test_get_encoder_call_and_generate_from_encoder_outputs(tmp_path):
    ref, ours, _ = reference_twin(tmp_path, seed=3, init_std=0.5)
    ids, mask, _ = random_batch([13, 7], ref.config.vocab_size, seed=5)
    with torch.no_grad():
        r = ref.get_encoder()(input_ids=ids, attention_mask=mask)
        o = ours.get_encoder()(input_ids=ids, attention_mask=mask)
        keep = mask.bool()
        torch.testing.assert_close(o.last_hidden_state[keep], r.last_hidden_state[keep], atol=1e-4, rtol=1e-4)
        assert o[0] is o.last_hidden_state
        direct = ours.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=2)
        assert torch.equal(ours.generate(encoder_outputs=o, max_new_tokens=6, num_beams=2), direct)
        # transformers' own encoder output (no mask inside) with the mask passed beside it
        assert torch.equal(ours.generate(encoder_outputs=r, attention_mask=mask, max_new_tokens=6, num_beams=2),
                           direct)
        logits = ours(encoder_outputs=(o.last_hidden_state,), attention_mask=mask, decoder_input_ids=direct).logits
        torch.testing.assert_close(logits, ours(ids, mask, decoder_input_ids=direct).logits)
