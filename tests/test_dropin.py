"""A drop-in for transformers users: the names a ported script uses, and transformers 5's generation defaults.

The oracle is the pinned transformers: the same script runs once per library with only the import changed, and
checkpoint folders saved by transformers generate the same ids with no options.
"""

from __future__ import annotations

import json
import shutil
import types
import warnings

import pytest
import torch

import pegasus_x
from pegasus_x import (ConfigError, GenerationConfig, PegasusTokenizer, PegasusXForConditionalGeneration,
                       Summarizer, summarize)
from pegasus_x.cli import main as cli_main
from pegasus_x.summarize import demo_model_path

from conftest import random_batch, reference_twin

transformers = pytest.importorskip("transformers", reason="install the test extras: pip install -e '.[test]'")
EOS, PAD = 1, 0
DOCS = ["NAME\n ls - list directory contents\nSYNOPSIS\n ls [OPTION]... [FILE]...\nDESCRIPTION\n List information "
        "about the FILEs (the current directory by default). Sort entries alphabetically if none of -cftuvSUX nor "
        "--sort is specified.",
        "NAME\n join - join lines of two files on a common field\nDESCRIPTION\n For each pair of input lines with "
        "identical join fields, write a line to standard output. The default join field is the first, delimited "
        "by blanks."]


@pytest.fixture(autouse=True)
def quiet_reference():
    from transformers.utils import logging

    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _pad_after_eos(seqs: torch.Tensor) -> torch.Tensor:
    """The reference pads beam outputs with EOS when pad_token_id is 0 (`pad or eos`); we pad with pad (the one
    documented difference, see generate.py)."""
    seqs = seqs.clone()
    for row in seqs:
        ends = (row[1:] == EOS).nonzero()
        if len(ends):
            row[int(ends[0]) + 2:] = PAD
    return seqs


IDS = {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
# The demo's own options, shortened so that the reference runs quickly.
DEMO_GENERATION = {**IDS, "forced_eos_token_id": 1, "num_beams": 2, "length_penalty": 0.8, "max_new_tokens": 12,
                   "no_repeat_ngram_size": 3}


def _demo_copy(tmp_path, generation: dict | None = None):
    """The bundled demo model (trained, real vocabulary; stored in bf16) in a folder of the test's own."""
    folder = tmp_path / "demo"
    shutil.copytree(demo_model_path(), folder)
    (folder / "generation_config.json").write_text(json.dumps(generation or DEMO_GENERATION))
    return folder


# ---------------------------------------------------------------------------------------------------- a ported script
def _ported_script(lib: types.ModuleType, folder, dtype: torch.dtype) -> dict:
    """A transformers summarization script; ``lib`` is the only thing that changes."""
    tok = lib.PegasusTokenizer.from_pretrained(folder)
    model = lib.PegasusXForConditionalGeneration.from_pretrained(folder, torch_dtype=dtype)
    model.eval()
    batch = tok(DOCS, truncation=True, max_length=48, padding=True, return_tensors="pt").to("cpu")
    config = lib.GenerationConfig(num_beams=3, max_new_tokens=12, length_penalty=0.8, decoder_start_token_id=0,
                                  eos_token_id=1, pad_token_id=0)
    labels = tok(text_target=["list directory contents", "join lines of two files"], padding=True,
                 return_tensors="pt")["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    with torch.no_grad():
        ids = [model.generate(**batch, num_beams=2, max_new_tokens=10),
               model.generate(**batch, generation_config=config),
               model.generate(**batch)]
        outputs = model(**batch, labels=labels)
        plain = model(**batch, decoder_input_ids=labels.clamp(min=0))
    return dict(dtype=model.dtype, model_type=model.config.model_type, ids=[_pad_after_eos(i) for i in ids],
                texts=[tok.batch_decode(i, skip_special_tokens=True) for i in ids], loss=outputs[0],
                logits=outputs.logits, plain=(plain[0], plain.logits), has_loss=("loss" in outputs, "loss" in plain))


@pytest.mark.slow
def test_ported_script_gives_transformers_ids_and_texts(tmp_path):
    folder = _demo_copy(tmp_path)
    ref, ours = (_ported_script(lib, folder, torch.float32) for lib in (transformers, pegasus_x))
    assert ours["model_type"] == ref["model_type"] == "pegasus_x"
    for a, b in zip(ours["ids"], ref["ids"]):
        assert torch.equal(a, b)
    assert ours["texts"] == ref["texts"] and all(t for texts in ours["texts"] for t in texts)
    torch.testing.assert_close(ours["loss"], ref["loss"], atol=1e-4, rtol=1e-4)       # outputs[0] is the loss
    torch.testing.assert_close(ours["logits"], ref["logits"], atol=1e-4, rtol=1e-4)
    assert ours["plain"][0] is ours["plain"][1]                                        # without labels: logits
    assert ours["has_loss"] == ref["has_loss"] == (True, False)


@pytest.mark.slow
def test_ported_script_honours_torch_dtype(tmp_path):
    folder = _demo_copy(tmp_path)
    ours = _ported_script(pegasus_x, folder, torch.bfloat16)
    assert ours["dtype"] == torch.bfloat16 and ours["logits"].dtype == torch.bfloat16
    # The reference's bf16 computes positions in bf16 (its beams drift); ours keeps them fp32 and here picks the
    # same tokens as the reference in fp32.
    ref = _ported_script(transformers, folder, torch.float32)
    assert ours["texts"] == ref["texts"]


# ---------------------------------------------------------------------------------------------------- defaults
def _rewrite(folder, config_updates: dict, generation: dict | None) -> None:
    """Edit a saved folder: add keys to config.json; replace generation_config.json (None: delete it)."""
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, **config_updates}))
    gen = folder / "generation_config.json"
    if generation is None:
        gen.unlink()
    else:
        gen.write_text(json.dumps(generation))


LENGTH_IN_CONFIG = {"num_beams": 3, "max_length": 12, "length_penalty": 0.6, "no_repeat_ngram_size": 2}
FOLDERS = {
    # As transformers 5 saves it: ids and forced_eos_token_id, no length (20 new tokens).
    "saved by transformers": ({}, "keep"),
    # No generation_config.json: transformers reads the generation options of config.json.
    "no generation_config.json": (LENGTH_IN_CONFIG, None),
    # generation_config.json without forced EOS, beams or length: config.json's values are not used.
    "generation_config.json omits config.json's options": (
        {**LENGTH_IN_CONFIG, "forced_eos_token_id": 1}, {"decoder_start_token_id": 0, "eos_token_id": 1,
                                                         "pad_token_id": 0}),
    # Beam search and lengths from generation_config.json itself.
    "beam generation_config.json": ({}, {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0,
                                         "num_beams": 2, "max_new_tokens": 9, "min_length": 4,
                                         "forced_eos_token_id": 1}),
}


@pytest.mark.parametrize("case", list(FOLDERS))
def test_default_generation_matches_transformers(tmp_path, case):
    ref, _, folder = reference_twin(tmp_path, seed=3, init_std=0.5)
    config_updates, generation = FOLDERS[case]
    if generation != "keep":
        _rewrite(folder, config_updates, generation)
    ref = transformers.PegasusXForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        ref.model.shared.weight[EOS] *= 2.0                   # make EOS competitive, so lengths differ by row
    ours = PegasusXForConditionalGeneration.from_pretrained(folder).eval()
    ours.model.shared.weight.data[EOS] = ref.model.shared.weight[EOS]
    ids, mask, _ = random_batch([13, 7, 10], ref.config.vocab_size, seed=5)
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=mask)
    assert torch.equal(ours.generate(ids, attention_mask=mask), _pad_after_eos(expected))
    # generation_config= over the checkpoint's, as in transformers.
    given = {"num_beams": 2, "max_new_tokens": 5}
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=mask,
                                generation_config=transformers.GenerationConfig(**given))
    got = ours.generate(ids, attention_mask=mask, generation_config=GenerationConfig(**given))
    assert torch.equal(got, _pad_after_eos(expected))
    got = ours.generate(ids, attention_mask=mask, generation_config=transformers.GenerationConfig(**given))
    assert torch.equal(got, _pad_after_eos(expected))                 # a ported script's own config object


# ---------------------------------------------------------------------------------------------------- one policy
@pytest.mark.slow
@pytest.mark.parametrize("stored, length", [({"min_length": 30}, 21),
                                             ({"max_length": 25, "min_length": 24, "num_beams": 2}, 25)],
                         ids=["no length", "stored max_length"])
def test_summarizer_summarize_cli_and_generate_agree(tmp_path, capsys, stored, length):
    """One policy: with no stored length all four stop at transformers' 20 new tokens; a stored max_length is
    used as it is (min_length keeps EOS away until the end)."""
    folder = _demo_copy(tmp_path, {**IDS, **stored})
    model = PegasusXForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)   # as Summarizer on CPU
    tok = PegasusTokenizer.from_pretrained(folder)
    with torch.no_grad():
        ids = model.generate(**tok([DOCS[1]], return_tensors="pt"))
    assert ids.shape[1] == length
    expected = tok.decode(ids[0], skip_special_tokens=True).strip()
    assert Summarizer(folder)(DOCS[1]) == expected
    assert summarize(DOCS[1], model=folder) == expected
    (tmp_path / "doc.txt").write_text(DOCS[1])
    assert cli_main(["summarize", str(tmp_path / "doc.txt"), "--model", str(folder), "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected + "\n"


# ---------------------------------------------------------------------------------------------------- the rest
def test_resize_token_embeddings_like_transformers(tmp_path):
    ref, ours, _ = reference_twin(tmp_path)
    old = ours.model.shared.weight.detach().clone()
    for model in (ref, ours):
        model.resize_token_embeddings(101, pad_to_multiple_of=8)
    assert ours.config.vocab_size == ref.config.vocab_size == 104
    assert ours.get_input_embeddings().weight.shape == ref.get_input_embeddings().weight.shape == (104, 32)
    assert torch.equal(ours.model.shared.weight[:96], old)
    assert ours.lm_head.weight is ours.model.shared.weight is ours.model.encoder.embed_tokens.weight
    ids, mask, dec = random_batch([9, 6], 104, seed=1)
    ids[0, 0] = 103
    assert ours(ids, mask, decoder_input_ids=dec).logits.shape == (2, dec.shape[1], 104)
    with pytest.raises(ConfigError, match="special token"):
        ours.resize_token_embeddings(1)


def test_from_pretrained_hub_arguments(tmp_path, monkeypatch):
    import huggingface_hub

    folder = _demo_copy(tmp_path)
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append(kwargs)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = PegasusXForConditionalGeneration.from_pretrained("org/model", torch_dtype=torch.bfloat16,
                                                             revision="v1", cache_dir=str(tmp_path))
    assert model.dtype == torch.bfloat16
    assert PegasusXForConditionalGeneration.from_pretrained(folder, torch_dtype="bfloat16").dtype == torch.bfloat16
    assert PegasusXForConditionalGeneration.from_pretrained(folder, dtype="auto").dtype == torch.bfloat16  # stored
    tok = PegasusTokenizer.from_pretrained("org/model", revision="v1", cache_dir=str(tmp_path), local_files_only=True)
    assert tok.vocab_size == model.config.vocab_size
    assert calls[0]["revision"] == "v1" and "torch_dtype" not in calls[0]
    assert (calls[1]["revision"], calls[1]["local_files_only"]) == ("v1", True)
    with pytest.raises(ConfigError, match="device_map"):
        PegasusXForConditionalGeneration.from_pretrained(folder, device_map="auto")
    with pytest.raises(ConfigError, match="disagree"):
        PegasusXForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, torch_dtype=torch.bfloat16)


def test_batch_encoding_to_and_attributes():
    tok = PegasusTokenizer.pegasus()
    batch = tok(DOCS, padding=True, return_tensors="pt")
    assert batch.to("meta") is batch
    assert batch.input_ids.device.type == batch["attention_mask"].device.type == "meta"
    with pytest.raises(pegasus_x.TokenizerError, match="device"):
        batch.to(torch.float32)
