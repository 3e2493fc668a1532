"""Converters: original Flax checkpoints (written here in flax's msgpack format) and PEGASUS → PEGASUS-X."""

from __future__ import annotations

import argparse
import json

import msgpack
import numpy as np
import pytest
import torch

from conftest import random_batch, tiny_kwargs
from pegasus_x import CheckpointError, ConfigError, PegasusXForConditionalGeneration
from pegasus_x.convert import FLAX_LAYER_NORM_EPS, convert_flax, convert_pegasus, read_flax_params, register

VOCAB = 96103   # the PEGASUS vocabulary, so the converted folders get the tokenizer


# ---------------------------------------------------------------------------------------------------- flax writer
def _pack(obj):
    """flax.serialization's encoding: ext 1 = msgpack (shape, dtype name, C bytes); ext 3 = numpy scalar."""
    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(1, msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes("C")), use_bin_type=True))
    if isinstance(obj, np.generic):
        a = np.asarray(obj)
        return msgpack.ExtType(3, msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True))
    raise TypeError(type(obj))


def write_flax(path, tree):
    path.write_bytes(msgpack.packb(tree, default=_pack, strict_types=True))
    return path


def flax_params(ref, flat_kernels: bool = False) -> dict:
    """The original Flax parameter tree of a reference transformers PEGASUS-X model (names and kernel layouts)."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in ref.state_dict().items()}
    cfg = ref.config
    D = cfg.d_model

    def ln(prefix):
        return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}

    def attn(prefix, heads):
        hd = D // heads
        out = {}
        for flax_name, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            kernel = sd[f"{prefix}.{ours}.weight"].T                          # (in D, out D)
            out[flax_name] = {"kernel": kernel if flat_kernels else kernel.reshape(D, heads, hd)}
        kernel = sd[f"{prefix}.out_proj.weight"].T
        out["out"] = {"kernel": kernel if flat_kernels else kernel.reshape(heads, hd, D)}
        return out

    def mlp(prefix):
        return {"Dense_0": {"kernel": sd[prefix + ".fc1.weight"].T, "bias": sd[prefix + ".fc1.bias"]},
                "Dense_1": {"kernel": sd[prefix + ".fc2.weight"].T, "bias": sd[prefix + ".fc2.bias"]}}

    enc = {"Embed_0": {"embedding": sd["model.encoder.embed_global.weight"]},
           "encoder_norm": ln("model.encoder.layer_norm")}
    for i in range(cfg.encoder_layers):
        p = f"model.encoder.layers.{i}"
        enc[f"encoderblock_{i}"] = {
            "LayerNorm_0": ln(p + ".self_attn_layer_norm"), "LayerNorm_1": ln(p + ".global_self_attn_layer_norm"),
            "GlobalLocalSelfAttention_0": attn(p + ".self_attn", cfg.encoder_attention_heads),
            "LayerNorm_2": ln(p + ".final_layer_norm"), "MlpBlock_0": mlp(p)}
    dec = {"encoderdecoder_norm": ln("model.decoder.layer_norm")}
    for j in range(cfg.decoder_layers):
        p = f"model.decoder.layers.{j}"
        dec[f"encoderdecoderblock_{j}"] = {
            "LayerNorm_0": ln(p + ".self_attn_layer_norm"),
            "SelfAttention_0": attn(p + ".self_attn", cfg.decoder_attention_heads),
            "LayerNorm_1": ln(p + ".encoder_attn_layer_norm"),
            "MultiHeadDotProductAttention_0": attn(p + ".encoder_attn", cfg.decoder_attention_heads),
            "LayerNorm_2": ln(p + ".final_layer_norm"), "MlpBlock_0": mlp(p)}
    return {"shared_embedding": {"embedding": sd["model.shared.weight"]}, "encoder": enc, "decoder": dec}


def _moments(tree):
    """An optimizer-state twin of the parameter tree (zeros), like Adam's mu/nu."""
    return {k: _moments(v) if isinstance(v, dict) else np.zeros_like(v) for k, v in tree.items()}


def randomize_norms_and_ffn_biases(model):
    """The reference init leaves LayerNorms at (1, 0) and biases at 0; random values make every mapping visible."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
            elif name.endswith(("fc1", "fc2")):
                module.bias.normal_(0.0, 0.2)
    return model


def reference_pegasus_x(seed=0, **overrides):
    from transformers import PegasusXConfig as RefConfig
    from transformers import PegasusXForConditionalGeneration as RefModel

    torch.manual_seed(seed)
    return randomize_norms_and_ffn_biases(RefModel(RefConfig(**tiny_kwargs(**overrides))).eval())


def logits(model, vocab, lengths=(13, 9)):
    ids, mask, dec = random_batch(list(lengths), vocab, seed=1)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits


def set_layer_norm_eps(model, eps):
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = eps


# ---------------------------------------------------------------------------------------------------- flax
@pytest.mark.parametrize("layout", ["optimizer.target", "train_state", "bare"])
def test_flax_logits_equal_reference(tmp_path, layout):
    ref = reference_pegasus_x()
    set_layer_norm_eps(ref, FLAX_LAYER_NORM_EPS)           # stands in for the Flax model, epsilon included
    params = flax_params(ref)
    tree = {"optimizer.target": {"optimizer": {"target": params, "state": {
                "step": np.int64(1000), "param_states": {"shared_embedding": {"embedding": {
                    "v_row": np.ones(96, np.float32), "v_col": np.ones(32, np.float32)}}}}}},
            # optax TrainState: the parameters beside Adam moments that mirror them (zeros) one level deeper
            "train_state": {"step": np.int64(7), "params": params,
                            "opt_state": {"0": {"count": np.int32(7), "mu": _moments(params),
                                                "nu": _moments(params)}}},
            "bare": params}[layout]
    ckpt = write_flax(tmp_path / "checkpoint_1000", tree)
    result = convert_flax(ckpt, tmp_path / "out", block_size=8, write_tokenizer=False)
    ours = PegasusXForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert result.config.encoder_layers == 3 and result.config.decoder_layers == 2
    assert result.config.encoder_attention_heads == 4 and result.config.num_global_tokens == 5
    assert result.config.encoder_ffn_dim == 48 and result.config.vocab_size == 96
    torch.testing.assert_close(logits(ours, 96), logits(ref, 96), atol=1e-4, rtol=1e-4)


def test_flax_flat_kernels_need_head_count_and_directory_picks_latest(tmp_path):
    ref = reference_pegasus_x(seed=1)
    set_layer_norm_eps(ref, FLAX_LAYER_NORM_EPS)
    write_flax(tmp_path / "checkpoint_5", {"target": flax_params(reference_pegasus_x(seed=2), flat_kernels=True)})
    write_flax(tmp_path / "checkpoint_20", {"target": flax_params(ref, flat_kernels=True)})
    convert_flax(tmp_path, tmp_path / "out", num_heads=4, block_size=8, write_tokenizer=False)
    ours = PegasusXForConditionalGeneration.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(ours, 96), logits(ref, 96), atol=1e-4, rtol=1e-4)


def test_flax_folder_is_complete_with_tokenizer(tmp_path):
    from pegasus_x.tokenizer import PegasusTokenizer

    ref = reference_pegasus_x(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=1)
    ckpt = write_flax(tmp_path / "ckpt", {"target": flax_params(ref)})
    result = convert_flax(ckpt, tmp_path / "out", block_size=8)
    assert result.tokenizer_written
    tok = PegasusTokenizer.from_pretrained(tmp_path / "out")
    assert tok.encode("To ensure a smooth flow of bank resolutions.") == [413, 615, 114, 2291, 1971, 113, 1679,
                                                                           10710, 107, 1]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "pegasus_x" and config["vocab_size"] == VOCAB
    assert config["block_size"] == 8 and config["stagger_local_blocks"] is True
    assert config["activation_function"] == "relu"
    with pytest.raises(CheckpointError, match="already holds"):
        convert_flax(ckpt, tmp_path / "out", block_size=8)


def test_layer_norm_eps_decision(tmp_path):
    """The Flax model's LayerNorm uses eps 1e-12; config.json records it, and loading honours it.

    A reference model with every LayerNorm at 1e-12 stands in for the Flax model (the architecture is the same).
    The converted model matches it; forced back to 1e-5 it differs measurably but slightly.
    """
    flax_like = reference_pegasus_x(seed=3)
    set_layer_norm_eps(flax_like, FLAX_LAYER_NORM_EPS)
    write_flax(tmp_path / "ckpt", {"target": flax_params(flax_like)})
    convert_flax(tmp_path / "ckpt", tmp_path / "out", block_size=8, write_tokenizer=False)
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())["layer_norm_eps"]
    assert recorded == 1e-12
    ours = PegasusXForConditionalGeneration.from_pretrained(tmp_path / "out")
    expected = logits(flax_like, 96)
    torch.testing.assert_close(logits(ours, 96), expected, atol=1e-5, rtol=1e-5)
    set_layer_norm_eps(ours, 1e-5)
    gap = (logits(ours, 96) - expected).abs().max().item()
    assert 1e-6 < gap < 1e-2 * expected.abs().max().item()     # measured 2.6e-4 on logits of size 5.8


def test_flax_reader_decodes_bfloat16_and_chunked_arrays(tmp_path):
    ref = reference_pegasus_x()
    params = flax_params(ref)
    emb = params["shared_embedding"]["embedding"]
    flat = emb.reshape(-1)
    # flax splits arrays over 1 GiB into {"__msgpack_chunked_array__", "shape", "chunks"}; same layout, tiny chunks
    params["shared_embedding"]["embedding"] = {"__msgpack_chunked_array__": True,
                                               "shape": {str(i): n for i, n in enumerate(emb.shape)},
                                               "chunks": {"0": flat[:1000], "1": flat[1000:]}}
    glob = params["encoder"]["Embed_0"]["embedding"]
    bf16_bits = (glob.view(np.uint32) >> 16).astype(np.uint16)       # bfloat16 = the top half of float32
    params["encoder"]["Embed_0"]["embedding"] = msgpack.ExtType(1, msgpack.packb(
        (glob.shape, "bfloat16", bf16_bits.tobytes()), use_bin_type=True))
    read = read_flax_params(write_flax(tmp_path / "ckpt", {"target": params}))
    np.testing.assert_array_equal(read["shared_embedding/embedding"], emb)
    np.testing.assert_array_equal(read["encoder/Embed_0/embedding"],
                                  (bf16_bits.astype(np.uint32) << 16).view(np.float32))
    assert 0 < np.abs(read["encoder/Embed_0/embedding"] - glob).max() <= np.abs(glob).max() * 2 ** -7


def test_flax_errors_name_the_problem(tmp_path):
    params = flax_params(reference_pegasus_x())
    params["encoder"]["posembed_input"] = {"pos_embedding": np.zeros((1, 16, 32), np.float32)}
    write_flax(tmp_path / "learned", {"target": params})
    with pytest.raises(CheckpointError, match="posembed_input"):
        convert_flax(tmp_path / "learned", tmp_path / "o1", block_size=8, write_tokenizer=False)
    (tmp_path / "garbage").write_bytes(b"\xc1 not msgpack")
    with pytest.raises(CheckpointError, match="not a Flax msgpack"):
        read_flax_params(tmp_path / "garbage")
    write_flax(tmp_path / "other", {"params": {"Dense_0": {"kernel": np.zeros((2, 2), np.float32)}}})
    with pytest.raises(CheckpointError, match="no PEGASUS-X parameter tree"):
        read_flax_params(tmp_path / "other")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_flax_params(tmp_path / "missing")
    params = flax_params(reference_pegasus_x())
    write_flax(tmp_path / "ok", {"target": params})
    with pytest.raises(ConfigError, match="contradicts"):
        convert_flax(tmp_path / "ok", tmp_path / "o2", num_heads=2, block_size=8, write_tokenizer=False)


# ---------------------------------------------------------------------------------------------------- pegasus
def pegasus_folder(tmp_path, seed=0, q_bias=0.0, k_bias=0.0, vocab=96):
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    torch.manual_seed(seed)
    config = PegasusConfig(vocab_size=vocab, d_model=32, encoder_layers=3, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                           decoder_ffn_dim=48, max_position_embeddings=64, activation_function="relu",
                           scale_embedding=True, init_std=0.2, dropout=0.0)
    model = randomize_norms_and_ffn_biases(PegasusForConditionalGeneration(config).eval())
    with torch.no_grad():
        model.model.encoder.layers[1].self_attn.q_proj.bias.fill_(q_bias)
        model.model.decoder.layers[0].encoder_attn.k_proj.bias.normal_(std=k_bias)
    folder = tmp_path / f"pegasus-{seed}"
    model.save_pretrained(folder)
    return model, folder


def test_pegasus_conversion_copies_weights_and_runs_in_both_models(tmp_path):
    from transformers import PegasusXForConditionalGeneration as RefModel

    pegasus, folder = pegasus_folder(tmp_path, vocab=VOCAB)
    result = convert_pegasus(folder, tmp_path / "px", block_size=8, num_global_tokens=5, seed=3)
    src = {k: v.detach() for k, v in pegasus.state_dict().items()}
    out = PegasusXForConditionalGeneration.from_pretrained(tmp_path / "px")
    dst = {k: v.detach() for k, v in out.state_dict().items()}

    copied = [k for k in src if not (k.endswith("embed_positions.weight") or k == "final_logits_bias"
                                     or (k.endswith("_proj.bias")))]
    assert len(copied) > 50
    for name in copied:
        torch.testing.assert_close(dst[name], src[name], atol=0, rtol=0, msg=name)
    for i in range(3):
        for p in ("weight", "bias"):
            torch.testing.assert_close(dst[f"model.encoder.layers.{i}.global_self_attn_layer_norm.{p}"],
                                       src[f"model.encoder.layers.{i}.self_attn_layer_norm.{p}"], atol=0, rtol=0)
    rows = result.global_rows
    assert len(rows) == len(set(rows)) == 5 and 0 not in rows
    torch.testing.assert_close(dst["model.encoder.embed_global.weight"], src["model.shared.weight"][rows],
                               atol=0, rtol=0)
    assert result.config.block_size == 8 and result.config.stagger_local_blocks
    assert result.config.max_position_embeddings == 16384 and result.config.activation_function == "relu"
    assert result.tokenizer_written and (tmp_path / "px" / "tokenizer.json").is_file()

    ref = RefModel.from_pretrained(tmp_path / "px").eval()
    torch.testing.assert_close(logits(out, VOCAB), logits(ref, VOCAB), atol=1e-4, rtol=1e-4)


def test_pegasus_global_rows_follow_the_seed(tmp_path):
    _, folder = pegasus_folder(tmp_path)
    a = convert_pegasus(folder, tmp_path / "a", block_size=8, num_global_tokens=6, seed=1, write_tokenizer=False)
    b = convert_pegasus(folder, tmp_path / "b", block_size=8, num_global_tokens=6, seed=1, write_tokenizer=False)
    c = convert_pegasus(folder, tmp_path / "c", block_size=8, num_global_tokens=6, seed=2, write_tokenizer=False)
    assert a.global_rows == b.global_rows != c.global_rows


def test_pegasus_key_bias_is_dropped_exactly(tmp_path):
    """Why k biases may go: PEGASUS' own logits do not change when they are removed (softmax shift invariance)."""
    pegasus, folder = pegasus_folder(tmp_path, k_bias=0.5)
    ids, mask, dec = random_batch([11, 7], 96, seed=2)
    with torch.no_grad():
        with_bias = pegasus(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        pegasus.model.decoder.layers[0].encoder_attn.k_proj.bias.zero_()
        without = pegasus(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(with_bias, without, atol=1e-5, rtol=1e-5)
    result = convert_pegasus(folder, tmp_path / "px", block_size=8, num_global_tokens=5, write_tokenizer=False)
    assert "model.decoder.layers.0.encoder_attn.k_proj.bias (non-zero)" in result.dropped


def test_pegasus_nonzero_query_bias_refused_unless_dropped(tmp_path):
    _, folder = pegasus_folder(tmp_path, q_bias=0.3)
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.self_attn\.q_proj\.bias.*--drop-bias"):
        convert_pegasus(folder, tmp_path / "px", block_size=8, num_global_tokens=5, write_tokenizer=False)
    assert not (tmp_path / "px" / "config.json").exists()
    result = convert_pegasus(folder, tmp_path / "px", block_size=8, num_global_tokens=5, drop_bias=True,
                             write_tokenizer=False)
    assert "model.encoder.layers.1.self_attn.q_proj.bias (non-zero)" in result.dropped


def test_pegasus_rejects_other_model_types(tmp_path):
    ref = reference_pegasus_x()
    ref.save_pretrained(tmp_path / "px")
    with pytest.raises(ConfigError, match="already a PEGASUS-X"):
        convert_pegasus(tmp_path / "px", tmp_path / "out")
    with pytest.raises(CheckpointError, match="no config.json"):
        convert_pegasus(tmp_path / "nowhere", tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_subcommands(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    write_flax(tmp_path / "ckpt", {"target": flax_params(reference_pegasus_x())})
    args = parser.parse_args(["convert", "flax", str(tmp_path / "ckpt"), str(tmp_path / "f"), "--block-size", "8",
                              "--no-tokenizer"])
    assert args.func(args) == 0
    assert "3+2 layers" in capsys.readouterr().out
    assert PegasusXForConditionalGeneration.from_pretrained(tmp_path / "f").config.block_size == 8

    _, folder = pegasus_folder(tmp_path, q_bias=0.3)
    args = parser.parse_args(["convert", "pegasus", str(folder), str(tmp_path / "p"), "--block-size", "8",
                              "--num-global-tokens", "4", "--no-stagger", "--drop-bias", "--no-tokenizer"])
    assert args.func(args) == 0
    assert "non-zero bias" in capsys.readouterr().out
    config = PegasusXForConditionalGeneration.from_pretrained(tmp_path / "p").config
    assert config.num_global_tokens == 4 and not config.stagger_local_blocks
