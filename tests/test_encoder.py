"""Encoder beyond the reference: bf16 accuracy, fp16 refusal, torch.compile, long inputs."""

from __future__ import annotations

import pytest
import torch

from conftest import random_batch, reference_twin, tiny_kwargs
from pegasus_x import ConfigError, PegasusXConfig, PegasusXForConditionalGeneration


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


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
    torch.manual_seed(0)
    model = PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs())).eval()
    encoder = model.get_encoder()
    compiled = torch.compile(encoder.states, dynamic=False)
    ids, mask, _ = random_batch([21, 15], 96, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask.bool()), encoder.states(ids, mask.bool()),
                                   atol=1e-5, rtol=1e-5)


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
