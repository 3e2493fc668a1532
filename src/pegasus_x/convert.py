"""Checkpoint converters: original Flax PEGASUS-X checkpoints, and PEGASUS → PEGASUS-X (the paper's recipe).

Both write a complete Hugging Face-layout folder (``config.json``, ``model.safetensors``, tokenizer files) through
:meth:`PegasusXForConditionalGeneration.save_pretrained`.

**Flax** (:func:`convert_flax`). The fine-tuned checkpoints (arXiv, BigPatent, PubMed, GovReport, QMSum, SummScreen)
are read with ``msgpack`` + numpy only (no JAX) by :mod:`pegasus_x.flax_checkpoint`, which also infers the config
from the array shapes. Every parameter must be consumed by the name map, so an unexpected variant (learned
positions, multi-query attention, …) is an error, not a silent drop.

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
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import TIED_KEYS
from .config import CONFIG_NAME, PegasusXConfig
from .errors import CheckpointError, ConfigError
from .files import check_output_dir, same_file
from .strict_json import read_object
from .flax_checkpoint import (FLAX_LAYER_NORM_EPS, RELEASED_OPTIONS, flax_to_state_dict, infer_flax_config,
                              read_flax_params)

# Re-exported: callers import the whole conversion API, Flax reading included, from here.
__all__ = ["FLAX_LAYER_NORM_EPS", "GENERATION_IDS", "RELEASED_OPTIONS", "ConversionResult", "convert_flax",
           "convert_pegasus", "flax_to_state_dict", "infer_flax_config", "read_flax_params", "register",
           "sample_global_rows"]

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


# ============================================================================================ writing
def _write_folder(state: dict[str, Tensor], config: PegasusXConfig, out_dir: Path, write_tokenizer: bool) -> bool:
    """Load ``state`` into our model (strict names and shapes), save it, and add the tokenizer when it fits."""
    from .model import PegasusXForConditionalGeneration

    with torch.device("meta"):
        model = PegasusXForConditionalGeneration(config, init=False)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shared = state["model.shared.weight"]
    full = dict(state, **{k: shared for k in TIED_KEYS})
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


def _check_out_dir(out_dir: Path, overwrite: bool, source: Path) -> None:
    """Before anything is read: ``out_dir`` can be written, is not the source's folder, and holds none of the
    files a conversion writes unless ``overwrite`` (which replaces just those; no other file is touched)."""
    from .checkpoint import GENERATION_CONFIG, SAFE_WEIGHTS
    from .tokenizer import CONFIG_FILE, SPECIAL_MAP_FILE, TOKENIZER_FILE

    folder = source if source.is_dir() else source.parent
    if same_file(out_dir, folder):
        raise CheckpointError(f"{out_dir} is the folder of the source checkpoint {source}; write the converted "
                              "checkpoint to another folder")
    names = (CONFIG_NAME, SAFE_WEIGHTS, GENERATION_CONFIG, TOKENIZER_FILE, CONFIG_FILE, SPECIAL_MAP_FILE)
    check_output_dir(out_dir, [source], flag="output folder", files=names)
    present = [name for name in names if (out_dir / name).exists()]
    if present and not overwrite:
        raise CheckpointError(f"{out_dir} already holds a checkpoint ({', '.join(present)}); choose another folder "
                              "or pass overwrite=True (--overwrite) to replace those files")


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
        overwrite: allow replacing the checkpoint files already in ``out_dir`` (other files are never touched).
    Returns:
        :class:`ConversionResult`.
    Raises:
        CheckpointError: unreadable file, parameters that do not form a PEGASUS-X model, ``out_dir`` the source's
            folder or holding checkpoint files without ``overwrite``.
        ConfigError: invalid options.
        InputError: ``out_dir`` cannot be written (checked before anything is read).
    """
    out = Path(out_dir).expanduser()
    _check_out_dir(out, overwrite, Path(ckpt_path).expanduser())
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
    data = read_object(file, CheckpointError, fix="re-download the PEGASUS checkpoint")
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
    if "model.shared.weight" not in state:
        found = next((a for a in TIED_KEYS if a in state), None)
        if found is None:
            raise CheckpointError(f"no token embedding (model.shared.weight) in {folder}")
        state["model.shared.weight"] = state[found]
    shared = state["model.shared.weight"]
    untied = [a for a in TIED_KEYS if a in state and not torch.equal(state.pop(a), shared)]
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
        overwrite: allow replacing the checkpoint files already in ``out_dir`` (other files are never touched).
    Returns:
        :class:`ConversionResult` with the dropped tensors and the sampled global rows.
    Raises:
        CheckpointError: missing/unreadable files, untied embeddings, non-zero biases without ``drop_bias``,
            ``out_dir`` the source folder or holding checkpoint files without ``overwrite``.
        ConfigError: not a PEGASUS config, or invalid options.
        InputError: ``out_dir`` cannot be written (checked before anything is read).
    """
    folder, out = Path(pegasus_dir).expanduser(), Path(out_dir).expanduser()
    _check_out_dir(out, overwrite, folder)
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
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint files already in the output "
                   "folder (no other file there is touched)")


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
