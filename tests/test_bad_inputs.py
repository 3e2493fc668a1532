"""Bad input at every public entry point: our exception type, a phrase naming the problem, no file touched.

Plus hypothesis property tests (random ids/masks/lengths/options: each valid input is accepted with a correct
result, each invalid one raises one of our exceptions, nothing else) and a kill test (a process SIGKILLed while
saving leaves a loadable checkpoint).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import pegasus_x
from conftest import tiny_kwargs
from pegasus_x import (CheckpointError, ConfigError, GenerationError, InputError, PegasusXConfig, PegasusXError,
                       PegasusXForConditionalGeneration, Summarizer, TokenizerError)
from pegasus_x.cli import main
from pegasus_x.config import ACTIVATIONS
from pegasus_x.tokenizer import PegasusTokenizer

V = 96
torch.manual_seed(0)
MODEL = PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs())).eval()
TOK = PegasusTokenizer.pegasus()
IDS = torch.randint(2, V, (2, 11))
DEC = torch.zeros(2, 3, dtype=torch.long)


def _fwd(**kw):
    args = dict(input_ids=IDS, decoder_input_ids=DEC)
    args.update(kw)
    return lambda: MODEL(**args)


def _gen(**kw):
    return lambda: MODEL.generate(IDS, **kw)


def _save_folder(tmp: Path, mutate) -> Path:
    folder = tmp / "ckpt"
    MODEL.save_pretrained(folder)
    mutate(folder)
    return folder


def _untouched(setup, act):
    """A case taking a folder: ``setup(tmp)`` prepares it, then ``act`` (which must raise) may change nothing there."""
    def run(tmp):
        prepared = setup(tmp)
        before = _snapshot(tmp)
        try:
            act(prepared)
        finally:
            assert _snapshot(tmp) == before, "a failed call changed files in its folder"
    return run


def _load(mutate):
    return _untouched(lambda tmp: _save_folder(tmp, mutate), PegasusXForConditionalGeneration.from_pretrained)


def _load_with(**options):
    """Loading a saved checkpoint with bad ``from_pretrained`` options."""
    return _untouched(lambda tmp: _save_folder(tmp, lambda folder: None),
                      lambda folder: PegasusXForConditionalGeneration.from_pretrained(folder, **options))


def _write(name, text):
    return lambda folder: (folder / name).write_text(text)


def _edit_config(**changes):
    def mutate(folder):
        data = json.loads((folder / "config.json").read_text())
        data.update(changes)
        (folder / "config.json").write_text(json.dumps(data))
    return mutate


def _edit_weights(fn):
    def mutate(folder):
        state = load_file(folder / "model.safetensors")
        fn(state)
        save_file(state, folder / "model.safetensors")
    return mutate


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _index(weight_map):
    """A sharded folder whose index maps to ``weight_map`` (the single-file weights removed)."""
    return lambda folder: ((folder / "model.safetensors").unlink(),
                           (folder / "model.safetensors.index.json").write_text(
                               json.dumps({"metadata": {}, "weight_map": weight_map})))


def _tok(mutate):
    def run(tmp):
        folder = tmp / "tok"
        TOK.save_pretrained(folder)
        mutate(folder)
        PegasusTokenizer.from_pretrained(folder)
    return run


DEEP = "[" * 10**5 + "]" * 10**5    # past Python's recursion limit: json.loads raises RecursionError


def _mask_with(value):
    mask = torch.ones(2, 11)
    mask[1, 4] = value
    return mask


# A device this machine lacks, whatever it has.
NO_GPU = "cuda" if not torch.cuda.is_available() else "cuda:99"
NO_MPS = "mps" if not torch.backends.mps.is_available() else "xpu"


def _evil_bin(folder):
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.shared.weight": _Evil()}, f)


# (id, callable, expected type, phrase). Callables taking one argument get a temporary folder.
CASES = [
    # model forward
    ("ids-float", _fwd(input_ids=IDS.float()), InputError, "integer token ids"),
    ("ids-1d", _fwd(input_ids=IDS[0]), InputError, "ids[None]"),
    ("ids-3d", _fwd(input_ids=IDS[None]), InputError, "(batch, length)"),
    ("ids-list", _fwd(input_ids=[[1, 2]]), InputError, "LongTensor"),
    ("ids-too-big", _fwd(input_ids=torch.full((1, 4), V)), InputError, "outside the vocabulary"),
    ("ids-negative", _fwd(input_ids=torch.full((1, 4), -3)), InputError, "outside the vocabulary"),
    ("ids-empty-batch", _fwd(input_ids=torch.zeros(0, 4, dtype=torch.long)), InputError, "empty"),
    ("ids-zero-length", _fwd(input_ids=torch.zeros(2, 0, dtype=torch.long)), InputError, "empty"),
    ("mask-shape", _fwd(attention_mask=torch.ones(2, 5)), InputError, "must match"),
    ("mask-all-zero", _fwd(attention_mask=torch.zeros(2, 11)), InputError, "all zeros"),
    ("mask-not-tensor", _fwd(attention_mask=[[1] * 11] * 2), InputError, "must be a tensor"),
    ("dec-mask-start", _fwd(decoder_attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]])), InputError,
     "start token"),
    ("dec-ids-too-big", _fwd(decoder_input_ids=torch.full((2, 3), 10_000)), InputError, "outside the vocabulary"),
    ("labels-float", _fwd(labels=torch.ones(2, 3)), InputError, "labels"),
    ("labels-out-of-range", _fwd(labels=torch.full((2, 3), 500)), InputError, "ignore index"),
    ("labels-shape", _fwd(labels=torch.ones(2, 4, dtype=torch.long)), InputError, "must match"),
    ("no-decoder-inputs", lambda: MODEL(input_ids=IDS), InputError, "decoder_input_ids or labels"),
    ("fp16-model", lambda: PegasusXForConditionalGeneration(PegasusXConfig(**tiny_kwargs())).half()(
        input_ids=IDS, decoder_input_ids=DEC), ConfigError, "bfloat16"),
    # generate
    ("gen-max-new-zero", _gen(max_new_tokens=0), GenerationError, "max_new_tokens"),
    ("gen-max-new-float", _gen(max_new_tokens=2.5), GenerationError, "integer"),
    ("gen-beams-zero", _gen(num_beams=0), GenerationError, "num_beams"),
    ("gen-nrs-gt-beams", _gen(num_beams=2, num_return_sequences=3), GenerationError, "larger than num_beams"),
    ("gen-nrs-greedy", _gen(num_return_sequences=2), GenerationError, "needs beam search"),
    ("gen-top-p-zero", _gen(do_sample=True, top_p=0.0), GenerationError, "top_p"),
    ("gen-top-p-big", _gen(do_sample=True, top_p=1.5), GenerationError, "top_p"),
    ("gen-temperature", _gen(do_sample=True, temperature=0), GenerationError, "temperature"),
    ("gen-unknown-option", _gen(beams=4), GenerationError, "unknown generation option"),
    ("gen-bad-words", _gen(bad_words_ids=[[1000]]), GenerationError, "bad_words_ids"),
    ("gen-repetition", _gen(repetition_penalty=0), GenerationError, "repetition_penalty"),
    ("gen-early-stopping", _gen(num_beams=2, early_stopping="soon"), GenerationError, "early_stopping"),
    ("gen-bad-ids", lambda: MODEL.generate(torch.full((1, 3), V + 5)), InputError, "outside the vocabulary"),
    ("gen-mask-zero", lambda: MODEL.generate(IDS, torch.zeros_like(IDS)), InputError, "all zeros"),
    # config
    ("cfg-heads", lambda: PegasusXConfig(d_model=30, encoder_attention_heads=4), ConfigError, "not divisible"),
    ("cfg-odd-block", lambda: PegasusXConfig(block_size=9), ConfigError, "even"),
    ("cfg-zero-layers", lambda: PegasusXConfig(decoder_layers=0), ConfigError, "positive integer"),
    ("cfg-activation", lambda: PegasusXConfig(activation_function="swishy"), ConfigError, "unknown"),
    ("cfg-not-dict", lambda: PegasusXConfig.from_dict([1, 2]), ConfigError, "JSON object"),
    ("cfg-bool-size", lambda: PegasusXConfig(d_model=True), ConfigError, "positive integer"),
    ("cfg-backend", lambda: MODEL.set_attention_backend("flash9"), ConfigError, "unknown"),
    # checkpoint loading
    ("ckpt-missing-folder", _untouched(lambda tmp: tmp / "none", PegasusXForConditionalGeneration.from_pretrained),
     CheckpointError, "does not exist"),
    ("ckpt-file-not-folder", _untouched(lambda tmp: (tmp.joinpath("f").write_text("x"), tmp / "f")[1],
                                        PegasusXForConditionalGeneration.from_pretrained),
     CheckpointError, "is a file"),
    ("ckpt-no-config", _load(lambda f: (f / "config.json").unlink()), CheckpointError, "no config.json"),
    ("ckpt-bad-json", _load(_write("config.json", "{not json")), CheckpointError, "not valid JSON"),
    ("ckpt-bad-config-value", _load(_edit_config(block_size=7)), ConfigError, "even"),
    ("ckpt-no-weights", _load(lambda f: (f / "model.safetensors").unlink()), CheckpointError, "no weights"),
    ("ckpt-corrupt-safetensors", _load(_write("model.safetensors", "garbage")), CheckpointError,
     "not a valid safetensors"),
    ("ckpt-shape-mismatch", _load(_edit_config(encoder_ffn_dim=64)), CheckpointError, "shape mismatch"),
    ("ckpt-missing-key", _load(_edit_weights(lambda s: s.pop("model.encoder.layer_norm.bias"))), CheckpointError,
     "model.encoder.layer_norm.bias"),
    ("ckpt-int-weights", _load(_edit_weights(lambda s: s.update({"model.encoder.layer_norm.bias":
                                                                 torch.zeros(32, dtype=torch.int64)}))),
     CheckpointError, "not a floating"),
    ("ckpt-pickle-code", _load(_evil_bin), CheckpointError, "refused"),
    ("ckpt-nan-strict", _untouched(lambda tmp: _save_folder(tmp, _edit_weights(
        lambda s: s["model.encoder.layer_norm.weight"].fill_(float("nan")))),
        lambda folder: PegasusXForConditionalGeneration.from_pretrained(folder, strict=True)),
     CheckpointError, "NaN"),
    ("ckpt-bad-index", _load(lambda f: ((f / "model.safetensors").unlink(),
                                        (f / "model.safetensors.index.json").write_text("[]"))),
     CheckpointError, "must hold a JSON object {...}, not an array"),
    ("ckpt-bad-dtype-arg", _load_with(dtype="int8"), ConfigError, "unknown"),
    # masks, ids, seeds, devices, dtypes and paths (issue #15, items 13 and 16)
    ("mask-nan", _fwd(attention_mask=_mask_with(float("nan"))), InputError, "attention_mask holds nan"),
    ("mask-two", _fwd(attention_mask=_mask_with(2).long()), InputError, "attention_mask holds 2"),
    ("mask-minus-one", _fwd(attention_mask=_mask_with(-1)), InputError, "holds -1.0; it must hold only 1"),
    ("mask-half", _fwd(attention_mask=_mask_with(0.5)), InputError, "holds 0.5"),
    ("dec-mask-two", _fwd(decoder_attention_mask=torch.tensor([[1, 1, 2], [1, 1, 1]])), InputError,
     "decoder_attention_mask holds 2"),
    ("gen-mask-nan", lambda: MODEL.generate(IDS, _mask_with(float("nan"))), InputError, "holds nan"),
    ("ids-meta", _fwd(input_ids=torch.zeros(2, 4, dtype=torch.long, device="meta")), InputError, "meta device"),
    ("gen-ids-meta", lambda: MODEL.generate(IDS.to("meta")), InputError, "meta device"),
    ("gen-seed-huge", _gen(do_sample=True, seed=2**70, max_new_tokens=2), GenerationError, "seed must be"),
    ("gen-seed-negative", _gen(do_sample=True, seed=-1, max_new_tokens=2), GenerationError, "seed must be"),
    ("ckpt-device-banana", _load_with(device="banana"),
     InputError, "device 'banana' is unknown"),
    ("ckpt-device-no-gpu", _load_with(device=NO_GPU),
     InputError, f"device '{NO_GPU}'"),
    ("ckpt-device-no-mps", _load_with(device=NO_MPS),
     InputError, f"device '{NO_MPS}'"),
    ("ckpt-device-meta", _load_with(device="meta"),
     InputError, "not supported"),
    ("ckpt-dtype-int32", _load_with(dtype=torch.int32),
     ConfigError, "torch.int32 is not supported"),
    ("ckpt-dtype-fp16", _load_with(dtype="fp16"),
     ConfigError, "float16 overflows"),
    ("ckpt-path-none", lambda: PegasusXForConditionalGeneration.from_pretrained(None), InputError,
     "checkpoint folder or a hub id"),
    ("summarizer-device-no-mps", lambda: Summarizer(MODEL, TOK, device=NO_MPS), InputError, f"device '{NO_MPS}'"),
    ("summarizer-device-banana", lambda: Summarizer(MODEL, TOK, device="banana"), InputError, "unknown"),
    ("summarizer-dtype-int32", lambda: Summarizer(MODEL, TOK, dtype=torch.int32), ConfigError, "not supported"),
    # model files (issue #15, items 6, 10 and 15): sizes, types, one JSON reader, shard paths
    ("cfg-layers-1e9", _load(_edit_config(encoder_layers=10**9)), ConfigError,
     "config.encoder_layers=1,000,000,000 is larger than the ceiling 1,024"),
    ("cfg-block-1e9", _load(_edit_config(block_size=10**9)), ConfigError, "block_size=1,000,000,000 is larger"),
    ("cfg-vocab-huge", lambda: PegasusXConfig(vocab_size=10**8), ConfigError, "vocab_size=100,000,000 is larger"),
    ("cfg-tie-string", _load(_edit_config(tie_word_embeddings="false")), ConfigError,
     "config.tie_word_embeddings must be true or false (a JSON boolean, not a string), got 'false'"),
    ("cfg-stagger-string", _load(_edit_config(stagger_local_blocks="false")), ConfigError,
     "config.stagger_local_blocks must be true or false"),
    ("cfg-scale-int", lambda: PegasusXConfig(scale_embedding=1), ConfigError, "scale_embedding must be true or false"),
    ("cfg-float-layers", _load(_edit_config(encoder_layers=2.0)), ConfigError,
     "encoder_layers must be a positive integer, got 2.0"),
    ("cfg-bool-token-id", lambda: PegasusXConfig(pad_token_id=False), ConfigError,
     "pad_token_id must be an integer, got False"),
    ("cfg-forced-eos-string", lambda: PegasusXConfig(forced_eos_token_id="1"), ConfigError,
     "forced_eos_token_id must be an integer or null"),
    ("cfg-forced-eos-range", lambda: PegasusXConfig(forced_eos_token_id=10**6), ConfigError, "token id in [0"),
    ("cfg-init-std-inf", lambda: PegasusXConfig(init_std=float("inf")), ConfigError,
     "init_std must be a finite number"),
    ("cfg-dropout-bool", lambda: PegasusXConfig(dropout=False), ConfigError, "dropout must be a finite number"),
    ("cfg-activation-list", lambda: PegasusXConfig(activation_function=["relu"]), ConfigError,
     "activation_function must be a string"),
    ("cfg-json-nan", _load(_edit_config(init_std=float("nan"))), CheckpointError, "NaN is not a JSON value"),
    ("cfg-json-array", _load(_write("config.json", "[1, 2]")), CheckpointError,
     "config.json must hold a JSON object {...}, not an array"),
    ("cfg-json-deep", _load(_write("config.json", DEEP)), CheckpointError, "nested more deeply"),
    ("cfg-json-huge", _load(_write("config.json", '{"a": "' + "x" * (16 * 2**20) + '"}')), CheckpointError,
     "is larger than 16,777,216 bytes"),
    ("cfg-json-latin1", _load(lambda f: (f / "config.json").write_bytes(b'{"a": "\xe9"}')), CheckpointError,
     "not UTF-8"),
    ("gen-config-array", _load(_write("generation_config.json", "[4]")), CheckpointError,
     "generation_config.json must hold a JSON object {...}, not an array"),
    ("gen-config-string", _load(_write("generation_config.json", '"beam"')), CheckpointError, "not a string"),
    ("gen-config-deep", _load(_write("generation_config.json", DEEP)), CheckpointError, "nested more deeply"),
    ("index-int-value", _load(_index({"model.shared.weight": 5})), CheckpointError,
     "'model.shared.weight' maps to 5, not a file name"),
    ("index-map-int", _load(lambda f: ((f / "model.safetensors").unlink(),
                                       (f / "model.safetensors.index.json").write_text('{"weight_map": 7}'))),
     CheckpointError, "weight_map"),
    ("index-absolute", _load(_index({"model.shared.weight": "/etc/passwd"})), CheckpointError,
     "no absolute path"),
    ("index-absolute-shard", _load(_index({"model.shared.weight": "/tmp/model.safetensors"})), CheckpointError,
     "inside the checkpoint folder"),
    ("index-dotdot", _load(_index({"model.shared.weight": "../ckpt/model.safetensors"})), CheckpointError,
     "no '..'"),
    ("index-deep", _load(lambda f: ((f / "model.safetensors").unlink(),
                                    (f / "model.safetensors.index.json").write_text(DEEP))),
     CheckpointError, "nested more deeply"),
    ("tok-special-map-int", _tok(_write("special_tokens_map.json", '{"pad_token": 5}')), TokenizerError,
     "special_tokens_map.json: \"pad_token\" must be a token string"),
    ("tok-special-map-content", _tok(_write("special_tokens_map.json", '{"eos_token": {"content": ["</s>"]}}')),
     TokenizerError, "\"eos_token\" must be a token string"),
    ("tok-special-map-array", _tok(_write("special_tokens_map.json", '["<pad>"]')), TokenizerError,
     "special_tokens_map.json must hold a JSON object"),
    ("tok-offset-string", _tok(_write("tokenizer_config.json", '{"offset": "x"}')), TokenizerError,
     "\"offset\" must be an integer in [2, 65536] (103 for PEGASUS), got 'x'"),
    ("tok-offset-huge", _tok(_write("tokenizer_config.json", '{"offset": 1000000000}')), TokenizerError,
     "\"offset\" must be an integer"),
    ("tok-clean-up-string", _tok(_write("tokenizer_config.json", '{"clean_up_tokenization_spaces": "false"}')),
     TokenizerError, "clean_up_tokenization_spaces\" must be true or false"),
    ("tok-config-deep", _tok(_write("tokenizer_config.json", DEEP)), TokenizerError, "nested more deeply"),
    # tokenizer
    ("tok-none", lambda: TOK(None), TokenizerError, "expected text"),
    ("tok-bytes", lambda: TOK(b"abc"), TokenizerError, "decode bytes"),
    ("tok-list-int", lambda: TOK(["a", 3]), TokenizerError, "text[1]"),
    ("tok-missing-folder", _untouched(lambda tmp: tmp / "nope", PegasusTokenizer.from_pretrained), TokenizerError,
     "does not exist"),
    ("tok-empty-folder", _untouched(lambda tmp: tmp, PegasusTokenizer.from_pretrained), TokenizerError,
     "tokenizer.json"),
]


PACKAGE = Path(pegasus_x.__file__).parent


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``root`` but bytecode caches (a first import may write those)."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")
            if "__pycache__" not in p.parts}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_our_error(case, tmp_path, monkeypatch):
    """Each case raises its error naming the problem, and writes nothing: not into the package, not into the
    working directory (an empty folder here), and not into the folder of the cases that take one."""
    name, fn, exc_type, phrase = case
    work = tmp_path / "work"
    work.mkdir()
    takes_tmp = fn.__code__.co_argcount == 1
    package = _snapshot(PACKAGE)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(exc_type) as info:
        fn(work) if takes_tmp else fn()
    assert isinstance(info.value, PegasusXError)
    assert phrase.lower() in str(info.value).lower(), str(info.value)
    assert _snapshot(PACKAGE) == package
    assert not any(cwd.iterdir())


@pytest.mark.parametrize("device", ["banana", NO_GPU, NO_MPS, "meta"])
def test_cli_device_unavailable_is_one_line(device, tmp_path, capsys):
    """``pegasus-x summarize --device X`` for a device this machine lacks: one line, exit 2, before any loading."""
    text = tmp_path / "a.txt"
    text.write_text("A short text to summarize.")
    assert main(["summarize", "--model", str(tmp_path / "never-read"), "--device", device, str(text)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("pegasus-x: error: device"), err


# ---------------------------------------------------------------------------------------------- properties
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.slow
@PROPERTY
@given(batch=st.integers(0, 3), length=st.integers(0, 30), dec_len=st.integers(0, 4), low=st.integers(-2, V),
       high=st.integers(0, V + 2), mask_kind=st.sampled_from(["none", "ones", "random", "zeros", "wrong-shape"]),
       dtype=st.sampled_from([torch.long, torch.int32, torch.float32]), seed=st.integers(0, 2**16))
def test_forward_property(batch, length, dec_len, low, high, mask_kind, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = min(low, high), max(low, high) + 1
    ids = torch.randint(lo, hi, (batch, length), generator=g).to(dtype)
    mask = {"none": None, "ones": torch.ones(batch, length), "zeros": torch.zeros(batch, length),
            "random": torch.randint(0, 2, (batch, length), generator=g),
            "wrong-shape": torch.ones(batch, length + 1)}[mask_kind]
    dec = torch.zeros(batch, dec_len, dtype=torch.long)
    valid = (batch > 0 and length > 0 and dec_len > 0 and dtype != torch.float32
             and 0 <= int(ids.min()) and int(ids.max()) < V
             and (mask is None or (mask.shape == ids.shape and bool(mask.any(dim=1).all()))))
    call = lambda: MODEL(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)  # noqa: E731
    if not valid:
        with pytest.raises(PegasusXError):
            call()
        return
    with torch.no_grad():
        out = call()
    assert out.logits.shape == (batch, dec_len, V)
    assert torch.isfinite(out.logits).all()


@pytest.mark.slow
@PROPERTY
@given(beams=st.integers(-1, 4), nrs=st.integers(0, 4), max_new=st.integers(-1, 6), min_new=st.integers(0, 8),
       sample=st.booleans(), top_p=st.floats(-0.5, 1.5), top_k=st.integers(-1, 200),
       temperature=st.floats(-1.0, 3.0), ngram=st.integers(0, 3), rep=st.floats(0.0, 2.0),
       lengths=st.lists(st.integers(1, 20), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_generate_property(beams, nrs, max_new, min_new, sample, top_p, top_k, temperature, ngram, rep, lengths,
                           seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    opts = dict(num_beams=beams, num_return_sequences=nrs, max_new_tokens=max_new, min_new_tokens=min_new,
                do_sample=sample, top_p=top_p, top_k=top_k, temperature=temperature, no_repeat_ngram_size=ngram,
                repetition_penalty=rep, seed=seed)
    valid = (beams >= 1 and nrs >= 1 and max_new >= 1 and top_k >= 0 and 0 < top_p <= 1 and temperature >= 1e-4
             and rep >= torch.finfo(torch.float32).tiny
             and (nrs <= beams if beams > 1 else nrs == 1 or sample))
    if not valid:
        with pytest.raises(PegasusXError):
            MODEL.generate(ids, mask, **opts)
        return
    out = MODEL.generate(ids, mask, **opts)
    assert out.dtype == torch.long and out.shape[0] == len(lengths) * nrs
    assert 2 <= out.shape[1] <= max_new + 1 and bool((out[:, 0] == 0).all())
    assert int(out.min()) >= 0 and int(out.max()) < V


@PROPERTY
@given(texts=st.one_of(st.text(max_size=200), st.lists(st.one_of(st.text(max_size=50), st.integers(), st.none(),
                                                                   st.binary(max_size=5)), max_size=4),
                       st.none(), st.binary(max_size=10), st.integers()),
       padding=st.sampled_from([False, True, "longest", "max_length", "bogus"]),
       max_length=st.one_of(st.none(), st.integers(-2, 40)), truncation=st.booleans())
def test_tokenizer_property(texts, padding, max_length, truncation):
    valid = ((isinstance(texts, str) or isinstance(texts, list) and all(isinstance(t, str) for t in texts))
             and padding != "bogus" and (max_length is None or max_length >= 1))
    if not valid:
        with pytest.raises(PegasusXError):
            TOK(texts, padding=padding, max_length=max_length, truncation=truncation)
        return
    enc = TOK(texts, padding=padding, max_length=max_length, truncation=truncation)
    ids = enc["input_ids"]
    rows = [ids] if ids and isinstance(ids[0], int) else ids
    assert all(all(isinstance(i, int) and 0 <= i < TOK.vocab_size for i in row) for row in rows)
    if truncation and max_length and max_length > 0:
        assert all(len(row) <= max_length for row in rows)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _config_verdict(data: dict) -> bool | None:
    """Whether the documented rules accept ``data`` (True), refuse it (False), or leave it open (None: a bool
    where a number is expected, a non-bool staggering switch)."""
    if any(isinstance(data[k], bool) for k in ("dropout", "pad_token_id")):
        return None
    if not isinstance(data["stagger_local_blocks"], bool):
        return None
    sizes = ("d_model", "encoder_attention_heads", "block_size", "vocab_size", "num_global_tokens")
    if not all(_positive_int(data[k]) for k in sizes):
        return False
    eps, dropout, pad = data["layer_norm_eps"], data["dropout"], data["pad_token_id"]
    return (data["model_type"] == "pegasus_x"
            and data["d_model"] % data["encoder_attention_heads"] == 0 and data["d_model"] % 2 == 0
            and data["d_model"] >= 4 and not (data["stagger_local_blocks"] and data["block_size"] % 2)
            and isinstance(dropout, (int, float)) and 0 <= dropout < 1
            and isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1
            and data["activation_function"] in ACTIVATIONS
            and isinstance(pad, int) and 0 <= pad < data["vocab_size"] and data["vocab_size"] > 1)


CONFIG_VALUES = st.one_of(st.integers(-3, 100), st.floats(-1.0, 2.0), st.just(float("nan")), st.booleans(), st.none(),
                          st.text(max_size=5), st.sampled_from(["relu", "gelu"]))


@PROPERTY
@given(changes=st.dictionaries(st.sampled_from(["d_model", "encoder_attention_heads", "block_size", "dropout",
                                                "activation_function", "vocab_size", "pad_token_id",
                                                "stagger_local_blocks", "layer_norm_eps", "num_global_tokens",
                                                "model_type", "unknown_key"]), CONFIG_VALUES, max_size=4))
def test_config_property(changes):
    data = {**PegasusXConfig(**tiny_kwargs()).to_dict(), **changes}
    verdict = _config_verdict(data)
    if verdict is False:
        with pytest.raises(PegasusXError):
            PegasusXConfig.from_dict(data)
        return
    try:
        cfg = PegasusXConfig.from_dict(data)
    except PegasusXError:
        assert verdict is None, f"a valid config was refused: {changes}"
        return
    assert cfg.d_model % cfg.encoder_attention_heads == 0 and cfg.block_size > 0
    assert PegasusXConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.slow
@PROPERTY
@given(target=st.sampled_from(["model.safetensors", "config.json"]), position=st.floats(0.0, 1.0),
       data=st.binary(min_size=1, max_size=16), truncate=st.booleans())
def test_checkpoint_corruption_property(tmp_path_factory, target, position, data, truncate):
    folder = tmp_path_factory.mktemp("corrupt")
    MODEL.save_pretrained(folder)
    raw = bytearray((folder / target).read_bytes())
    at = int(position * (len(raw) - 1))
    changed = raw[:at] if truncate else raw[:at] + data + raw[at + len(data):]
    (folder / target).write_bytes(bytes(changed))
    # safetensors: an 8-byte header length, the JSON header, then the tensor bytes.
    data_start = 8 + int.from_bytes(raw[:8], "little") if target == "model.safetensors" else len(raw)
    if truncate and raw[at:].strip():            # bytes that mattered are gone (config.json ends in "\n")
        with pytest.raises(PegasusXError):
            PegasusXForConditionalGeneration.from_pretrained(folder)
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # changed tensor bytes may hold NaN: a warning without strict=True
            loaded = PegasusXForConditionalGeneration.from_pretrained(folder)
    except PegasusXError:
        # Only a changed header or config may be refused: new tensor values are still tensors.
        assert truncate or at < data_start or at + len(data) > len(raw), "changed tensor bytes were refused"
        return
    assert loaded.num_parameters() == MODEL.num_parameters()
    if target == "model.safetensors" and not truncate and at >= data_start:
        state = loaded.state_dict()       # the loaded values are the file's, changed bytes included
        for name, tensor in load_file(folder / target).items():
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, equal_nan=True, msg=name)


# ---------------------------------------------------------------------------------------------- kill test
@pytest.mark.slow
def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    big = PegasusXConfig(**tiny_kwargs(d_model=256, encoder_ffn_dim=1024, decoder_ffn_dim=1024, vocab_size=4096))
    PegasusXForConditionalGeneration(big).save_pretrained(folder)
    script = textwrap.dedent(f"""
        import sys, torch
        from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration
        cfg = PegasusXConfig.from_pretrained({str(folder)!r})
        model = PegasusXForConditionalGeneration(cfg)
        print("ready", flush=True)
        while True:
            model.save_pretrained({str(folder)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.7)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    loaded = PegasusXForConditionalGeneration.from_pretrained(folder)
    assert loaded.config.d_model == 256
