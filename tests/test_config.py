"""PegasusXConfig: reference fields and defaults, unknown keys kept, validation messages, types, size ceilings and
the memory check."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_imports_without_torch
from pegasus_x import ConfigError, PegasusXConfig, PegasusXForConditionalGeneration
from pegasus_x import config as config_module
from pegasus_x.config import CEILINGS, check_fits_in_memory, estimate_memory, machine_memory


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
# ---------------------------------------------------------------------------------------------- types (item 10)
@pytest.mark.parametrize("name", ["use_cache", "scale_embedding", "stagger_local_blocks", "tie_word_embeddings"])
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_booleans_must_be_booleans(name, value):
    """A string "false" is truthy: taken as a boolean it would turn the feature on."""
    with pytest.raises(ConfigError, match=f"config.{name} must be true or false"):
        PegasusXConfig.from_dict({**PegasusXConfig.tiny().to_dict(), name: value})


@pytest.mark.parametrize("name, value, phrase", [
    ("dropout", float("nan"), "finite number"), ("layer_norm_eps", float("inf"), "finite number"),
    ("init_std", "0.02", "finite number"), ("eos_token_id", 1.0, "an integer"),
    ("decoder_start_token_id", True, "an integer"), ("activation_function", None, "a string"),
    ("d_model", 64.0, "positive integer"), ("block_size", "16", "positive integer"),
])


def test_every_field_is_type_checked(name, value, phrase):
    with pytest.raises(ConfigError, match=f"config.{name} must be .*{phrase}"):
        PegasusXConfig.tiny(**{name: value})


def test_legacy_keys_are_not_checked():
    cfg = PegasusXConfig.from_dict({**PegasusXConfig.tiny().to_dict(), "normalize_before": "yes"})
    assert cfg.extra["normalize_before"] == "yes"


# ---------------------------------------------------------------------------------------------- sizes (item 6)
def test_huge_layer_count_is_refused_at_once(tmp_path):
    """The config is refused before a single layer is built (it used to build layers for minutes)."""
    data = {**PegasusXConfig.tiny().to_dict(), "encoder_layers": 10**9}
    (tmp_path / "config.json").write_text(json.dumps(data))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="encoder_layers=1,000,000,000 is larger than the ceiling"):
        PegasusXForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="ceiling"):
        PegasusXForConditionalGeneration(PegasusXConfig.tiny(encoder_layers=10**9))
    assert time.perf_counter() - start < 0.5


def test_parameter_estimate_equals_the_model():
    """The estimate (from sizes alone) counts what the modules hold, tied or not, and the released counts."""
    assert estimate_memory(PegasusXConfig.base()).parameters == 272_292_096      # REFERENCE.md
    assert estimate_memory(PegasusXConfig.large()).parameters == 568_667_136
    for changes in ({}, {"tie_word_embeddings": False}, {"stagger_local_blocks": False, "num_global_tokens": 3},
                    {"encoder_ffn_dim": 40, "decoder_ffn_dim": 24, "decoder_layers": 3}):
        cfg = PegasusXConfig.tiny(vocab_size=500, **changes)
        estimate = estimate_memory(cfg, bytes_per_value=2)
        assert estimate.parameters == PegasusXForConditionalGeneration(cfg).num_parameters(), changes
        assert estimate.parameter_bytes == 2 * estimate.parameters


def test_activation_estimate_is_the_block_scores():
    """At a large block the fp32 score tensor of one staggered layer dominates: 2 blocks x heads x K x (G + K)."""
    cfg = PegasusXConfig.tiny(block_size=4096, num_global_tokens=8, encoder_attention_heads=4)
    assert estimate_memory(cfg).activation_bytes == 4 * 2 * 4 * 4096 * (8 + 4096)


def test_model_too_big_for_memory_is_refused_before_allocating(monkeypatch):
    monkeypatch.setattr(config_module, "machine_memory", lambda: 10**9)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"needs at least 2\.3 GB \(568,667,136 parameters at 4 bytes = 2\.3 GB.*"
                                          r"this machine has 1\.0 GB"):
        PegasusXForConditionalGeneration(PegasusXConfig.large())
    assert time.perf_counter() - start < 0.5
    with torch.device("meta"):                      # a meta build allocates nothing, so it is not refused
        assert PegasusXForConditionalGeneration(PegasusXConfig.large(), init=False).num_parameters() == 568_667_136


def test_block_size_too_big_for_memory_is_refused_by_from_pretrained(tmp_path, monkeypatch):
    """block_size changes no weight shape: the folder loads, and the run would allocate the block scores later."""
    PegasusXForConditionalGeneration(PegasusXConfig.tiny(vocab_size=500)).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "block_size": 2**16}))
    monkeypatch.setattr(config_module, "machine_memory", lambda: 8 * 10**9)
    with pytest.raises(ConfigError, match=r"needs at least 137\.5 GB .* largest run-time tensor at block_size 65536"):
        PegasusXForConditionalGeneration.from_pretrained(tmp_path)


def test_check_uses_the_dtype_width():
    cfg = PegasusXConfig.base()
    fp32 = estimate_memory(cfg, 4).total_bytes
    with pytest.raises(ConfigError, match="at 4 bytes"):
        check_fits_in_memory(cfg, 4, available=fp32 - 1)
    assert check_fits_in_memory(cfg, 2, available=fp32 - 1).parameter_bytes == 2 * 272_292_096


def test_machine_memory_reads_this_machine():
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    assert 0 < machine_memory() <= total


# ---------------------------------------------------------------------------------------------- properties
SIZES = settings(max_examples=150, deadline=None)


@st.composite
def valid_sizes(draw):
    heads = draw(st.integers(1, CEILINGS["encoder_attention_heads"]))
    d_model = max(4, 2 * heads * draw(st.integers(1, CEILINGS["d_model"] // (2 * heads))))  # even, heads divide it
    return dict(d_model=d_model, encoder_attention_heads=heads, decoder_attention_heads=heads,
                encoder_layers=draw(st.integers(1, CEILINGS["encoder_layers"])),
                decoder_layers=draw(st.integers(1, CEILINGS["decoder_layers"])),
                encoder_ffn_dim=draw(st.integers(1, CEILINGS["encoder_ffn_dim"])),
                decoder_ffn_dim=draw(st.integers(1, CEILINGS["decoder_ffn_dim"])),
                vocab_size=draw(st.integers(2, CEILINGS["vocab_size"])),
                num_global_tokens=draw(st.integers(1, CEILINGS["num_global_tokens"])),
                block_size=2 * draw(st.integers(1, CEILINGS["block_size"] // 2)),
                max_position_embeddings=draw(st.integers(1, CEILINGS["max_position_embeddings"])))


@SIZES
@given(sizes=valid_sizes(), available=st.integers(1, 2**50))
def test_sizes_within_ceilings_are_accepted_and_memory_decides(sizes, available):
    """Any shape within the ceilings is a valid config; building it is refused exactly when it cannot fit."""
    cfg = PegasusXConfig(**sizes)
    assert PegasusXConfig.from_dict(cfg.to_dict()) == cfg
    estimate = estimate_memory(cfg)
    if estimate.total_bytes > available:
        with pytest.raises(ConfigError, match="needs at least"):
            check_fits_in_memory(cfg, available=available)
    else:
        assert check_fits_in_memory(cfg, available=available) == estimate


@SIZES
@given(name=st.sampled_from(sorted(CEILINGS)), excess=st.integers(1, 10**15))
def test_sizes_above_ceilings_are_refused(name, excess):
    value = CEILINGS[name] + excess
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"config.{name}={value:,} is larger than the ceiling"):
        PegasusXConfig.from_dict({**PegasusXConfig.tiny().to_dict(), name: value})
    assert time.perf_counter() - start < 0.5


WRONG = {"bool": st.one_of(st.text(max_size=5), st.integers(), st.none(), st.floats()),
         "int": st.one_of(st.text(max_size=5), st.booleans(), st.floats(), st.none()),
         "float": st.one_of(st.text(max_size=5), st.booleans(), st.none(), st.sampled_from([float("nan"), float("inf"),
                                                                                           -float("inf")])),
         "str": st.one_of(st.integers(), st.booleans(), st.none(), st.lists(st.text(max_size=3), max_size=2))}
FIELDS = {f.name: str(f.type).split(" ")[0] for f in dataclasses.fields(PegasusXConfig) if f.name != "extra"}


@SIZES
@given(data=st.data(), name=st.sampled_from(sorted(FIELDS)))
def test_a_wrongly_typed_field_is_refused_by_name(data, name):
    value = data.draw(WRONG[FIELDS[name]])
    if name == "forced_eos_token_id" and value is None:
        return                                          # null turns forcing off
    with pytest.raises(ConfigError, match=f"config.{name}"):
        PegasusXConfig.from_dict({**PegasusXConfig.tiny().to_dict(), name: value})
