"""PegasusXConfig: reference fields and defaults, unknown keys kept, validation messages."""

from __future__ import annotations

import json

import pytest

from pegasus_x import ConfigError, PegasusXConfig
from conftest import assert_imports_without_torch


def test_defaults_equal_the_reference_config():
    from transformers import PegasusXConfig as RefConfig

    ref = RefConfig().to_dict()
    ours = PegasusXConfig().to_dict()
    for key, value in ours.items():
        if key in ref and key not in ("architectures",):
            assert ref[key] == value, key
    assert ours["num_global_tokens"] == 32 and ours["block_size"] == 512 and ours["activation_function"] == "gelu"


def test_presets_have_released_shapes():
    base, large = PegasusXConfig.base(), PegasusXConfig.large()
    assert (base.d_model, base.encoder_layers, base.encoder_attention_heads, base.encoder_ffn_dim) == (768, 12, 12, 3072)
    assert (large.d_model, large.decoder_layers, large.decoder_attention_heads, large.decoder_ffn_dim) == (
        1024, 16, 16, 4096)
    for cfg in (base, large):
        assert cfg.num_global_tokens == 128 and cfg.block_size == 512 and cfg.stagger_local_blocks
        assert cfg.activation_function == "relu" and cfg.dropout == cfg.attention_dropout == 0.1


def test_unknown_keys_roundtrip(tmp_path):
    data = PegasusXConfig.base().to_dict()
    data.update(normalize_before=True, static_position_embeddings=True, id2label={"0": "LABEL_0"})
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = PegasusXConfig.from_pretrained(tmp_path)
    assert cfg.extra["normalize_before"] is True
    cfg.save_pretrained(tmp_path / "out")
    back = json.loads((tmp_path / "out" / "config.json").read_text())
    assert back["static_position_embeddings"] is True and back["id2label"] == {"0": "LABEL_0"}
    assert PegasusXConfig.from_pretrained(tmp_path / "out") == cfg


def test_reference_reads_our_config(tmp_path):
    from transformers import PegasusXConfig as RefConfig

    PegasusXConfig.base(block_size=256).save_pretrained(tmp_path)
    ref = RefConfig.from_pretrained(tmp_path)
    assert ref.block_size == 256 and ref.d_model == 768 and ref.num_global_tokens == 128


@pytest.mark.parametrize("overrides, phrase", [
    (dict(d_model=100, encoder_attention_heads=16), "not divisible"),
    (dict(block_size=7), "must be even"),
    (dict(encoder_layers=0), "positive integer"),
    (dict(activation_function="mish"), "unknown"),
    (dict(dropout=1.5), "probability"),
    (dict(pad_token_id=200_000), "token id"),
])
def test_validation_names_the_problem(overrides, phrase):
    with pytest.raises(ConfigError, match=phrase):
        PegasusXConfig(**overrides)


def test_odd_block_is_fine_without_staggering():
    assert PegasusXConfig(block_size=7, stagger_local_blocks=False).block_size == 7


def test_other_model_type_is_refused():
    with pytest.raises(ConfigError, match="convert pegasus"):
        PegasusXConfig.from_dict({"model_type": "pegasus"})


def test_config_imports_without_torch():
    assert_imports_without_torch("pegasus_x.config")
