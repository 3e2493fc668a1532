"""Checkpoint converters: original Flax PEGASUS-X checkpoints, and PEGASUS → PEGASUS-X (the paper's recipe).

Both write a complete Hugging Face-layout folder (``config.json``, ``model.safetensors``, tokenizer files) through
:meth:`PegasusXForConditionalGeneration.save_pretrained`.

**Flax** (:func:`convert_flax`). The fine-tuned checkpoints (arXiv, BigPatent, PubMed, GovReport, QMSum, SummScreen)
are ``flax.training.checkpoints`` files: one msgpack document whose arrays are msgpack ext type 1 holding a nested
msgpack ``(shape, dtype name, C-order bytes)``; arrays over 1 GiB are split into
``{"__msgpack_chunked_array__", "shape", "chunks"}`` dicts. They are read with ``msgpack`` + numpy only (no JAX).
The parameter tree is found wherever it sits (``params`` of a TrainState, ``optimizer.target`` of the old
``flax.optim``, ``target``, or the root); optimizer state is skipped. Every parameter must be consumed by the name
map, so an unexpected variant (learned positions, multi-query attention, …) is an error, not a silent drop.

*LayerNorm epsilon.* The original model's LayerNorm is not flax.linen's: ``pegasus/flax/models/shared/
common_layers.py`` defines its own "LayerNorm to replicate tf.contrib" with ``epsilon = 1e-12`` in float32 (and
variance computed as E[x²] − E[x]²). The reference port always uses torch's 1e-5; our config has a
``layer_norm_eps`` field (default 1e-5), and converted folders record ``"layer_norm_eps": 1e-12`` so they reproduce
the Flax model. The difference is small — it matters only where a LayerNorm input has a variance near 1e-5, in
practice the first layer's *global* LayerNorm, whose input is an unscaled embedding row: on random tiny models
(``tests/test_convert.py``) logits move by 2.6e-4 (of 5.8) at init_std 0.2 and by 6e-6 (of 0.36) at init_std 0.02.

**PEGASUS** (:func:`convert_pegasus`), the paper's initialisation: all attention, FFN, LayerNorm and embedding
weights are reused; each encoder layer's pre-attention LayerNorm is copied into ``global_self_attn_layer_norm``;
the ``G`` global-token embeddings are ``G`` distinct rows of the token embedding drawn with a seeded generator (the
original draws with replacement: with 128 of 96,103 rows a duplicate happens ~8% of the time, and two identical
global tokens stay identical forever, so we draw without replacement, skipping the all-zero pad row). PEGASUS'
sinusoidal ``embed_positions`` tables are dropped (PEGASUS-X computes its positions).

*Biases.* PEGASUS-X attention has no biases; the PEGASUS port has q/k/v/out biases and a ``final_logits_bias``
(zero in checkpoints converted from the original, whose attention has none — ``pegasus/layers/attention.py`` uses
``use_bias=False`` — but models fine-tuned with the port may have learned some). A key bias adds the same q·b_k to every score of a query, which softmax
ignores, so k biases are always dropped exactly. Any non-zero q/v/out bias or logits bias would be lost, so
conversion refuses it unless ``drop_bias=True`` (``--drop-bias``), and lists what it dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import CONFIG_NAME, PegasusXConfig
from .errors import CheckpointError, ConfigError

FLAX_LAYER_NORM_EPS = 1e-12     # pegasus/flax/models/shared/common_layers.py: LayerNorm default in float32
RELEASED_OPTIONS = dict(block_size=512, stagger_local_blocks=True, activation_function="relu",
                        max_position_embeddings=16384)
GENERATION_IDS = dict(decoder_start_token_id=0, eos_token_id=1, forced_eos_token_id=1, pad_token_id=0)


@dataclass
class ConversionResult:
    """What a conversion wrote.

    ``dropped``: source tensors deliberately not carried over (with the reason); ``global_rows``: the token ids
    whose embedding rows initialised the global tokens (PEGASUS conversion only).
    """

    out_dir: Path
    config: PegasusXConfig
    tokenizer_written: bool
    dropped: list[str] = field(default_factory=list)
    global_rows: list[int] = field(default_factory=list)


# ============================================================================================ Flax msgpack reading
def _array_from_ext(data: bytes) -> np.ndarray:
    import msgpack

    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name
    if name == "bfloat16":          # numpy has no bfloat16: widen the 16 stored bits to float32 exactly
        bits = np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise CheckpointError(f"the Flax checkpoint holds an array of dtype {name!r}, which numpy cannot read"
                              ) from None
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
    import msgpack

    if code == 1:                   # ndarray
        return _array_from_ext(data)
    if code == 3:                   # numpy scalar, stored as a 0-d array
        return _array_from_ext(data)[()]
    if code == 2:                   # Python complex
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    return msgpack.ExtType(code, data)


def _unchunk(tree: Any) -> Any:
    """Reassemble arrays that flax split into chunks (arrays over 1 GiB)."""
    if not isinstance(tree, dict):
        return tree
    if tree.get("__msgpack_chunked_array__"):
        shape = [tree["shape"][str(i)] for i in range(len(tree["shape"]))]
        chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    return {k: _unchunk(v) for k, v in tree.items()}


def _is_params_tree(node: Any) -> bool:
    if not isinstance(node, dict) or not {"shared_embedding", "encoder", "decoder"} <= node.keys():
        return False
    emb = node["shared_embedding"]
    return isinstance(emb, dict) and isinstance(emb.get("embedding"), np.ndarray) and emb["embedding"].ndim == 2


def _find_params(tree: Any) -> dict[str, Any]:
    """The shallowest dict holding ``shared_embedding``/``encoder``/``decoder`` (``params``/``target`` first).

    Optimizer moments that mirror the parameter tree (Adam's mu/nu) sit deeper than the parameters, and
    Adafactor's factored states have no 2-D embedding, so the shallowest match is the parameters.
    """
    level = [tree]
    while level:
        for node in level:
            if _is_params_tree(node):
                return node
        nxt = []
        for node in level:
            if isinstance(node, dict):
                keys = sorted(node, key=lambda k: (k not in ("params", "target", "optimizer"),))
                nxt.extend(node[k] for k in keys if isinstance(node[k], dict))
        level = nxt
    top = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
    raise CheckpointError(f"no PEGASUS-X parameter tree (shared_embedding/encoder/decoder) in the Flax checkpoint "
                          f"(top-level keys: {top}); is this a PEGASUS-X checkpoint?")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, np.ndarray):
            out[name] = value
        else:
            raise CheckpointError(f"Flax parameter {name} is a {type(value).__name__}, not an array")
    return out


def _checkpoint_file(path: Path) -> Path:
    """``path`` itself, or the latest ``checkpoint_<step>`` file in a checkpoint directory."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"Flax checkpoint {path} does not exist; pass the checkpoint_<step> file")
    steps = [(int(m.group(1)), p) for p in path.iterdir() if (m := re.fullmatch(r"checkpoint_(\d+)", p.name))]
    files = [(s, p) for s, p in steps if p.is_file()]
    if not files:
        hint = (" (those are orbax directories, which this reader does not support: restore them with JAX and "
                "save with flax.serialization.to_bytes)" if steps else "")
        raise CheckpointError(f"no checkpoint_<step> file in {path}{hint}")
    return max(files)[1]


def read_flax_params(ckpt_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the parameters of an original Flax checkpoint, without JAX.

    Args:
        ckpt_path: a ``checkpoint_<step>`` msgpack file, or a directory (its latest such file is used).
    Returns:
        Flat ``{"encoder/encoderblock_0/LayerNorm_0/scale": array, ...}`` of the parameter tree only.
    Raises:
        CheckpointError: unreadable or not msgpack, or no parameter tree inside.
    """
    try:
        import msgpack
    except ImportError:
        raise CheckpointError("reading Flax checkpoints needs msgpack: pip install 'pegasus-x[convert]'") from None
    file = _checkpoint_file(Path(ckpt_path).expanduser())
    try:
        tree = msgpack.unpackb(file.read_bytes(), ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except (ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as exc:
        raise CheckpointError(f"{file} is not a Flax msgpack checkpoint ({type(exc).__name__}: {exc})") from None
    return _flatten(_find_params(_unchunk(tree)))


# ============================================================================================ Flax → our names
_ATTN = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
_LN = {"scale": "weight", "bias": "bias"}


def _attention_weight(kernel: np.ndarray, name: str, d_model: int) -> np.ndarray:
    """A Flax attention kernel → torch ``(out, in)``: q/k/v ``(D, H, hd)``, out ``(H, hd, D)``, or ``(D, D)``."""
    ok = (kernel.ndim == 2 and kernel.shape == (d_model, d_model)) or (
        kernel.ndim == 3 and (kernel.shape[0] if name != "out" else kernel.shape[2]) == d_model
        and kernel.size == d_model * d_model)
    if not ok:
        raise CheckpointError(f"attention kernel '{name}' has shape {kernel.shape}; expected ({d_model}, heads, "
                              f"head_dim), (heads, head_dim, {d_model}) or ({d_model}, {d_model}) — multi-query "
                              "or differently sized attention is not PEGASUS-X")
    return kernel.reshape(d_model, d_model).T


def _layer_indices(params: dict[str, np.ndarray], stack: str, block: str) -> int:
    found = {int(m.group(1)) for k in params if (m := re.match(rf"{stack}/{block}_(\d+)/", k))}
    if found != set(range(len(found))):
        raise CheckpointError(f"the Flax checkpoint's {stack} blocks are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def _heads(kernel: np.ndarray, override: int | None, d_model: int) -> int:
    if kernel.ndim == 3:
        if override is not None and override != kernel.shape[1]:
            raise ConfigError(f"num_heads={override} contradicts the checkpoint's attention kernels "
                              f"({kernel.shape[1]} heads)")
        return int(kernel.shape[1])
    # A (D, D) kernel does not say how it splits into heads; the released models use head_dim 64.
    return override or max(1, d_model // 64)


def infer_flax_config(params: dict[str, np.ndarray], *, num_heads: int | None = None,
                      block_size: int = RELEASED_OPTIONS["block_size"],
                      stagger_local_blocks: bool = RELEASED_OPTIONS["stagger_local_blocks"],
                      activation_function: str = RELEASED_OPTIONS["activation_function"],
                      layer_norm_eps: float = FLAX_LAYER_NORM_EPS) -> PegasusXConfig:
    """Sizes from the array shapes; block size, staggering and activation from the options (released defaults).

    Raises:
        CheckpointError: a required parameter is missing.
        ConfigError: the options are invalid or contradict the shapes.
    """
    def get(name: str) -> np.ndarray:
        if name not in params:
            raise CheckpointError(f"the Flax checkpoint lacks {name}; is it a PEGASUS-X (global_local) model?")
        return params[name]

    vocab, d_model = get("shared_embedding/embedding").shape
    enc0, dec0 = "encoder/encoderblock_0", "decoder/encoderdecoderblock_0"
    return PegasusXConfig.large().replace(
        vocab_size=int(vocab), d_model=int(d_model),
        encoder_layers=_layer_indices(params, "encoder", "encoderblock"),
        decoder_layers=_layer_indices(params, "decoder", "encoderdecoderblock"),
        encoder_attention_heads=_heads(get(f"{enc0}/GlobalLocalSelfAttention_0/query/kernel"), num_heads, d_model),
        decoder_attention_heads=_heads(get(f"{dec0}/SelfAttention_0/query/kernel"), num_heads, d_model),
        encoder_ffn_dim=int(get(f"{enc0}/MlpBlock_0/Dense_0/kernel").shape[1]),
        decoder_ffn_dim=int(get(f"{dec0}/MlpBlock_0/Dense_0/kernel").shape[1]),
        num_global_tokens=int(get("encoder/Embed_0/embedding").shape[0]),
        block_size=block_size, stagger_local_blocks=stagger_local_blocks, activation_function=activation_function,
        max_position_embeddings=RELEASED_OPTIONS["max_position_embeddings"], layer_norm_eps=layer_norm_eps)


def _flax_name_map(config: PegasusXConfig) -> dict[str, tuple[str, str]]:
    """Flax parameter name → (our state-dict key, layout): layout "attn" (attention kernel), "dense" or "copy"."""
    m = {"shared_embedding/embedding": ("model.shared.weight", "copy"),
         "encoder/Embed_0/embedding": ("model.encoder.embed_global.weight", "copy")}
    for flax_norm, ours in (("encoder/encoder_norm", "model.encoder.layer_norm"),
                            ("decoder/encoderdecoder_norm", "model.decoder.layer_norm")):
        m.update({f"{flax_norm}/{a}": (f"{ours}.{b}", "copy") for a, b in _LN.items()})
    blocks = [(f"encoder/encoderblock_{i}", f"model.encoder.layers.{i}",
               {"LayerNorm_0": "self_attn_layer_norm", "LayerNorm_1": "global_self_attn_layer_norm",
                "LayerNorm_2": "final_layer_norm"}, {"GlobalLocalSelfAttention_0": "self_attn"})
              for i in range(config.encoder_layers)]
    blocks += [(f"decoder/encoderdecoderblock_{j}", f"model.decoder.layers.{j}",
                {"LayerNorm_0": "self_attn_layer_norm", "LayerNorm_1": "encoder_attn_layer_norm",
                 "LayerNorm_2": "final_layer_norm"},
                {"SelfAttention_0": "self_attn", "MultiHeadDotProductAttention_0": "encoder_attn"})
               for j in range(config.decoder_layers)]
    for src, dst, norms, attns in blocks:
        for flax_norm, ours in norms.items():
            m.update({f"{src}/{flax_norm}/{a}": (f"{dst}.{ours}.{b}", "copy") for a, b in _LN.items()})
        for flax_attn, ours in attns.items():
            m.update({f"{src}/{flax_attn}/{a}/kernel": (f"{dst}.{ours}.{b}.weight", "attn")
                      for a, b in _ATTN.items()})
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            m[f"{src}/MlpBlock_0/{dense}/kernel"] = (f"{dst}.{fc}.weight", "dense")
            m[f"{src}/MlpBlock_0/{dense}/bias"] = (f"{dst}.{fc}.bias", "copy")
    return m


def flax_to_state_dict(params: dict[str, np.ndarray], config: PegasusXConfig) -> dict[str, Tensor]:
    """Rename and re-lay-out Flax parameters into our fp32 state dict (every Flax parameter must be used).

    Raises:
        CheckpointError: a parameter is missing, unexpected, has the wrong shape or is not finite.
    """
    names = _flax_name_map(config)
    unexpected = sorted(set(params) - set(names))
    missing = sorted(set(names) - set(params))
    if missing or unexpected:
        raise CheckpointError("the Flax checkpoint does not match a PEGASUS-X model of the inferred config — "
                              f"missing {missing[:6]}, unexpected {unexpected[:6]}; a learned-position, T5-bias or "
                              "otherwise modified encoder/decoder cannot be converted")
    state = {}
    for flax_name, (ours, layout) in names.items():
        value = params[flax_name]
        if layout == "attn":
            value = _attention_weight(value, flax_name.split("/")[-2], config.d_model)
        elif layout == "dense":                     # Dense kernels are (in, out); torch wants (out, in)
            value = value.T
        tensor = torch.from_numpy(np.array(value, dtype=np.float32, order="C"))  # a copy: buffers are read-only
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"Flax parameter {flax_name} holds NaN/inf values; the checkpoint is damaged")
        state[ours] = tensor
    return state


# ============================================================================================ writing
def _write_folder(state: dict[str, Tensor], config: PegasusXConfig, out_dir: Path, write_tokenizer: bool) -> bool:
    """Load ``state`` into our model (strict names and shapes), save it, and add the tokenizer when it fits."""
    from .model import PegasusXForConditionalGeneration

    with torch.device("meta"):
        model = PegasusXForConditionalGeneration(config, init=False)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shared = state["model.shared.weight"]
    full = dict(state, **{k: shared for k in ("model.encoder.embed_tokens.weight",
                                              "model.decoder.embed_tokens.weight", "lm_head.weight")})
    bad = [f"{k}: {tuple(full[k].shape)} vs {expected[k]}" for k in expected
           if k in full and tuple(full[k].shape) != expected[k]]
    missing, unexpected = sorted(set(expected) - set(full)), sorted(set(full) - set(expected))
    if bad or missing or unexpected:
        raise CheckpointError(f"converted weights do not fit the config: shape {bad[:4]}, missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}; check the config options")
    model.load_state_dict(full, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = dict(GENERATION_IDS)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    return _save_tokenizer(out_dir, config.vocab_size) if write_tokenizer else False


def _save_tokenizer(out_dir: Path, vocab_size: int) -> bool:
    from .tokenizer import PegasusTokenizer

    tokenizer = PegasusTokenizer.pegasus()
    if tokenizer.vocab_size != vocab_size:
        warnings.warn(f"the model has a vocabulary of {vocab_size}, not the PEGASUS one ({tokenizer.vocab_size}); "
                      f"no tokenizer written to {out_dir} — add the matching tokenizer files yourself", stacklevel=3)
        return False
    tokenizer.save_pretrained(out_dir)
    return True


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if (out_dir / CONFIG_NAME).exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already holds a checkpoint; choose another folder or pass overwrite=True "
                              "(--overwrite)")


def convert_flax(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, *, config: PegasusXConfig | None = None,
                 num_heads: int | None = None, block_size: int = RELEASED_OPTIONS["block_size"],
                 stagger_local_blocks: bool = RELEASED_OPTIONS["stagger_local_blocks"],
                 activation_function: str = RELEASED_OPTIONS["activation_function"],
                 layer_norm_eps: float = FLAX_LAYER_NORM_EPS, write_tokenizer: bool = True,
                 overwrite: bool = False) -> ConversionResult:
    """Convert an original Flax PEGASUS-X checkpoint into a Hugging Face-layout folder.

    Args:
        ckpt_path: ``checkpoint_<step>`` msgpack file (or its directory).
        out_dir: folder to write ``config.json``, ``model.safetensors``, ``generation_config.json`` and tokenizer.
        config: the full config to use instead of inferring it (its sizes must match the arrays; the options
            below except ``layer_norm_eps`` are then ignored).
        num_heads: head count when attention kernels are stored flat ``(D, D)`` (default d_model / 64).
        block_size, stagger_local_blocks, activation_function: not recorded in the weights; released defaults.
        layer_norm_eps: recorded as ``layer_norm_eps`` in config.json (see the module docstring).
        write_tokenizer: add the PEGASUS tokenizer files (skipped with a warning if the vocabulary differs).
        overwrite: allow writing into a folder that already holds a config.json.
    Returns:
        :class:`ConversionResult`.
    Raises:
        CheckpointError: unreadable file, or parameters that do not form a PEGASUS-X model.
        ConfigError: invalid options.
    """
    out = Path(out_dir).expanduser()
    _check_out_dir(out, overwrite)
    params = read_flax_params(ckpt_path)
    if config is None:
        config = infer_flax_config(params, num_heads=num_heads, block_size=block_size,
                                   stagger_local_blocks=stagger_local_blocks,
                                   activation_function=activation_function, layer_norm_eps=layer_norm_eps)
    else:
        config = config.replace(layer_norm_eps=layer_norm_eps)
    written = _write_folder(flax_to_state_dict(params, config), config, out, write_tokenizer)
    return ConversionResult(out, config, written)


# ============================================================================================ PEGASUS → PEGASUS-X
# Defaults of the reference PegasusConfig, for config.json files that omit a key.
_PEGASUS_DEFAULTS = dict(activation_function="gelu", scale_embedding=False, dropout=0.1, attention_dropout=0.0,
                         activation_dropout=0.0, init_std=0.02, pad_token_id=0, eos_token_id=1,
                         decoder_start_token_id=0, forced_eos_token_id=1, encoder_attention_heads=16,
                         decoder_attention_heads=16)
_COPIED = tuple(_PEGASUS_DEFAULTS)
_BIAS = re.compile(r"model\.(encoder|decoder)\.layers\.\d+\.(self_attn|encoder_attn)\.(q|k|v|out)_proj\.bias")


def _read_pegasus_config(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {folder}; pass a PEGASUS checkpoint folder (config.json + "
                              "model.safetensors or pytorch_model.bin)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc})") from None
    kind = data.get("model_type")
    if kind == "pegasus_x":
        raise ConfigError(f"{folder} is already a PEGASUS-X checkpoint; load it directly")
    if kind != "pegasus":
        raise ConfigError(f"{file} has model_type={kind!r}; `convert pegasus` needs a PEGASUS checkpoint "
                          "(model_type 'pegasus')")
    return data


def _split_biases(state: dict[str, Tensor], drop_bias: bool) -> tuple[dict[str, Tensor], list[str]]:
    """Remove attention and logits biases, refusing non-zero ones that change the outputs unless ``drop_bias``."""
    kept, dropped, harmful = {}, [], []
    for name, t in state.items():
        if not (_BIAS.fullmatch(name) or name == "final_logits_bias"):
            kept[name] = t
            continue
        nonzero = bool(t.abs().max() > 0)
        # softmax is invariant to a per-query constant, and q·b_k is one: key biases never matter.
        if nonzero and not name.endswith("k_proj.bias"):
            harmful.append(f"{name} (max |b| {float(t.abs().max()):.3g})")
        dropped.append(name + (" (non-zero)" if nonzero else " (zero)"))
    if harmful and not drop_bias:
        raise CheckpointError(f"{len(harmful)} non-zero bias(es) that PEGASUS-X cannot represent, e.g. "
                              f"{', '.join(harmful[:3])}; pass drop_bias=True (--drop-bias) to drop them and accept "
                              "changed outputs")
    return kept, dropped


def _pegasus_state(folder: Path, data: dict[str, Any], drop_bias: bool) -> tuple[dict[str, Tensor], list[str]]:
    """Read PEGASUS weights under ``model.``-prefixed names, with the tied aliases, positions and biases removed."""
    from .checkpoint import read_tensors

    state = {}
    for name, t in read_tensors(folder).items():
        bare = name[len("model."):] if name.startswith("model.") else name
        state[bare if bare in ("lm_head.weight", "final_logits_bias") else "model." + bare] = t.float()
    aliases = ["model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"]
    if "model.shared.weight" not in state:
        found = next((a for a in aliases if a in state), None)
        if found is None:
            raise CheckpointError(f"no token embedding (model.shared.weight) in {folder}")
        state["model.shared.weight"] = state[found]
    shared = state["model.shared.weight"]
    untied = [a for a in aliases if a in state and not torch.equal(state.pop(a), shared)]
    if untied:
        raise CheckpointError(f"{untied} differ from model.shared.weight in {folder}; PEGASUS-X ties its input and "
                              "output embeddings, so this checkpoint cannot be converted faithfully")
    dropped = []
    for name in [k for k in state if k.endswith("embed_positions.weight")]:
        del state[name]
        dropped.append(f"{name} (sinusoidal table; PEGASUS-X computes positions)")
    state, bias_dropped = _split_biases(state, drop_bias)
    return state, dropped + bias_dropped


def _pegasus_x_config(data: dict[str, Any], state: dict[str, Tensor], *, block_size: int, num_global_tokens: int,
                      stagger: bool, max_position_embeddings: int) -> PegasusXConfig:
    vocab, d_model = state["model.shared.weight"].shape
    copied = {k: data.get(k, _PEGASUS_DEFAULTS[k]) for k in _COPIED}

    def count(stack: str) -> int:
        return len({int(m.group(1)) for k in state if (m := re.match(rf"model\.{stack}\.layers\.(\d+)\.", k))})

    return PegasusXConfig(
        vocab_size=int(vocab), d_model=int(d_model), encoder_layers=count("encoder"), decoder_layers=count("decoder"),
        encoder_ffn_dim=int(state["model.encoder.layers.0.fc1.weight"].shape[0]),
        decoder_ffn_dim=int(state["model.decoder.layers.0.fc1.weight"].shape[0]),
        num_global_tokens=num_global_tokens, block_size=block_size, stagger_local_blocks=stagger,
        max_position_embeddings=max_position_embeddings, **copied)


def sample_global_rows(vocab_size: int, num_global_tokens: int, pad_token_id: int, seed: int) -> list[int]:
    """``num_global_tokens`` distinct token ids, excluding pad, drawn with ``torch.Generator().manual_seed(seed)``.

    Raises:
        ConfigError: more global tokens than usable vocabulary rows.
    """
    if num_global_tokens > vocab_size - 1:
        raise ConfigError(f"num_global_tokens={num_global_tokens} exceeds the {vocab_size - 1} non-pad vocabulary "
                          "rows it is initialised from; use fewer global tokens")
    candidates = torch.tensor([i for i in range(vocab_size) if i != pad_token_id])
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    return candidates[order[:num_global_tokens]].tolist()


def convert_pegasus(pegasus_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                    block_size: int = RELEASED_OPTIONS["block_size"], num_global_tokens: int = 128,
                    stagger: bool = True, seed: int = 0, drop_bias: bool = False,
                    max_position_embeddings: int = RELEASED_OPTIONS["max_position_embeddings"],
                    write_tokenizer: bool = True, overwrite: bool = False) -> ConversionResult:
    """Initialise PEGASUS-X from a PEGASUS checkpoint (Hugging Face ``pegasus`` layout), as in the paper.

    Args:
        pegasus_dir: folder with a ``model_type: pegasus`` config.json and its weights.
        out_dir: where to write the PEGASUS-X folder.
        block_size, num_global_tokens, stagger: the block-local attention options (released: 512, 128, True).
        seed: seeds the choice of embedding rows for the global tokens.
        drop_bias: drop non-zero q/v/out attention biases and ``final_logits_bias`` instead of refusing.
        max_position_embeddings: recorded input length (positions are sinusoidal; longer inputs only warn).
        write_tokenizer: add the PEGASUS tokenizer files (when the vocabulary is PEGASUS').
        overwrite: allow writing into a folder that already holds a config.json.
    Returns:
        :class:`ConversionResult` with the dropped tensors and the sampled global rows.
    Raises:
        CheckpointError: missing/unreadable files, untied embeddings, non-zero biases without ``drop_bias``.
        ConfigError: not a PEGASUS config, or invalid options.
    """
    folder, out = Path(pegasus_dir).expanduser(), Path(out_dir).expanduser()
    _check_out_dir(out, overwrite)
    data = _read_pegasus_config(folder)
    state, dropped = _pegasus_state(folder, data, drop_bias)
    config = _pegasus_x_config(data, state, block_size=block_size, num_global_tokens=num_global_tokens,
                               stagger=stagger, max_position_embeddings=max_position_embeddings)
    for i in range(config.encoder_layers):
        for p in ("weight", "bias"):   # the global stream starts with a copy of the token stream's LayerNorm
            state[f"model.encoder.layers.{i}.global_self_attn_layer_norm.{p}"] = \
                state[f"model.encoder.layers.{i}.self_attn_layer_norm.{p}"].clone()
    rows = sample_global_rows(config.vocab_size, num_global_tokens, config.pad_token_id, seed)
    state["model.encoder.embed_global.weight"] = state["model.shared.weight"][rows].clone()
    written = _write_folder(state, config, out, write_tokenizer)
    return ConversionResult(out, config, written, dropped, rows)


# ============================================================================================ CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``convert flax CKPT OUT_DIR`` and ``convert pegasus PEGASUS_DIR OUT_DIR``; both set ``func(args) -> int``."""
    convert = subparsers.add_parser("convert", help="convert original checkpoints to the Hugging Face layout")
    kinds = convert.add_subparsers(dest="convert_kind", metavar="{flax,pegasus}", required=True)

    flax = kinds.add_parser("flax", help="an original Flax PEGASUS-X checkpoint (e.g. the fine-tuned ones)")
    flax.add_argument("ckpt", help="checkpoint_<step> msgpack file, or the directory holding it")
    flax.add_argument("out_dir", help="output folder")
    flax.add_argument("--num-heads", type=int, default=None, help="heads when kernels are stored (D, D)")
    flax.add_argument("--layer-norm-eps", type=float, default=FLAX_LAYER_NORM_EPS,
                      help="LayerNorm epsilon recorded in config.json (default: the Flax model's)")
    _add_shared_options(flax)
    flax.set_defaults(func=_run_flax)

    peg = kinds.add_parser("pegasus", help="initialise PEGASUS-X from a PEGASUS checkpoint (the paper's recipe)")
    peg.add_argument("pegasus_dir", help="PEGASUS folder (config.json with model_type 'pegasus' + weights)")
    peg.add_argument("out_dir", help="output folder")
    peg.add_argument("--num-global-tokens", type=int, default=128)
    peg.add_argument("--seed", type=int, default=0, help="seed for the global-token embedding rows")
    peg.add_argument("--drop-bias", action="store_true",
                     help="drop non-zero attention/logits biases (outputs change) instead of refusing")
    _add_shared_options(peg)
    peg.set_defaults(func=_run_pegasus)


def _add_shared_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", type=int, default=RELEASED_OPTIONS["block_size"])
    p.add_argument("--no-stagger", dest="stagger", action="store_false", help="do not stagger local blocks")
    p.add_argument("--no-tokenizer", dest="write_tokenizer", action="store_false", help="skip tokenizer files")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that already has a checkpoint")


def _run_flax(args: argparse.Namespace) -> int:
    result = convert_flax(args.ckpt, args.out_dir, num_heads=args.num_heads, block_size=args.block_size,
                          stagger_local_blocks=args.stagger, layer_norm_eps=args.layer_norm_eps,
                          write_tokenizer=args.write_tokenizer, overwrite=args.overwrite)
    _print_summary(result)
    return 0


def _run_pegasus(args: argparse.Namespace) -> int:
    result = convert_pegasus(args.pegasus_dir, args.out_dir, block_size=args.block_size,
                             num_global_tokens=args.num_global_tokens, stagger=args.stagger, seed=args.seed,
                             drop_bias=args.drop_bias, write_tokenizer=args.write_tokenizer,
                             overwrite=args.overwrite)
    _print_summary(result)
    nonzero = [d for d in result.dropped if "non-zero" in d]
    if nonzero:
        print(f"dropped {len(nonzero)} non-zero bias tensor(s): {', '.join(nonzero[:4])}")
    return 0


def _print_summary(result: ConversionResult) -> None:
    c = result.config
    print(f"wrote {result.out_dir}: d_model {c.d_model}, {c.encoder_layers}+{c.decoder_layers} layers, "
          f"{c.encoder_attention_heads} heads, ffn {c.encoder_ffn_dim}, vocab {c.vocab_size}, "
          f"{c.num_global_tokens} global tokens, block {c.block_size}{' staggered' if c.stagger_local_blocks else ''}"
          f"{'' if result.tokenizer_written else '; no tokenizer written'}")
