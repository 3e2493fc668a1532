"""GenerationConfig (pegasus_x.generation_config): attribute and dict access, update, and files that
transformers reads back."""

from __future__ import annotations

import pytest

from pegasus_x import GenerationConfig, PegasusXConfig, PegasusXForConditionalGeneration
from pegasus_x.generation_config import DEFAULTS, merge

transformers = pytest.importorskip("transformers", reason="install the test extras: pip install -e '.[test]'")


def test_generation_config_object(tmp_path):
    model = PegasusXForConditionalGeneration(PegasusXConfig.tiny(vocab_size=96, d_model=32))
    gen = model.generation_config
    assert isinstance(gen, GenerationConfig) and gen.forced_eos_token_id == 1 and gen.num_beams is None
    gen.num_beams = 4
    assert gen.to_dict()["num_beams"] == 4 and gen["num_beams"] == 4 and "max_length" not in gen
    assert gen.update(length_penalty=0.5, not_an_option=1) == {"not_an_option": 1} and gen.length_penalty == 0.5
    model.generation_config = {"max_new_tokens": 7}                   # the earlier dict form still works
    assert model.generation_config.max_new_tokens == 7
    gen.save_pretrained(tmp_path)
    read = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (read.num_beams, read.forced_eos_token_id, read.decoder_start_token_id) == (4, 1, 0)
    assert GenerationConfig.from_pretrained(tmp_path) == gen
    assert PegasusXConfig.tiny().model_type == "pegasus_x"


def test_merge_takes_each_option_from_the_first_layer_that_sets_it():
    stored = GenerationConfig(num_beams=4, length_penalty=0.8, max_length=64)
    given = GenerationConfig(num_beams=2)
    value, no_max_length = merge(stored, given, {"length_penalty": 1.5, "max_new_tokens": None})
    assert (value["num_beams"], value["length_penalty"], value["max_length"]) == (2, 1.5, 64)
    assert value["max_new_tokens"] is None and not no_max_length     # a None length in the call is "not given"
    assert value["top_k"] == DEFAULTS["top_k"]                       # no layer sets it
    value, no_max_length = merge(GenerationConfig(forced_eos_token_id=1), None, {"forced_eos_token_id": None})
    assert no_max_length and value["forced_eos_token_id"] is None    # any other None in the call is a value
