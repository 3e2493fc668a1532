"""Checkpoint I/O: both directions with the reference, every layout, clear errors, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_batch, reference_twin, sources_containing, tiny_kwargs
from pegasus_x import CheckpointError, ConfigError, PegasusXConfig, PegasusXForConditionalGeneration, PegasusXModel


def _logits(model, seed=0):
    ids, mask, dec = random_batch([13, 9], model.config.vocab_size, seed=seed)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits


def test_our_save_loads_in_reference_with_same_logits(tmp_path):
    from transformers import PegasusXForConditionalGeneration as RefModel

    torch.manual_seed(0)
    ours = PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs())).eval()
    ours.save_pretrained(tmp_path / "ours")
    ref = RefModel.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(ref), _logits(ours), atol=1e-4, rtol=0)
    # The tied trio is stored once, like the reference writes it.
    keys = set(load_file(tmp_path / "ours" / "model.safetensors"))
    assert "model.shared.weight" in keys and "lm_head.weight" not in keys
    assert "model.encoder.embed_tokens.weight" not in keys


def test_save_load_save_roundtrip_is_identical(tmp_path):
    _, ours, _ = reference_twin(tmp_path)
    ours.generation_config = {"num_beams": 8, "length_penalty": 0.8}
    ours.save_pretrained(tmp_path / "a")
    again = PegasusXForConditionalGeneration.from_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "generation_config.json").read_text())["num_beams"] == 8
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("cls", [PegasusXForConditionalGeneration, PegasusXModel])
@pytest.mark.parametrize("layout", ["prefixed", "bare", "bin-all-aliases", "sharded"])
def test_every_layout_loads_into_both_classes(tmp_path, cls, layout):
    ref, ours, folder = reference_twin(tmp_path)
    state = {k: v.clone() for k, v in ref.state_dict().items()}        # holds all four tied names
    out = tmp_path / layout
    out.mkdir()
    ours.config.save_pretrained(out)
    if layout == "prefixed":
        save_file({k: v for k, v in state.items() if "embed_tokens" not in k and k != "lm_head.weight"},
                  out / "model.safetensors")
    elif layout == "bare":
        save_file({k[len("model."):]: v for k, v in state.items() if k.startswith("model.") and "embed_tokens" not in k},
                  out / "model.safetensors")
    elif layout == "bin-all-aliases":
        torch.save(state, out / "pytorch_model.bin")
    else:
        names = sorted(k for k in state if "embed_tokens" not in k and k != "lm_head.weight")
        half = len(names) // 2
        shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        for file, keys in shards.items():
            save_file({k: state[k] for k in keys}, out / file)
        index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = cls.from_pretrained(out)
    expected = ours if cls is PegasusXForConditionalGeneration else ours.model
    for name, p in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name


def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path):
    ref, ours, folder = reference_twin(tmp_path)
    state = load_file(folder / "model.safetensors")
    state.pop("model.encoder.layers.1.fc1.bias")
    state["model.encoder.extra_thing.weight"] = torch.zeros(2)
    state["model.decoder.layers.0.fc2.weight"] = torch.zeros(3, 3)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        PegasusXForConditionalGeneration.from_pretrained(folder)
    msg = str(info.value)
    assert "model.encoder.layers.1.fc1.bias" in msg and "model.encoder.extra_thing.weight" in msg
    assert "model.decoder.layers.0.fc2.weight" in msg and "(3, 3)" in msg


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        PegasusXForConditionalGeneration.from_pretrained(tmp_path / "nope")
    PegasusXConfig(**tiny_kwargs()).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no weights"):
        PegasusXForConditionalGeneration.from_pretrained(tmp_path)


def test_load_in_bf16_and_refuse_fp16(tmp_path):
    _, ours, folder = reference_twin(tmp_path)
    bf16 = PegasusXForConditionalGeneration.from_pretrained(folder, dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and bf16.lm_head.weight is bf16.model.shared.weight
    with pytest.raises(ConfigError, match="float16"):
        PegasusXForConditionalGeneration.from_pretrained(folder, dtype=torch.float16)


def test_hub_id_without_network_or_package_says_what_to_do(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)       # as if not installed
    with pytest.raises(CheckpointError, match="pip install"):
        PegasusXForConditionalGeneration.from_pretrained("google/pegasus-x-base")


def test_tied_embedding_aliases_have_one_owner():
    from pegasus_x import checkpoint, convert
    from pegasus_x.training import state

    assert convert.TIED_KEYS is checkpoint.TIED_KEYS and state.TIED_KEYS is checkpoint.TIED_KEYS
    assert checkpoint.TIED_KEYS == tuple("model." + a for a in checkpoint.TIED_ALIASES) + ("lm_head.weight",)
    # Every tied key is one tensor in our model: the aliases name the shared embedding.
    model = PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs()))
    params = dict(model.named_parameters(remove_duplicate=False))
    assert all(params[k] is model.model.shared.weight for k in checkpoint.TIED_KEYS)
    for alias in checkpoint.TIED_ALIASES:   # no module spells out its own list
        assert sources_containing(alias) == ["checkpoint.py"]


def test_hub_snapshot_shards_are_symlinks_outside_the_folder(tmp_path):
    """In a hub cache, snapshots/REV/model-*.safetensors link to ../../blobs/HASH: an index naming them is fine
    (only absolute and '..' spellings are refused), and a shard in a subfolder is too."""
    torch.manual_seed(0)
    model = PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs())).eval()
    snapshot, blobs = tmp_path / "snapshots" / "abc", tmp_path / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    model.save_pretrained(tmp_path / "plain")
    state = load_file(tmp_path / "plain" / "model.safetensors")
    names = sorted(state)
    save_file({k: state[k] for k in names[:5]}, blobs / "1234")
    (snapshot / "model-00001-of-00002.safetensors").symlink_to("../../blobs/1234")
    (snapshot / "sub").mkdir()
    save_file({k: state[k] for k in names[5:]}, snapshot / "sub" / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in names[:5]}
    weight_map.update({k: "sub/model-00002-of-00002.safetensors" for k in names[5:]})
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (snapshot / "config.json").write_bytes((tmp_path / "plain" / "config.json").read_bytes())
    loaded = PegasusXForConditionalGeneration.from_pretrained(snapshot)
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=0, rtol=0)
