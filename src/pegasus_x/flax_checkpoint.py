"""Original Flax PEGASUS-X checkpoints: read their parameters, infer the config, map the names to ours.

The fine-tuned checkpoints (arXiv, BigPatent, PubMed, GovReport, QMSum, SummScreen) are ``flax.training.checkpoints``
files: one msgpack document whose arrays are msgpack ext type 1 holding a nested msgpack ``(shape, dtype name,
C-order bytes)``; arrays over 1 GiB are split into ``{"__msgpack_chunked_array__", "shape", "chunks"}`` dicts.
They are read with ``msgpack`` + numpy only (no JAX). The parameter tree is found wherever it sits (``params`` of a
TrainState, ``optimizer.target`` of the old ``flax.optim``, ``target``, or the root); optimizer state is skipped.
Every parameter must be consumed by the name map, so an unexpected variant (learned positions, multi-query
attention, …) is an error, not a silent drop.

:func:`pegasus_x.convert.convert_flax` writes the result as a Hugging Face-layout folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import PegasusXConfig
from .errors import CheckpointError, ConfigError

FLAX_LAYER_NORM_EPS = 1e-12     # pegasus/flax/models/shared/common_layers.py: LayerNorm default in float32
RELEASED_OPTIONS = dict(block_size=512, stagger_local_blocks=True, activation_function="relu",
                        max_position_embeddings=16384)


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
